"""iterate_from: the batches after a skip are those an uninterrupted pass yields next; the fast path loads
no skipped sample."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    TensorDataset,
)

from torchcallbacks.training import skipping
from torchcallbacks.training.skipping import _advance, iterate_from

N = 42  # not a multiple of the batch size, so the last batch is short (or dropped)
SEED = 1234


def numbered(n: int = N) -> TensorDataset:
    """Sample i is (i, 10 * i): every batch shows which samples it holds."""
    index = torch.arange(n)
    return TensorDataset(index, 10 * index)


class CountingDataset(Dataset[torch.Tensor]):
    """Sample i is tensor([i]); counts `__getitem__` calls."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([index])


class AugmentedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random augmentation: each sample draws from the global torch RNG (in a worker: the worker's)."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return torch.tensor(index), torch.rand(3)


class RandomBatches(Sampler[list[int]]):
    """A custom batch sampler that draws from the global RNG at the start and for every batch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n).tolist()
        start = 0
        while start < self.n:
            size = int(torch.randint(1, 6, ()).item())
            yield order[start : start + size]
            start += size

    def __len__(self) -> int:  # not exact (sizes are random); DataLoader only needs it for len()
        return self.n


class SubclassedBatchSampler(BatchSampler):
    """Not exactly torch's BatchSampler: skipped one batch at a time, not by index."""


class RandomStream(IterableDataset[torch.Tensor]):
    def __init__(self, n: int = N) -> None:
        self.n = n

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.n):
            yield torch.rand(2)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def check_resume(make_data: Callable[[], Iterable[Any]], skip: int) -> list[Any]:
    """Batches `skip..end` of an uninterrupted pass equal `iterate_from(data, skip)` from the same seed;
    returns them. Each run builds its data anew, as a resumed process would."""
    torch.manual_seed(SEED)
    uninterrupted = list(make_data())
    assert len(uninterrupted) > skip
    torch.manual_seed(SEED)
    resumed = list(iterate_from(make_data(), skip))
    assert same(resumed, uninterrupted[skip:])
    # The skip moved the position: what follows it is not the start of the pass.
    assert not same(resumed, uninterrupted[: len(resumed)])
    return resumed


def test_shuffled_loader_global_rng() -> None:
    check_resume(lambda: DataLoader(numbered(), batch_size=4, shuffle=True), skip=3)


def test_shuffled_loader_with_generator() -> None:
    check_resume(
        lambda: DataLoader(
            numbered(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7)
        ),
        skip=5,
    )


def test_sampler_with_its_own_generator() -> None:
    def make() -> DataLoader:
        dataset = numbered()
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(3))
        return DataLoader(dataset, batch_size=4, sampler=sampler)

    check_resume(make, skip=4)


def test_sampler_with_replacement_and_num_samples() -> None:
    def make() -> DataLoader:
        dataset = numbered()
        return DataLoader(
            dataset, batch_size=5, sampler=RandomSampler(dataset, replacement=True, num_samples=70)
        )

    check_resume(make, skip=9)


def test_custom_batch_sampler_drawing_per_batch() -> None:
    check_resume(lambda: DataLoader(numbered(), batch_sampler=RandomBatches(N)), skip=6)


def test_custom_batch_sampler_wrapping_a_sampler() -> None:
    def make() -> DataLoader:
        dataset = numbered()
        return DataLoader(
            dataset, batch_sampler=BatchSampler(RandomSampler(dataset), batch_size=3, drop_last=False)
        )

    check_resume(make, skip=7)


def test_distributed_sampler_rank_1_of_2() -> None:
    def make() -> DataLoader:
        dataset = numbered()
        sampler: DistributedSampler[int] = DistributedSampler(
            dataset, num_replicas=2, rank=1, shuffle=True, seed=5
        )
        sampler.set_epoch(3)
        return DataLoader(dataset, batch_size=4, sampler=sampler)

    resumed = check_resume(make, skip=2)
    # Rank 1's share only: rank 0 gets the other half of the epoch's permutation.
    rank0: DistributedSampler[int] = DistributedSampler(
        numbered(), num_replicas=2, rank=0, shuffle=True, seed=5
    )
    rank0.set_epoch(3)
    assert not set(torch.cat([x for x, _ in resumed]).tolist()) & set(list(rank0)[8:])


