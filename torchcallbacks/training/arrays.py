"""Keras' `fit(x, y)` habit: loaders built from tensors and numpy arrays (and tuples / dicts of them).

`fit(model, x, y, batch_size=32, validation_split=0.2, shuffle=True, class_weight={...})`,
`evaluate(model, x, y)` and `predict(model, x)` take arrays in place of a loader; this module turns
them into a `torch.utils.data.DataLoader` over a `TensorDataset`, whose batches are the structures
the default steps take: `(x, y)`, `(x, y, sample_weight)`, or `(x,)` to predict, with `x` (and `y`)
in the structure given (a tensor, a tuple of tensors, a dict of tensors).

A batch is gathered with one index operation per tensor (`tensor[indices]`), not sample by sample
and stacked. The loader draws no random number when it is built: a shuffling loader's
`RandomSampler` draws its seed from torch's global generator at each `iter(loader)`, which is the
moment `EpochIterator` captures the random state, so a resumed run replays the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchcallbacks.checks import check_optional_count
from torchcallbacks.distributed import get_rank, get_world_size, is_distributed


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def is_array_data(value: Any) -> bool:
    """Whether `value` is array data (as opposed to a loader): a tensor, a numpy array, or a tuple or
    dict of them (a multi-input model's inputs, as Keras takes them). A list is always a list of
    batches, as before.

    Args:
        value: the `x` (or `y`) argument as given.

    Example:

    ```python
    is_array_data(torch.zeros(8, 3))                               # True
    is_array_data((torch.zeros(8, 3), np.zeros((8, 2))))           # True: two inputs
    is_array_data(DataLoader(TensorDataset(torch.zeros(8, 3))))    # False
    ```
    """
    if _is_array(value):
        return True
    if type(value) is tuple or isinstance(value, Mapping):
        items = list(value.values()) if isinstance(value, Mapping) else list(value)
        return bool(items) and all(_is_array(item) for item in items)
    return False


def float_dtype_of(model: torch.nn.Module) -> torch.dtype | None:
    """The floating dtype `model` computes in: its first floating parameter's (else buffer's), or
    None for a model without floating tensors. Array data is cast to it (`array_loader`).

    Example:

    ```python
    float_dtype_of(torch.nn.Linear(4, 1).double())  # torch.float64
    ```
    """
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _to_tensor(value: torch.Tensor | np.ndarray, name: str, float_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor for an array: numpy arrays shared with `torch.from_numpy` (a copy when the array is
    read-only); floating ones cast to `float_dtype` (the model's, see `float_dtype_of`), as Keras
    casts inputs to its layers' dtype: numpy ones to torch's default dtype (float32) without it,
    tensors kept as they are then. No copy where the dtype is already right."""
    if isinstance(value, torch.Tensor):
        tensor = value
        if float_dtype is not None and tensor.is_floating_point() and tensor.dtype != float_dtype:
            tensor = tensor.to(float_dtype)
    else:
        try:
            tensor = torch.from_numpy(value) if value.flags.writeable else torch.tensor(value)
        except TypeError as exc:
            raise TypeError(f"{name}: cannot convert a numpy array of dtype {value.dtype} to a tensor ({exc})") from exc
        if tensor.is_floating_point():
            tensor = tensor.to(float_dtype or torch.get_default_dtype())
    if tensor.ndim == 0:
        raise ValueError(f"{name}: expected arrays with one row per sample, received a 0-d array")
    return tensor


Rebuild = Callable[[list[torch.Tensor]], Any]


def _flatten(value: Any, name: str, float_dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], Rebuild]:
    """The tensors of an array structure (a tensor, a tuple or a dict of them) and the function that
    rebuilds the structure from a list of (sliced) tensors in the same order."""
    if _is_array(value):
        return [_to_tensor(value, name, float_dtype)], lambda tensors: tensors[0]
    if isinstance(value, Mapping):
        keys = list(value)
        tensors = [_to_tensor(value[key], f"{name}[{key!r}]", float_dtype) for key in keys]
        return tensors, lambda parts: dict(zip(keys, parts, strict=True))
    if type(value) is tuple:
        tensors = [_to_tensor(item, f"{name}[{i}]", float_dtype) for i, item in enumerate(value)]
        return tensors, tuple
    raise TypeError(
        f"{name}: expected a tensor, a numpy array, or a tuple or dict of them, received {type(value).__name__}"
    )


