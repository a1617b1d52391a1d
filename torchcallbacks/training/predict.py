"""`predict`: a model's outputs over a loader, concatenated, with predict hooks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Callback
from torchcallbacks.callbacks.callback_list import CallbackList
from torchcallbacks.training.arguments import (
    check_callable,
    check_model,
    check_verbose,
    make_callback_list,
    resolve_device,
)
from torchcallbacks.training.data import EpochIterator, check_steps, known_length
from torchcallbacks.training.steps import StepFunction, Stepper


def concatenate(outputs: list[Any]) -> Any:
    """Concatenate per-batch outputs along the first dimension, keeping tuples, lists and dicts."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([o.reshape(1) if o.ndim == 0 else o for o in outputs])
    if isinstance(first, Mapping):
        return {key: concatenate([o[key] for o in outputs]) for key in first}
    if isinstance(first, (tuple, list)):
        parts = [concatenate([o[i] for o in outputs]) for i in range(len(first))]
        return type(first)(parts) if isinstance(first, list) or type(first) is tuple else type(first)(*parts)
    return outputs


def predict(
    model: torch.nn.Module,
    x: Iterable[Any],
    *,
    steps: int | None = None,
    callbacks: Sequence[Callback] | CallbackList | None = None,
    verbose: int | str = "auto",
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    predict_step: StepFunction | None = None,
) -> Any:
    """Runs `model` over the batches of `x` and concatenates the outputs.

    A batch is `x`, or `(x,)`, `(x, y)`, `(x, y, sample_weight)` of which only `x` is used. The model
    runs in eval mode under `torch.no_grad()`. Outputs stay on the device they were computed on.

    Args:
        model: a `torch.nn.Module`.
        x: an iterable of batches, e.g. a DataLoader.
        steps: number of batches; None for one full pass.
        callbacks: callbacks receiving the predict hooks (`on_predict_batch_end` gets `{"outputs": ...}`).
        verbose: "auto" or 1 for a progress bar, 2 for one line, 0 for silence.
        device: where to run (the model is moved there); default: where the model's weights are.
        amp_dtype: run under `torch.autocast` with this dtype.
        predict_step: `predict_step(batch) -> outputs`, replacing `model(x)`; the batch is on the device.

    Returns:
        The outputs of all batches concatenated along the first dimension; tuples, lists and dicts
        of tensors keep their structure.

    Example:

    ```python
    logits = torchcallbacks.predict(model, test_loader)
    labels = logits.argmax(dim=1)
    ```
    """
    check_model(model, "predict")
    check_callable(predict_step, "predict_step")
    verbose = check_verbose(verbose)
    steps = check_steps(steps, "steps")
    device = resolve_device(model, device)
    stepper = Stepper(model, device, amp_dtype=amp_dtype, predict_step=predict_step)
    callback_list = make_callback_list(
        callbacks, model, None, add_history=False, add_progbar=verbose != 0,
        params={"verbose": verbose, "epochs": 1, "steps": steps if steps is not None else known_length(x)},
    )
    unwrapped = callback_list.model
    setattr(unwrapped, "stop_predicting", False)  # noqa: B010
    outputs: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        callback_list.on_predict_begin()
        with torch.no_grad():
            for index, batch in EpochIterator(x, steps, "x").epoch():
                callback_list.on_predict_batch_begin(index)
                batch_outputs = stepper.predict(batch)
                outputs.append(batch_outputs)
                callback_list.on_predict_batch_end(index, {"outputs": batch_outputs})
                if getattr(unwrapped, "stop_predicting", False):
                    break
        callback_list.on_predict_end()
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("x: the data yielded no batches; predict needs at least one")
    return concatenate(outputs)