def test_drop_last() -> None:
    resumed = check_resume(lambda: DataLoader(numbered(), batch_size=4, shuffle=True, drop_last=True), skip=8)
    assert len(resumed) == N // 4 - 8
    assert all(len(x) == 4 for x, _ in resumed)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sequential_loader(drop_last: bool) -> None:
    resumed = check_resume(lambda: DataLoader(numbered(), batch_size=4, drop_last=drop_last), skip=3)
    assert torch.cat([x for x, _ in resumed]).tolist() == list(range(12, 40 if drop_last else N))


def test_batch_sampler_given_as_sampler_with_batch_size_none() -> None:
    def make() -> DataLoader:
        dataset = numbered()
        sampler = BatchSampler(RandomSampler(dataset), batch_size=5, drop_last=True)
        return DataLoader(dataset, batch_size=None, sampler=sampler)

    check_resume(make, skip=3)


def test_no_batching_batch_size_none() -> None:
    check_resume(lambda: DataLoader(numbered(), batch_size=None, shuffle=True), skip=10)


def test_plain_list_of_batches() -> None:
    batches = [torch.full((2,), float(i)) for i in range(6)]
    check_resume(lambda: batches, skip=2)


def test_generator_of_batches() -> None:
    check_resume(lambda: (torch.rand(2) for _ in range(6)), skip=4)


def test_iterable_dataset() -> None:
    check_resume(lambda: DataLoader(RandomStream(), batch_size=4), skip=3)


def test_worker_processes_take_the_slow_path_and_stay_exact() -> None:
    # Workers draw the augmentation on their side, seeded from the loader's base seed: identical batches.
    # Workers start from a forkserver: a worker forked from a test process that holds other threads
    # (pytest-xdist's, an earlier test's writer) crashed now and then with a segmentation fault.
    make = lambda: DataLoader(AugmentedDataset(), batch_size=4, shuffle=True, num_workers=2, timeout=60,  # noqa: E731
                              multiprocessing_context="forkserver")
    check_resume(make, skip=4)


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 4, "shuffle": True},
        {"batch_size": 4},
        {"batch_size": 4, "drop_last": True, "generator": torch.Generator().manual_seed(2)},
        {"batch_sampler": RandomBatches(N)},
        {"batch_size": 2, "sampler": DistributedSampler(CountingDataset(), num_replicas=2, rank=1)},
        {"batch_size": None, "shuffle": True},
    ],
    ids=["shuffled", "sequential", "drop-last-generator", "custom-batch-sampler", "distributed", "unbatched"],
)
def test_fast_path_loads_no_skipped_sample(options: dict[str, Any]) -> None:
    dataset = CountingDataset()
    iterator = iterate_from(DataLoader(dataset, **options), 7)
    assert dataset.calls == 0
    batch = next(iterator)
    assert dataset.calls == batch.shape[0]  # only the batch handed out was loaded
    assert iterator._num_yielded == 8  # type: ignore[attr-defined]  # consistent with 8 __next__ calls


def test_torchs_batch_sampler_is_skipped_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[type] = []
    original = skipping._skip_in_batch_sampler

    def spy(iterator: Any, batch_sampler: BatchSampler, skip: int) -> bool:
        taken.append(type(batch_sampler))
        return original(iterator, batch_sampler, skip)

    monkeypatch.setattr(skipping, "_skip_in_batch_sampler", spy)
    check_resume(lambda: DataLoader(numbered(), batch_size=4, shuffle=True), skip=3)
    assert taken == [BatchSampler]
    taken.clear()
    # A subclass may batch differently: it is advanced batch by batch.
    make = lambda: DataLoader(numbered(), batch_sampler=SubclassedBatchSampler(range(N), 4, False))  # noqa: E731
    check_resume(make, skip=3)
    assert taken == []


def test_slow_path_for_a_loader_subclass_with_its_own_iterator() -> None:
    class Wrapped(DataLoader):
        def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
            return (batch * 2 for batch in super().__iter__())

    dataset = CountingDataset()
    torch.manual_seed(SEED)
    uninterrupted = list(Wrapped(dataset, batch_size=4, shuffle=True))
    torch.manual_seed(SEED)
    dataset.calls = 0
    resumed = iterate_from(Wrapped(dataset, batch_size=4, shuffle=True), 3)
    assert dataset.calls == 12  # fetched and discarded: the wrapper may do anything with a batch
    assert same(list(resumed), uninterrupted[3:])


