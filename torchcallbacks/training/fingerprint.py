"""The data-order fingerprint: what a backup holds of the epoch's order, so that a resume can tell
when the data it continues on is not the data it was saved on.

Each data position (`EpochIterator.state_dict()`, the loop part "data", saved per process) holds a
`fingerprint`: the dataset's length (`len(loader.dataset)`), the loader's (`len(loader)`, batches per
pass) and, where the loader has indices (a `DataLoader` over a map-style dataset: its `batch_sampler`
or `sampler`), a digest of the indices the pass draws; for data without indices (an
`IterableDataset`, a generator, a list of batches) a digest of the pass's first batch. On resume it
is recomputed from the restored state and compared (`EpochIterator.load_state_dict`); a difference
is a `DataOrderWarning` naming what changed, or a `CheckpointError` with
`BackupAndRestore(strict_data=True)`.

Nothing is computed per batch. The indices are drawn from a copy of the index sampler taken at the
pass's start (a shallow copy of torch's own samplers, a deep copy of others, sharing the dataset and
the loader's `torch.Generator`s), under the pass's random state, exactly as `iter(loader)` would draw
them (its base seed first), with every generator put back afterwards: the live sampler and the run's
random streams are untouched, so the fingerprint changes nothing that is trained. The drawing is done
when a state is saved (once per pass) or loaded: one more pass over the sampler, about what the loader
spends drawing the indices of an epoch (0.3 s for a million samples with torch's RandomSampler), of at
most `MAX_INDICES` indices. A first batch is digested once per pass, when it is fetched anyway.

What it cannot see: indices say nothing of content, so a map-style dataset whose items changed while
its length stayed the same is not noticed (only data without indices is digested by content); and
data without indices is compared only when a pass resumes part-way (its first batch is fetched again
to be skipped), not at an epoch end, where the next pass's first batch is not known yet.
"""

from __future__ import annotations

import array
import copy
import dataclasses
import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from torchcallbacks.structures import node
from torchcallbacks.training.skipping import _DatasetKind, _not_started

#: The most indices a digest covers (the first ones of the pass): an endless sampler stays cheap.
MAX_INDICES = 1 << 23
_CHUNK = 1 << 16
#: torch's samplers whose iteration changes nothing of theirs: a shallow copy keeps what decides their
#: order (`epoch`, `num_samples`, ...) as the pass starts, sharing their index lists and weights.
_STATELESS = (SequentialSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler, DistributedSampler)


class DataOrderWarning(UserWarning):
    """A resumed run's data is not in the order it was saved in (see `torchcallbacks.training.fingerprint`):
    the dataset changed length or content, or the sampler drew other indices from the same random state.

    Turn it into an error with `warnings.simplefilter("error", DataOrderWarning)`, or refuse such a
    backup with `BackupAndRestore(strict_data=True)` (a `CheckpointError` naming the file).

    Example:

    ```python
    import warnings

    warnings.simplefilter("error", torchcallbacks.DataOrderWarning)
    ```
    """


def index_sampler(data: Any) -> Any:
    """What `iter(data)` draws its indices from: a `DataLoader` over a map-style dataset's
    `batch_sampler` (or its `sampler` with `batch_size=None`); None for data without indices.

    Args:
        data: an iterable of batches.

    Example:

    ```python
    index_sampler(DataLoader(dataset, batch_size=4, shuffle=True))  # its BatchSampler
    index_sampler([batch_1, batch_2])  # None
    ```
    """
    if not isinstance(data, DataLoader) or getattr(data, "_dataset_kind", None) != getattr(_DatasetKind, "Map", object()):
        return None
    return getattr(data, "_index_sampler", None)


def dataset_length(data: Any) -> int | None:
    """`len(data.dataset)` when the loader has a dataset with a length, else None.

    Args:
        data: an iterable of batches, e.g. a `DataLoader`.

    Example:

    ```python
    dataset_length(DataLoader(TensorDataset(torch.zeros(60, 2)), batch_size=8))  # 60
    ```
    """
    dataset = getattr(data, "dataset", None)
    if dataset is None:
        return None
    try:
        length = len(dataset)
    except (TypeError, NotImplementedError):
        return None
    return length if isinstance(length, int) and not isinstance(length, bool) else None


