"""Per-step overhead of `torchcallbacks.fit` against a plain PyTorch loop (and peers, when installed).

The workload is deliberately tiny (an MLP 32 -> 64 -> 1, batch 32, SGD, one thread), so that the loop's
own cost is as visible as it can be. Every contender trains the same model on the same pre-made batches
(200 per epoch); after a warm-up, epoch times are divided by the number of steps. Each contender runs
right after a run of the plain loop, round after round, and each round's ratio is taken against that
plain run (so slow drifts of a shared machine cancel); the fastest epochs are compared too (noise only
ever adds time).

The "usual kit" rows add ModelCheckpoint (the whole training state, every epoch, fsynced; the second
row with `async_save=True`), EarlyStopping, LearningRateScheduler, TensorBoard and CSVLogger. Epochs
of `fit` are timed from one epoch's start to the next one's, so the epoch-end work counts.

Usage: python benchmarks/overhead.py [--epochs 5] [--rounds 10] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import torchcallbacks as tc

STEPS = 200
#: The clock epochs are timed with: wall time, or with --clock cpu this process's CPU time (all threads),
#: which a shared virtual machine's stolen time does not inflate.
CLOCK = time.perf_counter
BATCH = 32


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 32, generator=generator)
    y = x[:, :1] * 2 + 0.1 * torch.randn(STEPS * BATCH, 1, generator=generator)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def plain_loop(batches, epochs: int, trained: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None) -> list[float]:
    model, optimizer = trained if trained is not None else make_model()
    times = []
    for _ in range(epochs):
        start = CLOCK()
        model.train()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
        times.append(CLOCK() - start)
    return times


def plain_epochs(batches) -> Callable[[], float]:
    """One epoch of the plain loop per call, on a model of its own, timed: the reference run next to
    each epoch of `fit` (see `EpochTimer`)."""
    model, optimizer = make_model()

    def epoch() -> float:
        return plain_loop(batches, 1, (model, optimizer))[0]

    return epoch


class EpochTimer(tc.Callback):
    """Times from one epoch's start to the next one's, so that all epoch-end work (every callback's
    `on_epoch_end`, the epoch logs' reduction) counts; the last epoch (followed by train end) is not
    timed, so a run of n + 1 epochs gives n times. With `reference`, an epoch of the plain loop runs
    (and is timed) between two epochs of `fit`, outside their times: each epoch of `fit` then has a
    plain epoch right before and right after it, and drifts slower than an epoch cancel out."""

    dispatch_order = -2  # before every other callback's on_epoch_begin

    def __init__(self, reference: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.times: list[float] = []
        self.reference = reference
        self.reference_times: list[float] = []
        self._start: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        now = CLOCK()
        if self._start is not None:
            self.times.append(now - self._start)
        if self.reference is not None:
            self.reference_times.append(self.reference())
        self._start = CLOCK()

    def paired_ratios(self) -> list[float]:
        """Each timed epoch against the mean of the plain epochs right before and after it."""
        pairs = itertools.pairwise(self.reference_times)
        return [t / ((a + b) / 2) for t, (a, b) in zip(self.times, pairs, strict=True)]


def kit(directory: str, async_save: bool) -> list[tc.Callback]:
    """The usual callbacks: a full-state checkpoint every epoch, early stopping, a schedule, TensorBoard
    and a CSV log."""
    return [
        tc.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch:03d}.safetensors"), monitor="loss", max_to_keep=2,
                           async_save=async_save),
        tc.EarlyStopping(monitor="loss", patience=1000),
        tc.LearningRateScheduler(lambda epoch, lr: lr * 0.999),
        tc.TensorBoard(os.path.join(directory, "logs")),
        tc.CSVLogger(os.path.join(directory, "log.csv")),
    ]


def mlflow_logger(directory: str) -> list[tc.Callback]:
    """MLflowLogger at its default update_freq="epoch", to a sqlite store in `directory`."""
    uri = f"sqlite:///{os.path.join(directory, 'mlflow.db')}"
    return [tc.MLflowLogger(tracking_uri=uri, experiment_name="overhead", strict=True)]


def torchcallbacks_fit(
    verbose: int, with_kit: bool = False, async_save: bool = False, tracker: Callable[[str], list[tc.Callback]] | None = None
) -> Callable[..., list[float]]:
    def run(batches, epochs: int, paired: list[float] | None = None) -> list[float]:
        """The epoch times; with `paired`, plain epochs run between them and `paired` gets the ratios."""
        model, optimizer = make_model()
        timer = EpochTimer(plain_epochs(batches) if paired is not None else None)
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryDirectory() as directory:
            callbacks: list[tc.Callback] = [timer] + ([tc.ProgbarLogger(file=out)] if verbose else [])
            callbacks += kit(directory, async_save) if with_kit else []
            callbacks += tracker(directory) if tracker is not None else []
            tc.fit(model, batches, optimizer=optimizer, loss=F.mse_loss, epochs=epochs + 1, verbose=verbose,
                   callbacks=callbacks)
        if paired is not None:
            paired.extend(timer.paired_ratios())
        return timer.times

    return run


def fit_contenders() -> dict[str, Callable[..., list[float]]]:
    """The rows of `fit`, by name: verbose 0 and 1, the usual kit with a synchronous and an
    asynchronous checkpoint, and MLflowLogger logging each epoch to a sqlite store when mlflow is
    installed (also run by instructions.py)."""
    contenders = {
        "torchcallbacks.fit verbose=0": torchcallbacks_fit(0),
        "torchcallbacks.fit verbose=1": torchcallbacks_fit(1),
        "fit verbose=0 + usual kit": torchcallbacks_fit(0, with_kit=True),
        "fit verbose=0 + kit, async": torchcallbacks_fit(0, with_kit=True, async_save=True),
    }
    if importlib.util.find_spec("mlflow"):
        contenders["fit verbose=0 + MLflowLogger"] = torchcallbacks_fit(0, tracker=mlflow_logger)
    return contenders


def ignite_loop(batches, epochs: int) -> list[float]:
    from ignite.engine import Events, create_supervised_trainer

    model, optimizer = make_model()
    trainer = create_supervised_trainer(model, optimizer, F.mse_loss)
    times: list[float] = []
    start = [0.0]
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: start.__setitem__(0, CLOCK()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: times.append(CLOCK() - start[0]))
    trainer.run(batches, max_epochs=epochs)
    return times


def poutyne_loop(batches, epochs: int) -> list[float]:
    from poutyne import Callback, Model

    class Timer(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch_number, logs):
            self._start = CLOCK()

        def on_epoch_end(self, epoch_number, logs):
            self.times.append(CLOCK() - self._start)

    network, optimizer = make_model()
    timer = Timer()
    Model(network, optimizer, F.mse_loss).fit_generator(batches, epochs=epochs, verbose=False, callbacks=[timer])
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="measured epochs per contender and round")
    parser.add_argument("--warmup", type=int, default=2, help="epochs dropped at the start of each run")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    fit_runs = fit_contenders()
    contenders: dict[str, Callable[..., list[float]]] = dict(fit_runs)
    if importlib.util.find_spec("ignite"):
        contenders["ignite"] = ignite_loop
    if importlib.util.find_spec("poutyne"):
        contenders["poutyne"] = poutyne_loop

    # Paired: the plain loop runs right before every contender, and each round's ratio is taken
    # against that run, so that the machine's slow drifts (a shared machine) cancel out.
    batches = make_batches()
    plain: list[float] = []
    plain_all: list[float] = []
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: dict[str, list[float]] = {name: [] for name in contenders}
    epoch_ratios: dict[str, list[float]] = {name: [] for name in fit_runs}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            reference_times = plain_loop(batches, args.warmup + args.epochs)[args.warmup :]
            plain_all.extend(reference_times)
            reference = statistics.median(reference_times)
            if name in epoch_ratios:
                paired: list[float] = []
                times = run(batches, args.warmup + args.epochs, paired)[args.warmup :]
                epoch_ratios[name].extend(paired[args.warmup :])
            else:
                times = run(batches, args.warmup + args.epochs)[args.warmup :]
            plain.append(reference)
            samples[name].extend(times)
            ratios[name].append(statistics.median(times) / reference)

    print(f"torch {torch.__version__}, 1 thread, MLP 32-64-1, batch {BATCH}, {STEPS} steps/epoch, "
          f"{args.rounds} rounds of {args.epochs} epochs, {args.clock} clock")
    print("paired: median over rounds of the contender's median epoch against the plain loop's run just before it; "
          "epoch-paired: median over epochs of each epoch against the plain epochs run right before and after it "
          "(fit only); fastest: the fastest epoch of all against the plain loop's fastest (noise only ever adds time)")
    print(f"| {'loop':<30} | {'us/step':>8} | {'paired':>6} | {'epoch-paired':>12} | {'fastest':>8} | {'ratio':>6} |")
    print(f"|{'-' * 32}|{'-' * 9}:|{'-' * 7}:|{'-' * 13}:|{'-' * 9}:|{'-' * 7}:|")
    fastest = min(plain_all) / STEPS
    print(f"| {'plain PyTorch loop':<30} | {statistics.median(plain) / STEPS * 1e6:8.1f} | {1:5.2f}x | {1:11.2f}x "
          f"| {fastest * 1e6:8.1f} | {1:5.2f}x |")
    for name, times in samples.items():
        per_step = statistics.median(times) / STEPS
        best = min(times) / STEPS
        by_epoch = f"{statistics.median(epoch_ratios[name]):11.2f}x" if name in epoch_ratios else f"{'-':>12}"
        print(f"| {name:<30} | {per_step * 1e6:8.1f} | {statistics.median(ratios[name]):5.2f}x | {by_epoch} "
              f"| {best * 1e6:8.1f} | {best / fastest:5.2f}x |")


if __name__ == "__main__":
    main()