class ArrayDataset(TensorDataset):
    """A `TensorDataset` whose items come back in the structure of the arrays it was built from.

    Indexing with a list of sample indices (what a `DataLoader` does through `__getitems__`) slices
    every tensor once, so a batch costs one index operation per array.

    Args:
        parts: the batch's parts, each an array structure: `(x, y)`, `(x, y, sample_weight)`, `(x,)`.
        names: the parts' argument names, for error messages (e.g. `("x", "y")`).
        float_dtype: the dtype floating arrays are cast to (the model's); None: numpy ones to
            torch's default dtype, tensors as they are.

    Example:

    ```python
    dataset = ArrayDataset(((torch.zeros(8, 3), torch.zeros(8, 2)), torch.zeros(8)), names=("x", "y"))
    dataset.__getitems__([0, 1])  # ((Tensor[2, 3], Tensor[2, 2]), Tensor[2])
    ```
    """

    def __init__(self, parts: Sequence[Any], names: Sequence[str], float_dtype: torch.dtype | None = None) -> None:
        tensors: list[torch.Tensor] = []
        self._layout: list[tuple[int, int, Rebuild]] = []
        for part, name in zip(parts, names, strict=True):
            flat, rebuild = _flatten(part, name, float_dtype)
            self._layout.append((len(tensors), len(tensors) + len(flat), rebuild))
            tensors.extend(flat)
        counts = {tensor.shape[0] for tensor in tensors}
        if len(counts) > 1:
            sizes = "; ".join(
                f"{name}: {', '.join(str(t.shape[0]) for t in tensors[start:stop])}"
                for (start, stop, _), name in zip(self._layout, names, strict=True)
            )
            raise ValueError(f"the arrays hold different numbers of samples ({sizes}); give every array one row per sample")
        super().__init__(*tensors)

    def _build(self, tensors: list[torch.Tensor]) -> tuple[Any, ...]:
        return tuple(rebuild(tensors[start:stop]) for start, stop, rebuild in self._layout)

    def __getitem__(self, index: Any) -> tuple[Any, ...]:
        return self._build([tensor[index] for tensor in self.tensors])

    def __getitems__(self, indices: list[int]) -> tuple[Any, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self._build([tensor[index] for tensor in self.tensors])


def _collate_batch(batch: Any) -> Any:
    """The batch `ArrayDataset.__getitems__` already built (nothing to stack)."""
    return batch


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int | None:
    """`batch_size` when None or an integer >= 1, else a `ValueError` naming the argument.

    Example:

    ```python
    check_batch_size(32)  # 32
    ```
    """
    return check_optional_count(batch_size, name)


def array_loader(
    parts: Sequence[Any], names: Sequence[str], batch_size: int | None, shuffle: bool,
    float_dtype: torch.dtype | None = None,
) -> DataLoader:
    """A DataLoader over arrays, yielding `tuple(parts)` batches of `batch_size` samples (32 when
    None, as Keras) in the structure given; with `shuffle`, in a new order each pass.

    Under `torch.distributed` each process reads its shard through a `DistributedSampler` (shuffled
    by its seed and the epoch, which `fit` sets).

    Args:
        parts: the batch's parts, each an array structure: `(x, y)`, `(x, y, sample_weight)`, `(x,)`.
        names: the parts' argument names, for error messages.
        batch_size: samples per batch (the last batch may be smaller), None for 32.
        shuffle: reshuffle the samples at every pass over the loader.
        float_dtype: cast floating arrays to this dtype (the model's, `float_dtype_of`), as Keras
            casts inputs to its layers' dtype; None: numpy ones to torch's default, tensors as given.

    Example:

    ```python
    loader = array_loader((x, y), ("x", "y"), batch_size=64, shuffle=True)
    ```
    """
    dataset = ArrayDataset(parts, names, float_dtype)
    size = batch_size if batch_size is not None else 32
    if is_distributed():
        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle, drop_last=False
        )
        return DataLoader(dataset, batch_size=size, sampler=sampler, collate_fn=_collate_batch)
    return DataLoader(dataset, batch_size=size, shuffle=shuffle, collate_fn=_collate_batch)


