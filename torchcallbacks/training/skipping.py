"""Resuming a pass over a loader part-way through: skip the batches already trained, cheaply and exactly.

On a mid-epoch resume the loop needs `iter(loader)` positioned after the batches the interrupted run
already trained. Fetching those batches and throwing them away is exact but costs what loading them
costs. For a single-process `DataLoader` over a map-style dataset the batches are fully determined by
the index sampler, so `iterate_from` advances only the sampler: no sample is loaded, no batch collated.

Exactness: the batches yielded after the skip are the ones an uninterrupted pass yields next, provided
the caller restored the random state the pass started with before calling `iterate_from` (that is what
`iter(loader)` and the sampler draw their seeds from). Work that the skipped batches would have done in
`__getitem__` or `collate_fn` (e.g. random augmentation) is not done on the fast path, so random draws
made there are not replayed: the caller restores the random state captured after the skipped batches
(the checkpoint's) once `iterate_from` returns, as it does after fetching them the old way.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader

from torchcallbacks.checks import check_count

try:  # private names of torch's DataLoader; without them every skip takes the slow path
    from torch.utils.data.dataloader import _DatasetKind, _SingleProcessDataLoaderIter
except ImportError:  # pragma: no cover - torch 2.13 has them
    _DatasetKind = None  # type: ignore[assignment,misc]
    _SingleProcessDataLoaderIter = None  # type: ignore[assignment,misc]


def iterate_from(data: Iterable[Any], skip: int) -> Iterator[Any]:
    """iter(data), positioned after its first `skip` batches.

    `iter(data)` is called exactly once, so the random numbers a `DataLoader` draws when an iterator is
    created (its base seed) are drawn as in an uninterrupted pass. Then:

    - fast path, a `DataLoader` with `num_workers == 0` over a map-style dataset (any sampler or
      `batch_sampler`, `RandomSampler` with or without a generator, `DistributedSampler`,
      `loader.generator`, `drop_last`, also `batch_size=None`): the iterator's index sampler is
      advanced `skip` times (torch's own `BatchSampler`: its sampler by `skip * batch_size` indices,
      then the rest is batched as before); no sample is loaded and no batch is collated. The sampler
      draws its random numbers (e.g. the shuffle seed) exactly as it would while yielding those batches.
    - slow path, everything else (worker processes, which prefetch at `iter()` and draw random numbers
      per sample on their side; an `IterableDataset`; a generator; a list of batches; a `DataLoader`
      subclass with its own iterator): `skip` batches are fetched and discarded.

    The fast path relies on private parts of torch's DataLoader: the class
    `_SingleProcessDataLoaderIter` (the exact type of the iterator) and `_DatasetKind`, and the
    iterator's attributes `_dataset_kind`, `_index_sampler`, `_sampler_iter` (what `_next_index()`
    reads; advanced, or replaced by the rest of the same index stream) and `_num_yielded` (counts the
    skipped batches as `__next__` would). Where they are missing (another torch version) the slow path
    is taken.

    Args:
        data: an iterable of batches, e.g. a `torch.utils.data.DataLoader`.
        skip: the number of leading batches to leave out (>= 0). 0 returns `iter(data)` itself; a skip
            at or beyond the end of the data returns an exhausted iterator.

    Returns:
        An iterator whose first item is batch number `skip` of the pass `iter(data)` starts.

    Raises:
        ValueError: `skip` is not an integer >= 0.

    Example:

    ```python
    torch.set_rng_state(state["rng_at_epoch_start"])  # the random state the pass started with
    batches = iterate_from(loader, skip=state["batch"])
    torch.set_rng_state(state["rng_at_checkpoint"])  # as after training the skipped batches
    for batch in batches:
        train(batch)
    ```
    """
    check_count(skip, "skip")
    iterator = iter(data)
    if skip == 0:
        return iterator
    if _can_skip_indices(data, iterator):
        return _skip_indices(iterator, skip)
    return _skip_fetching(iterator, skip)


def _can_skip_indices(data: Iterable[Any], iterator: Iterator[Any]) -> bool:
    """Whether `iterator` is torch's single-process iterator over a map-style dataset, with the private
    attributes the fast path touches. The exact type is required: a subclass may load data differently."""
    return (
        _SingleProcessDataLoaderIter is not None
        and isinstance(data, DataLoader)
        and type(iterator) is _SingleProcessDataLoaderIter
        and getattr(iterator, "_dataset_kind", None) == getattr(_DatasetKind, "Map", object())
        and getattr(iterator, "_sampler_iter", None) is not None
        and isinstance(getattr(iterator, "_num_yielded", None), int)
    )


def _skip_indices(iterator: Any, skip: int) -> Iterator[Any]:
    """Advance the index sampler of a `_SingleProcessDataLoaderIter` by `skip` batches and count them in
    `_num_yielded`, as `__next__` would have. `__next__` takes each batch of indices from
    `_sampler_iter` (`iter(index sampler)`) through `_next_index()`; the exact type check in
    `_can_skip_indices` keeps both torch's own. A skip past the end returns an empty iterator.
    """
    batch_sampler = getattr(iterator, "_index_sampler", None)
    if type(batch_sampler) is BatchSampler and _not_started(iterator._sampler_iter, BatchSampler.__iter__):
        complete = _skip_in_batch_sampler(iterator, batch_sampler, skip)
    else:
        complete = _advance(iterator._sampler_iter, skip)
    if not complete:
        return iter(())
    iterator._num_yielded += skip
    return iterator


def _skip_in_batch_sampler(iterator: Any, batch_sampler: BatchSampler, skip: int) -> bool:
    """torch's own `BatchSampler` cuts the index stream of its sampler into consecutive chunks of
    `batch_size` (dropping a short last one with `drop_last`), one Python generator step per batch.
    Skipping `skip * batch_size` indices of the stream and batching the rest with a new `BatchSampler`
    gives the same batches, without a Python step per skipped batch. `iter(batch_sampler)` (the
    iterator's `_sampler_iter`, checked by `_not_started`) has not run, so it has not called
    `iter(sampler)` yet; that is done here, once, as it would have been. False when the pass ends within
    the skip."""
    indices = iter(batch_sampler.sampler)
    complete = _advance(indices, skip * batch_sampler.batch_size)
    iterator._sampler_iter = iter(BatchSampler(indices, batch_sampler.batch_size, batch_sampler.drop_last))
    return complete


def _not_started(iterator: Any, function: Any) -> bool:
    """Whether `iterator` is a generator made by calling the generator function `function` that has not
    run yet (so nothing in its body, e.g. `iter(sampler)`, has happened)."""
    return (
        inspect.isgenerator(iterator)
        and iterator.gi_code is getattr(function, "__code__", None)
        and inspect.getgeneratorstate(iterator) == inspect.GEN_CREATED
    )


def _advance(iterator: Iterator[Any], count: int) -> bool:
    """Advance `iterator` by `count` >= 1 items (all there are, if fewer), in C; False if there were fewer.

    A range iterator (what `SequentialSampler` returns) is moved in one step through its pickle
    protocol (`__reduce__` gives the range and the position, `__setstate__` sets the position) instead
    of creating the `count` int objects it would yield."""
    if type(iterator) in _RANGE_ITERATORS:
        moved: Any = iterator
        _, (numbers,), position = moved.__reduce__()
        target = min(position + count, len(numbers))
        moved.__setstate__(target)
        return target == position + count
    return next(itertools.islice(iterator, count - 1, None), _END) is not _END


def _skip_fetching(iterator: Iterator[Any], skip: int) -> Iterator[Any]:
    """Fetch and discard `skip` batches (all there are, if fewer)."""
    return iterator if _advance(iterator, skip) else iter(())


_END = object()
_RANGE_ITERATORS = (type(iter(range(1))), type(iter(range(2**64, 2**64 + 1))))
