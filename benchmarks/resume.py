"""Resume benchmark: time to the first batch after a mid-epoch resume, with and without loading the
skipped batches.

The dataset is map-style; its `__getitem__` busy-waits about 100 us (a `time.perf_counter` loop, so
the cost is the same on every machine and does not depend on torch's thread pool) and returns a small
tensor. The loader has batch size 8 and 10,000 batches per epoch, `num_workers=0`. Measured, in one
process, from the creation of the iterator to the first batch in hand:

- (a) a fresh start: `next(iter(loader))`;
- (b) a resume after 9,000 batches: `next(iterate_from(loader, 9000))` (advances the index sampler only);
- (c) the old way: `iter(loader)`, fetch and discard 9,000 batches, then `next()`;
- (d) / (e) the same through `fit`: from the call to the end of the first trained batch, fresh and
  resumed by `BackupAndRestore` from a backup taken after 9,000 batches (restore phase included).

(a) and (b) are medians over `--repeats` runs, (c) is a single run (it takes 9,000 x 8 x 100 us = 7 s
and more); the batch (b) yields is checked against the one (c) yields from the same seed. The goal is (b) within 2x of (a). Both a shuffled loader (RandomSampler, the shuffle order
is drawn when the pass starts) and a sequential one are measured.

Run: `PYTHONPATH=. python benchmarks/resume.py [--batches 10000] [--skip 9000] [--repeats 21]`. Prints a
table of times and the ratios to (a).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

import torchcallbacks as tc
from torchcallbacks.training.skipping import iterate_from

SAMPLE_COST_S = 100e-6
BATCH_SIZE = 8


class SlowDataset(Dataset[torch.Tensor]):
    """`n` samples of 16 floats, each taking about 100 us to "load" (busy-wait; `slow=False` skips it,
    to write the backup that the fit rows resume from quickly)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.slow = True

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        deadline = time.perf_counter() + SAMPLE_COST_S
        while self.slow and time.perf_counter() < deadline:
            pass
        return torch.full((16,), float(index))


class _FirstBatch(tc.Callback):
    """Records when the first training batch of a run is done, then stops the run."""

    def __init__(self) -> None:
        super().__init__()
        self.at = 0.0

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        self.at = time.perf_counter()
        self.model.stop_training = True


class _Crash(Exception):
    pass


class _CrashAt(tc.Callback):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        if self.loop.global_step == self.step:
            raise _Crash  # the backup of this step is kept, as after a kill


def _fit(dataset: SlowDataset, callbacks: list[tc.Callback]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
           train_step=lambda batch: model(batch).mean().detach(), epochs=1, verbose=0, callbacks=callbacks)


def fit_to_first_batch(dataset: SlowDataset, backup_dir: str | None) -> float:
    """Seconds from `fit()` to the end of its first trained batch, resuming from the backup in
    `backup_dir` if given (kept for the next repeat)."""
    first = _FirstBatch()
    callbacks: list[tc.Callback] = [first]
    if backup_dir is not None:
        callbacks.append(tc.BackupAndRestore(backup_dir, save_freq=False, delete_checkpoint=False))
    start = time.perf_counter()
    _fit(dataset, callbacks)
    return first.at - start


def write_backup(dataset: SlowDataset, backup_dir: str, step: int) -> None:
    """A backup after `step` batches of the epoch (written with the sample cost switched off)."""
    dataset.slow = False
    try:
        _fit(dataset, [_CrashAt(step), tc.BackupAndRestore(backup_dir, save_freq=step)])
    except _Crash:
        pass
    finally:
        dataset.slow = True


def seconds(fn: Callable[[], object], repeats: int, result: bool = False) -> float:
    """Median time of `fn()` (or of what it returns, a time in seconds, with `result=True`)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(float(value) if result else time.perf_counter() - start)  # type: ignore[arg-type]
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

    # The same through fit: a fresh run against one resumed by BackupAndRestore at batch `skip`.
    with tempfile.TemporaryDirectory() as backup_dir:
        write_backup(dataset, backup_dir, args.skip)
        fresh = seconds(partial(fit_to_first_batch, dataset, None), args.repeats, result=True)
        resumed = seconds(partial(fit_to_first_batch, dataset, backup_dir), args.repeats, result=True)
    print(f"{'fit':<12} {'(d) fresh fit: to the end of the first batch':<44} {fresh * 1e3:>17.2f} ms {1.0:>7.1f}x")
    print(f"{'fit':<12} {f'(e) fit resumed at batch {args.skip}':<44} {resumed * 1e3:>17.2f} ms {resumed / fresh:>7.1f}x")
    print(f"{'fit':<12} goal (e) within 2x of (d): {'met' if resumed <= 2 * fresh else 'NOT met'}")


if __name__ == "__main__":
    main()
