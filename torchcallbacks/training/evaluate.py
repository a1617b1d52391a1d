"""`evaluate`: loss and metrics of a model over a loader, with test hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Callback
from torchcallbacks.callbacks.callback_list import CallbackList
from torchcallbacks.logs import to_floats
from torchcallbacks.training.arguments import (
    check_callable,
    check_model,
    check_verbose,
    make_callback_list,
    resolve_device,
)
from torchcallbacks.training.arrays import array_batches, float_dtype_of
from torchcallbacks.training.data import EpochIterator, check_steps, known_length
from torchcallbacks.training.metrics import MetricLike, MetricTracker, normalize_metrics
from torchcallbacks.training.run import run_hooks
from torchcallbacks.training.shortcuts import resolve_loss
from torchcallbacks.training.steps import StepFunction, Stepper


def run_evaluation(
    stepper: Stepper,
    data: Iterable[Any],
    steps: int | None,
    callbacks: CallbackList,
    name: str,
) -> dict[str, float]:
    """One pass of evaluation with the test hooks; returns the results as floats (one sync).

    The model is in eval mode and under `torch.no_grad()` during the pass, and back in its former
    mode after it. Under `torch.distributed` the results are means over every process's samples.
    A callback can end the pass early with `model.stop_evaluating = True`.

    Args:
        stepper: runs each test step; it must have a `MetricTracker`.
        data: an iterable of `(x, y)` or `(x, y, sample_weight)` batches.
        steps: batches to evaluate, or None for one full pass.
        callbacks: the callbacks whose `on_test_*` hooks run.
        name: the data's argument name, for messages (e.g. `"validation_data"`).

    Example:

    ```python
    tracker = MetricTracker(normalize_metrics([accuracy]))
    stepper = Stepper(model, torch.device("cpu"), tracker, loss=torch.nn.functional.cross_entropy)
    logs = run_evaluation(stepper, val_loader, None, CallbackList(model=model), "validation_data")
    logs["loss"], logs["accuracy"]
    ```
    """
    model, tracker = stepper.model, stepper.tracker
    assert tracker is not None
    tracker.reset()
    setattr(callbacks.model, "stop_evaluating", False)  # noqa: B010
    seen = 0
    # On an error on_test_end still runs (e.g. SwapEMAWeights swaps the weights back).
    with run_hooks(callbacks, model, "on_test_begin", "on_test_end") as run:
        model.eval()
        with torch.no_grad():
            for index, batch in EpochIterator(data, steps, name, even_end=False).epoch():
                callbacks.on_test_batch_begin(index)
                stepper.test(batch, name)
                seen += 1
                callbacks.on_test_batch_end(index, tracker.batch_logs())
                if getattr(callbacks.model, "stop_evaluating", False):
                    break
        if seen == 0:
            raise ValueError(f"{name}: the data yielded no batches; evaluation needs at least one")
        logs = run.logs = to_floats(tracker.reduced_result())  # means over every process's samples under DDP
    return logs


def evaluate(
    model: torch.nn.Module,
    x: Any,
    y: Any = None,
    *,
    loss: Callable[..., Any] | str | None = None,
    metrics: Mapping[str, MetricLike] | Sequence[MetricLike] | None = None,
    batch_size: int | None = None,
    sample_weight: Any = None,
    steps: int | None = None,
    callbacks: Sequence[Callback] | CallbackList | None = None,
    verbose: int | str = "auto",
    return_dict: bool = False,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    test_step: StepFunction | None = None,
) -> float | list[float] | dict[str, float]:
    """Computes the loss and metrics of `model` over the batches of `x`.

    Args:
        model: a `torch.nn.Module` (DistributedDataParallel-wrapped models work too).
        x: an iterable of `(x, y)` or `(x, y, sample_weight)` batches, e.g. a DataLoader. Under
            `torch.distributed` each process evaluates its shard (e.g. a `DistributedSampler`) and the
            results are means over every process's samples, the same on every process.
            Or, as in Keras, the inputs themselves (a tensor, a numpy array, or a tuple or dict of
            them) with the targets in `y`; a loader is built for them, in order.
        y: the targets when `x` holds arrays; not with a loader (a `TypeError`).
        loss: `loss(y_pred, y) -> scalar tensor`, or one of Keras' names (`"mse"`,
            `"binary_crossentropy"`, ...: see `fit`).
        metrics: a dict name -> metric, or a list of metrics; a metric is a callable
            `(y_pred, y) -> tensor`, an object with `update/compute/reset`, or one of Keras' names
            (`"accuracy"`, `"mae"`, `"auc"`, ...: see `fit`).
        batch_size: samples per batch with array `x` (default 32); not with a loader.
        sample_weight: with array `x`, one weight per sample (`loss` must then return per-sample
            values).
        steps: number of batches to evaluate; None for one full pass.
        callbacks: callbacks receiving the test hooks.
        verbose: "auto" or 1 for a progress bar, 2 for one line, 0 for silence.
        return_dict: return `{"loss": ..., name: ...}` instead of a list.
        device: where to run (the model is moved there); default: where the model's weights are.
        amp_dtype: run the forward pass under `torch.autocast` with this dtype (e.g. `torch.bfloat16`).
        test_step: `test_step(batch) -> loss tensor or dict of scalars`, replacing the default
            `loss(model(x), y)`; the batch is already on the device.

    Returns:
        The loss as a float when there are no metrics, else a list `[loss, *metrics]`; a dict with
        `return_dict=True`.

    Example:

    ```python
    results = torchcallbacks.evaluate(model, test_loader, loss=F.cross_entropy,
                                      metrics={"accuracy": accuracy}, return_dict=True)
    results["accuracy"]
    ```
    """
    check_model(model, "evaluate")
    loss_fn = resolve_loss(loss)  # Keras' names, resolved once
    check_callable(test_step, "test_step")
    if check_callable(loss_fn, "loss") is None and test_step is None:
        raise TypeError("evaluate: loss is required (loss(y_pred, y) -> scalar tensor), or pass a test_step")
    verbose = check_verbose(verbose)
    steps = check_steps(steps, "steps")
    x = array_batches(x, y, batch_size, sample_weight, "evaluate", float_dtype_of(model))
    device = resolve_device(model, device)
    named_metrics = normalize_metrics(metrics)
    stepper = Stepper(
        model, device, MetricTracker(named_metrics, device), loss=loss_fn, amp_dtype=amp_dtype, test_step=test_step,
        weights_from="sample_weight was given" if sample_weight is not None else "the batch has sample_weight",
    )
    callback_list = make_callback_list(
        callbacks, model, None, add_history=False, add_progbar=verbose != 0,
        params={"verbose": verbose, "epochs": 1, "steps": steps if steps is not None else known_length(x)},
    )
    logs = run_evaluation(stepper, x, steps, callback_list, "x")
    if return_dict:
        return logs
    values = list(logs.values())
    return values[0] if len(values) == 1 else values