def _epoch_owner(sampler: Any) -> Any:
    """The sampler whose `set_epoch` decides the order (a `DistributedSampler`, possibly inside a
    `BatchSampler`), as `distributed.set_sampler_epoch` finds it; None if there is none."""
    for candidate in (sampler, getattr(sampler, "sampler", None)):
        if callable(getattr(candidate, "set_epoch", None)):
            return candidate
    return None


@dataclasses.dataclass
class SamplerSnapshot:
    """A copy of a loader's index sampler, taken before `iter(loader)`, that draws the pass's indices
    without touching the live one. One use: drawing advances the copy's own random state.

    Attributes:
        loader: the `DataLoader`.
        sampler: the deep copy of its index sampler (the dataset and the loader's generators shared).
        fresh_iterator: whether `iter(loader)` makes a new iterator, which draws a base seed first
            (not so for persistent workers after the first pass).
    """

    loader: DataLoader[Any]
    sampler: Any
    fresh_iterator: bool

    def indices(self, epoch: int | None = None) -> tuple[str, int | None]:
        """The digest of the indices `iter(loader)` draws from the current random state, and the
        sampler's `epoch` (`set_epoch`) they were drawn at. The caller restores the random state.

        Args:
            epoch: draw as at this sampler epoch (`set_epoch` on the copy first), to compare with a
                digest drawn at that epoch; None: the copy's own.

        Example:

        ```python
        with iterator._random_state(saved["pass_rng"]):
            digest, at = snapshot.indices(saved["fingerprint"]["sampler_epoch"])
        ```
        """
        owner = _epoch_owner(self.sampler)
        if owner is not None and epoch is not None:
            owner.set_epoch(epoch)
        at = getattr(owner, "epoch", None)
        at = at if isinstance(at, int) and not isinstance(at, bool) else None
        loader, sampler = self.loader, self.sampler
        # As `_BaseDataLoaderIter.__init__` does: `iter(index sampler)`, then the base seed; a
        # multi-process iterator's `_reset` calls `iter(index sampler)` once more.
        stream = iter(sampler)
        if self.fresh_iterator:
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
            if loader.num_workers > 0:
                stream = iter(sampler)
        hasher = hashlib.blake2b(digest_size=16)
        if type(sampler) is BatchSampler and _not_started(stream, BatchSampler.__iter__):
            # torch's own BatchSampler cuts its sampler's index stream into chunks (as skipping.py
            # reasons): the stream and the cut, without a Python step per batch.
            hasher.update(f"batches of {sampler.batch_size}, drop_last={sampler.drop_last}:".encode())
            stream = iter(sampler.sampler)
        _feed_stream(hasher, stream)
        return hasher.hexdigest(), at


def snapshot(data: Any) -> SamplerSnapshot | None:
    """A `SamplerSnapshot` of `data`'s index sampler as it is now; None for data without indices, or
    when the sampler cannot be copied (it holds a generator object, a lock, ...): then no order is
    compared, only lengths.

    Args:
        data: an iterable of batches, e.g. a `DataLoader`.

    Example:

    ```python
    taken = snapshot(loader)  # before iter(loader)
    ```
    """
    sampler = index_sampler(data)
    if sampler is None:
        return None
    if type(sampler) in _STATELESS:
        copied = copy.copy(sampler)
    elif type(sampler) is BatchSampler and type(sampler.sampler) in _STATELESS:
        copied = copy.copy(sampler)
        copied.sampler = copy.copy(sampler.sampler)
    else:  # a sampler of the user's: a deep copy, so that drawing from it leaves its own random state alone
        shared = [data.dataset, data.generator, *_generators_of(sampler)]
        memo: dict[int, Any] = {id(obj): obj for obj in shared if obj is not None}
        try:
            copied = copy.deepcopy(sampler, memo)
        except Exception:  # any object may refuse to be copied: the order is then not compared
            return None
    fresh = not (data.persistent_workers and data.num_workers > 0 and getattr(data, "_iterator", None) is not None)
    return SamplerSnapshot(data, copied, fresh)


