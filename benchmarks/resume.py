"""Resume benchmark: time to the first batch after a mid-epoch resume, with and without loading the
skipped batches.

The dataset is map-style; its `__getitem__` busy-waits about 100 us (a `time.perf_counter` loop, so
the cost is the same on every machine and does not depend on torch's thread pool) and returns a small
tensor. The loader has batch size 8 and 10,000 batches per epoch, `num_workers=0`. Measured, in one
process, from the creation of the iterator to the first batch in hand:

- (a) a fresh start: `next(iter(loader))`;
- (b) a resume after 9,000 batches: `next(iterate_from(loader, 9000))` (advances the index sampler only);
- (c) the old way: `iter(loader)`, fetch and discard 9,000 batches, then `next()`.

(a) and (b) are medians over `--repeats` runs, (c) is a single run (it takes 9,000 x 8 x 100 us = 7 s
and more); the batch (b) yields is checked against the one (c) yields from the same seed. The goal is (b) within 2x of (a). Both a shuffled loader (RandomSampler, the shuffle order
is drawn when the pass starts) and a sequential one are measured.

Run: `PYTHONPATH=. python benchmarks/resume.py [--batches 10000] [--skip 9000] [--repeats 21]`. Prints a
table of times and the ratios to (a).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

from torchcallbacks.training.skipping import iterate_from

SAMPLE_COST_S = 100e-6
BATCH_SIZE = 8


class SlowDataset(Dataset[torch.Tensor]):
    """`n` samples of 16 floats, each taking about 100 us to "load" (busy-wait)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        deadline = time.perf_counter() + SAMPLE_COST_S
        while time.perf_counter() < deadline:
            pass
        return torch.full((16,), float(index))


def seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def skip_then_next(loader: DataLoader, skip: int) -> torch.Tensor:
    return next(iterate_from(loader, skip))


def consume_then_next(loader: DataLoader, skip: int) -> torch.Tensor:
    """The old way (and, with `skip=0`, a fresh start): fetch `skip` batches, return the next."""
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator)
    return next(iterator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=10_000, help="batches per epoch")
    parser.add_argument("--skip", type=int, default=9_000, help="batches already trained")
    parser.add_argument("--repeats", type=int, default=21, help="runs of (a) and (b); the median is shown")
    args = parser.parse_args()
    dataset = SlowDataset(args.batches * BATCH_SIZE)

    print(
        f"map-style dataset, ~{SAMPLE_COST_S * 1e6:.0f} us per sample (busy-wait), batch size {BATCH_SIZE}, "
        f"{args.batches} batches per epoch, num_workers=0, torch {torch.__version__}"
    )
    print(f"{'loader':<12} {'measurement':<44} {'time to first batch':>20} {'vs (a)':>8}")
    for name, shuffle in (("shuffled", True), ("sequential", False)):
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=shuffle)
        torch.manual_seed(0)
        start = time.perf_counter()
        expected = consume_then_next(loader, args.skip)
        consumed = time.perf_counter() - start
        # The batch after the skip is the one the old way yields there, from the same random state.
        torch.manual_seed(0)
        assert torch.equal(skip_then_next(loader, args.skip), expected)

        fresh = seconds(partial(consume_then_next, loader, 0), args.repeats)
        skipped = seconds(partial(skip_then_next, loader, args.skip), args.repeats)
        rows = (
            ("(a) fresh start: next(iter(loader))", fresh),
            (f"(b) next(iterate_from(loader, {args.skip}))", skipped),
            (f"(c) old way: fetch {args.skip} batches, then next()", consumed),
        )
        for label, value in rows:
            print(f"{name:<12} {label:<44} {value * 1e3:>17.2f} ms {value / fresh:>7.1f}x")
        verdict = "met" if skipped <= 2 * fresh else "NOT met"
        print(f"{name:<12} goal (b) within 2x of (a): {verdict}")


if __name__ == "__main__":
    main()