def class_weights_to_sample_weights(y: Any, class_weight: Mapping[int, float]) -> torch.Tensor:
    """One weight per sample from `class_weight` (class index -> weight), as Keras computes them:
    the class of a sample is `y` itself for class indices (shape `(n,)` or `(n, 1)`, rounded), the
    argmax for one-hot or probability rows (shape `(n, classes)`); a class not in the dict weighs 1.

    Args:
        y: the targets, a tensor or numpy array (not a tuple or dict: Keras' single-output rule).
        class_weight: class index -> weight.

    Example:

    ```python
    class_weights_to_sample_weights(torch.tensor([0, 1, 1]), {1: 3.0})  # tensor([1., 3., 3.])
    ```
    """
    if not isinstance(class_weight, Mapping):
        raise TypeError(f"class_weight: expected a dict class index -> weight, received {type(class_weight).__name__}")
    if not _is_array(y):
        raise ValueError("class_weight: only supported with a single target array y (not a tuple or dict of them)")
    labels = _to_tensor(y, "y")
    if labels.ndim > 2:
        raise ValueError(f"class_weight: expected y of shape (n,), (n, 1) or (n, classes), received {tuple(labels.shape)}")
    if labels.ndim == 2:
        labels = labels.argmax(dim=1) if labels.shape[1] > 1 else labels[:, 0]
    if labels.is_floating_point():
        labels = labels.round()
    labels = labels.long()
    weights = torch.ones(labels.shape[0], dtype=torch.get_default_dtype())
    for label, weight in class_weight.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise TypeError(f"class_weight: keys must be class indices (integers), received {label!r}")
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise TypeError(f"class_weight: the weight of class {label} must be a number, received {weight!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"class_weight: the weight of class {label} must be finite and >= 0, received {weight!r}")
        weights[labels == int(label)] = value
    return weights


def uniform_weights(y: Any, name: str = "y") -> torch.Tensor:
    """A weight of 1 for every sample of `y` (an array structure): what the validation samples of a
    run trained with `class_weight` weigh, so that a per-sample loss averages them unweighted.

    Args:
        y: the targets, a tensor, a numpy array, or a tuple or dict of them (one row per sample).
        name: the argument it came from, for error messages.

    Example:

    ```python
    uniform_weights(torch.tensor([0, 2, 1]))  # tensor([1., 1., 1.])
    ```
    """
    tensors = _flatten(y, name)[0]
    if not tensors:
        raise ValueError(f"{name}: expected at least one array")
    return torch.ones(tensors[0].shape[0], dtype=torch.get_default_dtype())


def split_for_validation(parts: Sequence[Any], validation_split: float) -> tuple[list[Any], list[Any]]:
    """The training and validation parts of arrays, as Keras splits them: the LAST
    `validation_split` fraction of the samples (before any shuffling) is for validation.

    Args:
        parts: array structures with one row per sample (`x`, `y`, `sample_weight` or None).
        validation_split: a fraction in (0, 1).

    Example:

    ```python
    (x_train, y_train), (x_val, y_val) = split_for_validation((x, y), 0.2)
    ```
    """
    first = next(tensor for part in parts if part is not None for tensor in _flatten(part, "x")[0])
    samples = first.shape[0]
    split_at = math.floor(samples * (1.0 - validation_split))
    if split_at == 0 or split_at == samples:
        raise ValueError(
            f"validation_split: the data holds {samples} samples, too few to split off a fraction "
            f"{validation_split} for validation and keep some for training; give more data or another fraction"
        )

    def cut(part: Any, start: int, stop: int) -> Any:
        if part is None:
            return None
        if isinstance(part, Mapping):
            return {key: value[start:stop] for key, value in part.items()}
        if type(part) is tuple:
            return tuple(value[start:stop] for value in part)
        return part[start:stop]

    return [cut(p, 0, split_at) for p in parts], [cut(p, split_at, samples) for p in parts]


def check_validation_split(value: Any) -> float:
    """`validation_split` as a float in [0, 1), else a `ValueError`.

    Example:

    ```python
    check_validation_split(0.2)  # 0.2
    ```
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"validation_split: expected a fraction in [0, 1), received {value!r}")
    return float(value)


def is_array_validation(value: Any) -> bool:
    """Whether fit's `validation_data` is Keras' `(x_val, y_val)` or `(x_val, y_val, sample_weight)`
    tuple of arrays rather than an iterable of batches: a tuple of 2 or 3 whose `y_val` is a tensor,
    a numpy array or a dict of them (a batch is never one, so a tuple of batches is not taken for it).

    Example:

    ```python
    is_array_validation((x_val, y_val))   # True
    is_array_validation(val_loader)       # False
    ```
    """
    if type(value) is not tuple or len(value) not in (2, 3):
        return False
    y = value[1]
    return (_is_array(y) or (isinstance(y, Mapping) and is_array_data(y))) and is_array_data(value[0])


def batch_parts(x: Any, y: Any, sample_weight: Any, where: str) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """The parts of a batch of arrays and their names: `(x, y)` or `(x, y, sample_weight)`.

    Args:
        x: the inputs.
        y: the targets (required).
        sample_weight: one weight per sample, or None.
        where: the function or argument, for the message.

    Example:

    ```python
    parts, names = batch_parts(x, y, None, "fit")  # (x, y), ("x", "y")
    ```
    """
    if y is None:
        raise TypeError(f"{where}: y (the targets) is required with array x")
    if sample_weight is None:
        return (x, y), ("x", "y")
    return (x, y, sample_weight), ("x", "y", "sample_weight")


def refuse_array_arguments(x: Any, given: list[str], where: str, hint: str = "") -> None:
    """The TypeError for array-only arguments (`y`, `batch_size`, ...) given with a loader `x`, naming
    them; nothing when `given` is empty.

    Args:
        x: the loader given as `x`.
        given: the names of the array-only arguments that were given.
        where: the function, for the message.
        hint: what to do instead, added to the message.

    Example:

    ```python
    refuse_array_arguments(loader, ["y"], "evaluate")  # TypeError: evaluate: y given, but x is DataLoader, ...
    ```
    """
    if given:
        names = ", ".join(given)
        raise TypeError(
            f"{where}: {names} given, but x is {type(x).__name__}, an iterable of batches (e.g. a DataLoader) "
            f"whose batches already hold the targets and the batching; {names} only go with array x (tensors "
            f"or numpy arrays, or tuples or dicts of them){hint}"
        )


def array_batches(
    x: Any, y: Any, batch_size: Any, sample_weight: Any, where: str, float_dtype: torch.dtype | None = None,
) -> Any:
    """`evaluate`'s and `predict`'s data: `x` itself when it is a loader (then `y`, `batch_size` and
    `sample_weight` must be None: a `TypeError` names them), else an unshuffled loader over the
    arrays: `(x, y[, sample_weight])` batches to evaluate, `(x,)` to predict (`where == "predict"`),
    floating ones cast to `float_dtype` (see `array_loader`).

    Example:

    ```python
    loader = array_batches(x_test, y_test, 64, None, "evaluate")
    ```
    """
    batch_size = check_batch_size(batch_size)
    if not is_array_data(x):
        refuse_array_arguments(
            x, [n for n, v in (("y", y), ("batch_size", batch_size), ("sample_weight", sample_weight)) if v is not None], where
        )
        return x
    if where == "predict":
        return array_loader((x,), ("x",), batch_size, shuffle=False, float_dtype=float_dtype)
    parts, names = batch_parts(x, y, sample_weight, where)
    return array_loader(parts, names, batch_size, shuffle=False, float_dtype=float_dtype)
