"""`predict`: a model's outputs over a loader, concatenated, with predict hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from torchcallbacks.callbacks.callback import Callback
from torchcallbacks.callbacks.callback_list import CallbackList
from torchcallbacks.distributed import all_gather_tensors, is_distributed
from torchcallbacks.structures import iter_tensors, map_leaves_of_many, map_tensors
from torchcallbacks.training.arguments import (
    check_callable,
    check_model,
    check_verbose,
    make_callback_list,
    resolve_device,
)
from torchcallbacks.training.arrays import array_batches, float_dtype_of
from torchcallbacks.training.data import EpochIterator, check_steps, known_length
from torchcallbacks.training.run import run_hooks
from torchcallbacks.training.steps import StepFunction, Stepper


def _concatenate_leaves(leaves: list[Any]) -> Any:
    if isinstance(leaves[0], torch.Tensor):
        return torch.cat([leaf.reshape(1) if leaf.ndim == 0 else leaf for leaf in leaves])
    return leaves


def concatenate(outputs: list[Any]) -> Any:
    """Concatenate per-batch outputs along the first dimension, keeping their structure and types
    (tuples, namedtuples, lists, mappings, dataclasses: `torchcallbacks.structures`' rules).

    0-d tensors count as one sample each; a leaf that is not a tensor comes back as the list of
    its per-batch values.

    Args:
        outputs: the outputs of each batch, in order (at least one), all of the same structure.

    Raises:
        ValueError: when a batch's output has a different structure than the first's.

    Example:

    ```python
    out = concatenate([{"logits": torch.zeros(2, 5)}, {"logits": torch.zeros(3, 5)}])
    out["logits"].shape  # torch.Size([5, 5])
    ```
    """
    return map_leaves_of_many(_concatenate_leaves, outputs)


def _sampler_indices(loader: Any) -> list[int] | None:
    """The dataset indices this process's loader visits, in order, when its sampler is deterministic
    (a `DistributedSampler`, shuffled or not: its order depends only on seed and epoch; or a
    `SequentialSampler`); else None."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    if isinstance(sampler, (DistributedSampler, SequentialSampler)):
        return [int(i) for i in sampler]
    return None


def _gather(outputs: Any, loader: Any) -> Any:
    """Every process's outputs in one structure: in dataset order without the duplicates a
    `DistributedSampler` pads with when the sampler's indices are known, else in rank order."""
    leaves = list(iter_tensors(outputs))
    if not leaves:
        raise TypeError("predict: gather=True needs tensor outputs (or tuples, lists, dicts of tensors)")
    rows = leaves[0].shape[0]
    indices = _sampler_indices(loader)
    order: torch.Tensor | None = None
    if indices is not None and len(indices) >= rows:
        every = torch.cat(all_gather_tensors(torch.tensor(indices[:rows], dtype=torch.int64)))
        by_index = torch.argsort(every, stable=True)
        ordered = every[by_index]
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        order = by_index[first]  # each dataset index once, ascending

    def gather_one(value: torch.Tensor) -> torch.Tensor:
        gathered = torch.cat(all_gather_tensors(value))
        return gathered if order is None else gathered[order.to(gathered.device)]

    return map_tensors(gather_one, outputs)


def predict(
    model: torch.nn.Module,
    x: Any,
    *,
    batch_size: int | None = None,
    steps: int | None = None,
    callbacks: Sequence[Callback] | CallbackList | None = None,
    verbose: int | str = "auto",
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    predict_step: StepFunction | None = None,
    gather: bool = False,
) -> Any:
    """Runs `model` over the batches of `x` and concatenates the outputs.

    A batch is `x`, or `(x,)`, `(x, y)`, `(x, y, sample_weight)` of which only `x` is used. The model
    runs in eval mode under `torch.no_grad()`. Outputs stay on the device they were computed on.

    Args:
        model: a `torch.nn.Module`.
        x: an iterable of batches, e.g. a DataLoader. Or, as in Keras, the inputs themselves: a
            tensor, a numpy array, or a tuple or dict of them; a loader is built for them, in order.
        batch_size: samples per batch with array `x` (default 32); not with a loader.
        steps: number of batches; None for one full pass.
        callbacks: callbacks receiving the predict hooks (`on_predict_batch_end` gets `{"outputs": ...}`).
        verbose: "auto" or 1 for a progress bar, 2 for one line, 0 for silence.
        device: where to run (the model is moved there); default: where the model's weights are.
        amp_dtype: run under `torch.autocast` with this dtype.
        predict_step: `predict_step(batch) -> outputs`, replacing `model(x)`; the batch is on the device.
        gather: under `torch.distributed`, return every process's outputs, on every process: in the
            dataset's order when the loader's sampler is a `DistributedSampler` (the samples it
            repeats to pad the shards are dropped) or a `SequentialSampler`, else concatenated in
            rank order. Every output must have the same first dimension (one row per sample).
            Without a process group it changes nothing. With False each process returns its own shard.

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
    x = array_batches(x, None, batch_size, None, "predict", float_dtype_of(model))
    device = resolve_device(model, device)
    stepper = Stepper(model, device, amp_dtype=amp_dtype, predict_step=predict_step)
    callback_list = make_callback_list(
        callbacks, model, None, add_history=False, add_progbar=verbose != 0,
        params={"verbose": verbose, "epochs": 1, "steps": steps if steps is not None else known_length(x)},
    )
    unwrapped = callback_list.model
    setattr(unwrapped, "stop_predicting", False)  # noqa: B010
    outputs: list[Any] = []
    # On an error on_predict_end still runs (e.g. SwapEMAWeights swaps the weights back).
    with run_hooks(callback_list, model, "on_predict_begin", "on_predict_end"):
        model.eval()
        with torch.no_grad():
            for index, batch in EpochIterator(x, steps, "x", even_end=False).epoch():
                callback_list.on_predict_batch_begin(index)
                batch_outputs = stepper.predict(batch)
                outputs.append(batch_outputs)
                callback_list.on_predict_batch_end(index, {"outputs": batch_outputs})
                if getattr(unwrapped, "stop_predicting", False):
                    break
        if not outputs:
            raise ValueError("x: the data yielded no batches; predict needs at least one")
    result = concatenate(outputs)
    if gather and is_distributed():
        result = _gather(result, x)
    return result