def _generators_of(sampler: Any) -> list[torch.Generator]:
    """The `generator`s of a sampler and of a batch sampler's sampler: what `EpochIterator` saves and
    restores, so the copy must draw from them, not from copies."""
    found = []
    for owner in (sampler, getattr(sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            found.append(generator)
    return found


def _feed_stream(hasher: Any, stream: Iterator[Any]) -> None:
    """Feed the first `MAX_INDICES` items of `stream` to `hasher`, in chunks: flat integer indices as
    64-bit words, anything else (lists of indices from a batch sampler) by `repr`."""
    left = MAX_INDICES
    while left > 0:
        chunk = list(itertools.islice(stream, min(_CHUNK, left)))
        if not chunk:
            return
        left -= len(chunk)
        try:
            hasher.update(array.array("q", chunk).tobytes())
        except (TypeError, OverflowError, ValueError):
            hasher.update(repr(chunk).encode())


def _feed_batch(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        hasher.update(f"{value.dtype}{tuple(value.shape)}@{value.device.type}".encode())
        if value.device.type != "cpu":  # by dtype and shape only: reading it would synchronise with the device
            return
        try:
            tensor = value.detach().resolve_conj().resolve_neg().contiguous()
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # a sparse, quantized or nested tensor: by dtype and shape only
            hasher.update(b"?")
        return
    if isinstance(value, np.ndarray):
        hasher.update(f"{value.dtype}{value.shape}".encode())
        hasher.update(np.ascontiguousarray(value).tobytes())
        return
    spec = node(value)
    if spec is not None:
        keys, children, _ = spec
        hasher.update(f"{type(value).__qualname__}[{len(children)}]".encode())
        for key, child in zip(keys, children, strict=True):
            hasher.update(repr(key).encode())
            _feed_batch(hasher, child)
    elif isinstance(value, float) and math.isnan(value):
        hasher.update(b"nan")
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.generic)):
        hasher.update(repr(value).encode())
    else:  # an object of another kind: its repr may hold an address, so only its type counts
        hasher.update(type(value).__qualname__.encode())


def batch_digest(batch: Any) -> str:
    """A digest of a batch's content: its tensors' dtypes, shapes and bytes (a tensor on an accelerator
    by dtype and shape only: reading it would wait for the device), its structure and plain values.

    Args:
        batch: a batch as the loader yields it (tensors, arrays, numbers, strings, containers of them).

    Example:

    ```python
    batch_digest((torch.zeros(2), torch.ones(2))) == batch_digest((torch.zeros(2), torch.ones(2)))  # True
    ```
    """
    hasher = hashlib.blake2b(digest_size=16)
    _feed_batch(hasher, batch)
    return hasher.hexdigest()


_END = object()


def first_batch(data: Iterable[Any], iterator: Iterator[Any]) -> tuple[Iterator[Any], str | None]:
    """The digest of the first batch of the pass `iterator = iter(data)` starts, and an iterator that
    still yields every batch of the pass. A list or tuple of batches is read at `data[0]`; from
    anything else the first batch is fetched now (it would be at once anyway) and put in front again.

    Args:
        data: the data (data without indices: a list of batches, a generator, an `IterableDataset`'s loader).
        iterator: `iter(data)`, nothing taken from it yet.

    Returns:
        `(iterator, digest)`: digest None for an empty pass.

    Example:

    ```python
    iterator, digest = first_batch(stream, iter(stream))
    ```
    """
    if isinstance(data, (list, tuple)):
        return iterator, batch_digest(data[0]) if len(data) else None
    first = next(iterator, _END)
    if first is _END:
        return iterator, None
    return itertools.chain((first,), iterator), batch_digest(first)
