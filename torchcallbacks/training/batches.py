"""What a batch is: `(x, y)` or `(x, y, sample_weight)`, moved to the device, and how to call the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchcallbacks.structures import first_tensor, map_tensors


def describe(value: Any) -> str:
    """A short description of a (nested) batch for error messages, e.g.
    `tuple of 2 (Tensor[32, 10], Tensor[32])`.

    Args:
        value: a batch, or any part of one.

    Example:

    ```python
    describe((torch.zeros(32, 10), torch.zeros(32)))  # "tuple of 2 (Tensor[32, 10], Tensor[32])"
    ```
    """
    if isinstance(value, torch.Tensor):
        return f"Tensor[{', '.join(map(str, value.shape))}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{type(value).__name__} of {len(value)} ({inner})"
    return type(value).__name__


def unpack(batch: Any, where: str) -> tuple[Any, Any, Any]:
    """Split a training or evaluation batch into `(x, y, sample_weight)`.

    Args:
        batch: `(x, y)` or `(x, y, sample_weight)` (a tuple or a list); anything else is a
            `ValueError` that describes the batch.
        where: the public function, for the message (e.g. `"fit"`).

    Example:

    ```python
    x, y, sample_weight = unpack((inputs, targets), "fit")  # sample_weight is None
    ```
    """
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
    raise ValueError(
        f"{where}: each batch must be (x, y) or (x, y, sample_weight); received {describe(batch)}. "
        "Wrap the data so the loader yields pairs, e.g. TensorDataset(x, y)."
    )


def unpack_x(batch: Any) -> Any:
    """The model input of a predict batch: the batch itself, or the first element of (x,), (x, y),
    (x, y, sample_weight), as Keras does.

    Args:
        batch: a batch from the `predict` loader.

    Example:

    ```python
    unpack_x((inputs, targets)) is inputs  # True
    ```
    """
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        return batch[0]
    return batch


def _move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device, non_blocking=device.type != "cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`; tensors already there are returned as they are.

    The batch is walked by `torchcallbacks.structures`' rules: tuples, lists, mappings and
    dataclasses come back with their own types (a namedtuple target stays that namedtuple, with its
    fields), other values are kept as they are. Copies to an accelerator are asynchronous
    (`non_blocking`, ordered on its stream); copies to the CPU are not, since the CPU would read the
    tensor before an asynchronous copy finished.

    Args:
        value: a tensor, or a structure of them: tuples (namedtuples too), lists, mappings, dataclasses.
        device: where the tensors go.

    Example:

    ```python
    x, y = to_device((x, y), torch.device("cuda"))
    ```
    """
    if isinstance(value, torch.Tensor):  # what the default step moves: x, y, sample_weight
        return value if value.device == device else value.to(device, non_blocking=device.type != "cpu")
    # Plain tuples, lists and dicts (most batches) are walked here, with the walker's result and at
    # the cost of one call per element; every other container goes through the walker.
    cls = type(value)
    if cls is tuple:
        return tuple([to_device(item, device) for item in value])
    if cls is list:
        return [to_device(item, device) for item in value]
    if cls is dict:
        return {key: to_device(item, device) for key, item in value.items()}
    return map_tensors(lambda tensor: _move(tensor, device), value)


def batch_size(value: Any) -> int:
    """The length of the first tensor in a (nested) batch, in `torchcallbacks.structures`' walk
    order; 1 when there is none. A 0-d tensor counts as 1.

    Args:
        value: a batch, or any part of one.

    Example:

    ```python
    batch_size({"tokens": torch.zeros(16, 128), "mask": torch.ones(16, 128)})  # 16
    ```
    """
    if isinstance(value, torch.Tensor):  # the default step's x, every batch
        return value.shape[0] if value.ndim else 1
    cls = type(value)
    if (cls is tuple or cls is list) and value and isinstance(value[0], torch.Tensor):  # multi-input x
        first: torch.Tensor | None = value[0]
    else:
        first = first_tensor(value)
    if first is None or first.ndim == 0:
        return 1
    return first.shape[0]


def call_model(model: torch.nn.Module, x: Any) -> Any:
    """`model(x)`; a tuple `x` is passed as positional arguments and a dict as keyword arguments.

    Args:
        model: the model.
        x: the model input: a tensor, a tuple, a dict, or anything `model` takes as one argument.

    Example:

    ```python
    y_pred = call_model(model, {"input_ids": ids, "attention_mask": mask})  # model(input_ids=..., ...)
    ```
    """
    if isinstance(x, torch.Tensor):
        return model(x)
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)