def test_augmenting_dataset_contract_restore_rng_after_the_skip() -> None:
    """The fast path does not run `__getitem__` for the skipped samples, so their torch.rand draws are
    not made. The caller restores the random state captured after the skipped batches (what a checkpoint
    holds) before the next batch is fetched; then the batches are identical."""
    skip = 5
    make = lambda: DataLoader(AugmentedDataset(), batch_size=4, shuffle=True)  # noqa: E731

    torch.manual_seed(SEED)
    iterator = iter(make())
    trained = [next(iterator) for _ in range(skip)]
    after_skipped = torch.get_rng_state()  # the checkpoint is taken here
    uninterrupted = list(iterator)
    assert len(trained) == skip

    torch.manual_seed(SEED)  # the random state the pass started with
    dataset = AugmentedDataset()
    resumed = iterate_from(DataLoader(dataset, batch_size=4, shuffle=True), skip)
    assert dataset.calls == 0
    torch.set_rng_state(after_skipped)
    assert same(list(resumed), uninterrupted)

    # Without the restore the shuffle order (drawn at the start) is right but the augmentation is not.
    torch.manual_seed(SEED)
    not_restored = list(iterate_from(make(), skip))
    assert same([x for x, _ in not_restored], [x for x, _ in uninterrupted])
    assert not same([a for _, a in not_restored], [a for _, a in uninterrupted])


def test_resume_in_a_later_epoch_from_the_epoch_start_state() -> None:
    loader = DataLoader(numbered(), batch_size=4, shuffle=True)
    torch.manual_seed(SEED)
    list(loader)  # epoch 0
    epoch_start = torch.get_rng_state()
    epoch_1 = list(loader)

    torch.set_rng_state(epoch_start)
    assert same(list(iterate_from(DataLoader(numbered(), batch_size=4, shuffle=True), 6)), epoch_1[6:])


def test_skip_zero_is_iter() -> None:
    batches = [1, 2, 3]
    assert list(iterate_from(batches, 0)) == batches
    torch.manual_seed(SEED)
    expected = list(DataLoader(numbered(), batch_size=4, shuffle=True))
    torch.manual_seed(SEED)
    assert same(list(iterate_from(DataLoader(numbered(), batch_size=4, shuffle=True), 0)), expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DataLoader(CountingDataset(), batch_size=4, shuffle=True),  # fast path
        lambda: DataLoader(CountingDataset(), batch_size=4),  # fast path, range iterator moved at once
        # fast path, one batch at a time (not torch's own BatchSampler)
        lambda: DataLoader(CountingDataset(), batch_sampler=SubclassedBatchSampler(range(N), 4, False)),
        lambda: DataLoader(RandomStream(), batch_size=4),  # slow path
        lambda: list(range(11)),  # slow path
    ],
    ids=["shuffled", "sequential", "custom-batch-sampler", "iterable-dataset", "list"],
)
@pytest.mark.parametrize("skip", [11, 12, 100])
def test_skip_at_or_beyond_the_end_gives_an_exhausted_iterator(
    make: Callable[[], Iterable[Any]], skip: int
) -> None:
    iterator = iterate_from(make(), skip)  # 11 batches in each
    assert next(iterator, None) is None
    assert next(iterator, None) is None


@pytest.mark.parametrize("numbers", [range(10), range(3, 30, 4), range(10, 0, -2), range(2**64, 2**64 + 10)])
def test_range_iterators_are_moved_like_any_iterator(numbers: range) -> None:
    for done in (0, 2):
        for count in (1, 3, 7, 8, 10, 11):
            moved, stepped = iter(numbers), iter(numbers)
            for _ in range(done):
                next(moved), next(stepped)
            complete = _advance(moved, count)
            taken = len(list(itertools.islice(stepped, count)))
            assert complete == (taken == count)
            assert list(moved) == list(stepped)


def test_skip_must_be_a_count() -> None:
    with pytest.raises(ValueError, match="skip"):
        iterate_from([1, 2], -1)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError, match="skip"):
            iterate_from([1, 2], bad)  # type: ignore[arg-type]
