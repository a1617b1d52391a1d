"""Exact resume in every ordinary configuration, in process.

The promise: kill a run at any moment, rerun the same command, and it resumes exactly and ends as a run
that never stopped: bit-identical weights and optimizer states, the same History, the same CSV rows,
the same decisions of every stateful callback.

Each case trains once and "crashes": a test callback raises at a chosen point (the first or the last
training batch of an epoch, during validation, or between two epochs). The rerun then builds
everything afresh, as a new process running the same command would: the model from the same init
seed, the optimizers, the loaders and every callback, with another `torch.manual_seed` just before
`fit` so that randomness the backup does not restore shows. It calls the same `fit` with the same
`BackupAndRestore` directory, and its outcome is compared with that of a run that never crashed (the
reference, shared between the cases of one configuration).

Batches hold 8 samples (a power of two) so that running means are sums that float64 holds exactly
whatever the order of the additions: a mismatch is a resume bug, never rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, TensorDataset

import torchcallbacks as tc

EPOCHS = 4
BATCHES = 5  # batches in one pass of the training loader
STEPS = 3  # steps_per_epoch, shorter than a pass: the iterator carries over between epochs
BATCH_SIZE = 8
INIT_SEED = 0  # the model's initial weights: the same in every run, as a script seeding it would
FIT_SEED = 1234  # torch.manual_seed before fit in the reference and the crashed run
RERUN_SEED = 98765  # ... and in the rerun: randomness that is not restored shows
CRASH_EPOCH = 1  # crashes happen in the second epoch (between epochs: at the third's begin)

# Where the crash happens, and the backup frequency that puts a backup right before it.
#   first_batch: end of epoch 1's first batch; batch backups every 2 steps put one there (step 6 or 4).
#   last_batch: end of epoch 1's last batch; backed up there (step 10 or 6): resumes into validation.
#   validation: epoch 1's second validation batch; the latest backup is a few batches back (every 3).
#   between_epochs: the third epoch's on_epoch_begin; the backup of epoch 1's end is the latest.
CRASH_POINTS = {"first_batch": 2, "last_batch": 2, "validation": 3, "between_epochs": "epoch"}


class Crashed(Exception):
    """The simulated crash."""


# -- data, model, optimizers ---------------------------------------------------------------------------
def _tensors() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * BATCH_SIZE, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(len(x), 1, generator=generator)
    return x, y


X, Y = _tensors()


class NoisyDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Augmentation in the loader's worker processes: every sample gets fresh `torch.randn` noise, drawn
    from the worker's generator (seeded from the loader's base seed, drawn when an iterator starts)."""

    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return X[index] + 0.1 * torch.randn(4), Y[index]


def _train_loader(kind: str) -> DataLoader[Any]:
    if kind == "workers":
        # from a forkserver: a worker forked from a process with other threads may crash
        return DataLoader(NoisyDataset(), batch_size=BATCH_SIZE, shuffle=True, num_workers=2,
                          multiprocessing_context="forkserver")
    if kind == "generator":
        # The loader's own generator draws the shuffle order: the global RNG does not.
        return DataLoader(TensorDataset(X, Y), batch_size=BATCH_SIZE, shuffle=True,
                          generator=torch.Generator().manual_seed(7))
    return DataLoader(TensorDataset(X, Y), batch_size=BATCH_SIZE, shuffle=True)


def _model() -> torch.nn.Module:
    torch.manual_seed(INIT_SEED)
    # BatchNorm for buffers, Dropout so that the random state matters.
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1)
    )


def _optimizers(model: torch.nn.Module, count: int) -> list[torch.optim.Optimizer]:
    first, norm, last = model[0], model[1], model[4]
    if count == 1:
        return [torch.optim.Adam([
            {"params": [*first.parameters(), *norm.parameters()], "lr": 0.1},
            {"params": last.parameters(), "lr": 0.2},
        ])]
    # Two optimizers over disjoint parameters, of two kinds (Adam moments, SGD momentum buffers).
    return [
        torch.optim.Adam([{"params": first.parameters(), "lr": 0.01}, {"params": norm.parameters(), "lr": 0.005}]),
        torch.optim.SGD(last.parameters(), lr=0.05, momentum=0.9),
    ]


class CloseEnough:
    """A stateful metric (update/compute/reset, torchmetrics style): the fraction of predictions within
    0.5 of the target, counted over the epoch. `state_dict`/`load_state_dict` expose its counts."""

    mode = "max"

    def __init__(self) -> None:
        self.hits = 0
        self.total = 0

    def update(self, y_pred: torch.Tensor, y: torch.Tensor) -> None:
        self.hits += int(((y_pred - y).abs() < 0.5).sum())
        self.total += len(y)

    def compute(self) -> float:
        return self.hits / self.total if self.total else 0.0

    def reset(self) -> None:
        self.hits = self.total = 0

    def state_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.hits, self.total = int(state["hits"]), int(state["total"])


# -- the stateful callbacks under test ---------------------------------------------------------------
def halve_after_first_epoch(epoch: int, lr: float) -> float:
    return lr if epoch == 0 else lr * 0.5


def _early_stopping(restore_best_weights: bool) -> tc.EarlyStopping:
    # No epoch improves on the first by min_delta, whatever the data: it stops at epoch 2, after every
    # crash point (see test_the_reference_runs_exercise_their_callbacks); with restore_best_weights
    # the final weights are epoch 0's, which only the crashed run computed.
    return tc.EarlyStopping(monitor="val_loss", min_delta=1e9, patience=2, restore_best_weights=restore_best_weights)


MakeCallbacks = Callable[[Path, list[torch.optim.Optimizer]], list[tc.Callback]]

class Score(tc.Callback):
    """Adds `score` to the epoch logs: SCORES[epoch], a curve whose best (lowest) epoch is neither the
    first nor the last by construction, whatever the floating point of the machine."""

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs["score"] = SCORES[epoch]


SCORES = [3.0, 1.0, 2.0, 4.0][:EPOCHS]

CONFIGS: dict[str, MakeCallbacks] = {
    # save_best_only on a monitor whose best epoch is in the middle: a later epoch's file would show a
    # best value that the resumed run lost.
    "ckpt_best": lambda d, opts: [Score(), tc.ModelCheckpoint(
        d / "ckpt" / "best.safetensors", monitor="score", mode="min", save_best_only=True, save_weights_only=True)],
    # Batch-level saves (every 2 steps) of the best 2 by the running loss: files are written and deleted.
    "ckpt_top2": lambda d, opts: [tc.ModelCheckpoint(
        d / "ckpt" / "m-{epoch:02d}-{batch:02d}.safetensors", monitor="loss", save_best_only=True,
        save_weights_only=True, max_to_keep=2, save_freq=2)],
    "early_stop": lambda d, opts: [_early_stopping(False)],
    "early_stop_best_weights": lambda d, opts: [_early_stopping(True)],
    # Nothing improves by min_delta: reduces at epochs 1 and 3 (cooldown 2 in between).
    "reduce_lr": lambda d, opts: [tc.ReduceLROnPlateau(monitor="val_loss", min_delta=1e9, factor=0.5, patience=1,
                                                       cooldown=2)],
    # One torch scheduler per optimizer: two LearningRateSchedulers in one list with two optimizers.
    "step_lr": lambda d, opts: [
        tc.LearningRateScheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5 + 0.2 * i))
        for i, opt in enumerate(opts)
    ],
    "lr_function": lambda d, opts: [tc.LearningRateScheduler(halve_after_first_epoch)],
    "ema": lambda d, opts: [tc.SwapEMAWeights(decay=0.9)],
    "ema_swap_on_epoch": lambda d, opts: [tc.SwapEMAWeights(decay=0.9, swap_on_epoch=True)],
    "terminate_on_nan": lambda d, opts: [tc.TerminateOnNaN(check_every=2)],
    "csv_append": lambda d, opts: [tc.CSVLogger(d / "log.csv", append=True)],
    # Several at once (the positions of BackupAndRestore are tried with these).
    "mixed": lambda d, opts: [
        tc.ModelCheckpoint(d / "ckpt" / "best.safetensors", monitor="val_loss", save_best_only=True,
                           save_weights_only=True),
        _early_stopping(True),
        tc.CSVLogger(d / "log.csv", append=True),
    ],
}
MATRIX_CONFIGS = [name for name in CONFIGS if name != "mixed"]


# -- the crash ---------------------------------------------------------------------------------------
class Crash(tc.Callback):
    """Raises `Crashed` at `point` when armed; counts the training batches of the run either way. It is
    in the list of every run (disarmed in the reference and the rerun), so the lists are the same."""

    stops_in_sync = True

    def __init__(self, point: str, steps: int, armed: bool) -> None:
        super().__init__()
        self.point, self.steps, self.armed = point, steps, armed
        self.trained = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.trained += 1
        last = self.steps - 1
        if self.armed and self.loop.epoch == CRASH_EPOCH and (
            (self.point == "first_batch" and batch == 0) or (self.point == "last_batch" and batch == last)
        ):
            raise Crashed(self.point)

    def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.armed and self.point == "validation" and self.loop.epoch == CRASH_EPOCH and batch == 1:
            raise Crashed(self.point)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.armed and self.point == "between_epochs" and epoch == CRASH_EPOCH + 1:
            raise Crashed(self.point)


# -- one run and what it leaves behind ---------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    config: str
    steps: int | None = None  # steps_per_epoch
    optimizers: int = 1
    loader: str = "plain"  # "plain", "generator" (the loader's own generator), "workers" (num_workers=2)
    metric: bool = False  # a stateful metric
    backup_at: str = "last"  # where BackupAndRestore is in the list: "first", "middle", "last"
    crash_first: bool = False  # the crash callback first in the list: it raises before any backup of its batch
    insert_in_front: bool = False  # the rerun has one more stateful callback, in front of the list
    save_freq: int | str | None = None  # None: the crash point's (CRASH_POINTS)

    def reference_key(self) -> Setup:
        """What the uninterrupted run depends on (not the backup's place or frequency, nor the crash)."""
        return replace(self, backup_at="last", crash_first=False, insert_in_front=False, save_freq=None)


@dataclass
class Outcome:
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    learning_rates: list[list[float]]
    history_epoch: list[int]
    history: dict[str, list[Any]]
    observed: dict[str, Any] = field(default_factory=dict)  # per callback: its decisions
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # EMA weights, checkpoint files' contents
    texts: dict[str, str] = field(default_factory=dict)  # CSV files
    trained: int = 0  # training batches this run computed


def _name(path: Any) -> str | None:
    return None if path is None else Path(path).name


def _observe(callbacks: list[tc.Callback], outcome: Outcome) -> None:
    """The observable results of the configuration's callbacks, keyed by their place in its list."""
    for index, callback in enumerate(callbacks):
        key = f"{index}:{type(callback).__name__}"
        if isinstance(callback, tc.ModelCheckpoint):
            directory = Path(callback.filepath).parent
            # A write that crashed half-way may leave a hidden temporary file; it is no checkpoint.
            files = sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) if directory.is_dir() else []
            outcome.observed[key] = {"best": callback.best, "best_path": _name(callback.best_path),
                                     "last_path": _name(callback.last_path), "files": files}
            for file in files:
                for name, tensor in load_file(directory / file).items():
                    outcome.tensors[f"{key} {file} {name}"] = tensor
        elif isinstance(callback, tc.EarlyStopping):
            outcome.observed[key] = {"stopped_epoch": callback.stopped_epoch, "best": callback.best,
                                     "best_epoch": callback.best_epoch, "wait": callback.wait}
        elif isinstance(callback, tc.ReduceLROnPlateau):
            outcome.observed[key] = {"best": callback.best, "wait": callback.wait,
                                     "cooldown_counter": callback.cooldown_counter}
        elif isinstance(callback, tc.LearningRateScheduler):
            scheduler = callback.scheduler.state_dict() if callback.scheduler is not None else None
            outcome.observed[key] = {"last_applied": callback.last_applied, "scheduler": scheduler}
        elif isinstance(callback, tc.SwapEMAWeights):
            outcome.observed[key] = {"num_updates": callback.num_updates}
            if callback.ema_model is not None:
                for name, tensor in callback.ema_model.module.state_dict().items():
                    outcome.tensors[f"{key} ema {name}"] = tensor.detach().clone()
        elif isinstance(callback, tc.CSVLogger):
            outcome.texts[key] = Path(callback.filename).read_text(encoding="utf-8")


def _optimizer_state(optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for i, optimizer in enumerate(optimizers):
        for param, state in optimizer.state_dict()["state"].items():
            for name, value in state.items():
                flat[f"optimizer {i} param {param} {name}"] = value.clone() if isinstance(value, torch.Tensor) else value
    return flat


def train(setup: Setup, run_dir: Path, backup_dir: Path | None, crash: Crash, seed: int, rerun: bool = False) -> Outcome:
    """One run of the "command" for `setup`, everything built afresh. Raises `Crashed` when `crash` is
    armed and its point is reached."""
    model = _model()
    optimizers = _optimizers(model, setup.optimizers)
    callbacks = CONFIGS[setup.config](run_dir, optimizers)
    listed = list(callbacks)
    if backup_dir is not None:
        save_freq = setup.save_freq if setup.save_freq is not None else CRASH_POINTS[crash.point]
        backup = tc.BackupAndRestore(backup_dir, save_freq=save_freq)
        at = {"first": 0, "middle": 1, "last": len(listed)}[setup.backup_at]
        listed.insert(at, backup)
    if setup.crash_first:
        listed.insert(0, crash)
    else:
        listed.append(crash)
    if rerun and setup.insert_in_front:
        # Another EarlyStopping, on another monitor, that never stops and logs nothing: the run is
        # unchanged, but every other callback has moved one place down the list.
        listed.insert(0, tc.EarlyStopping(monitor="loss", patience=100))
    metrics = {"close": CloseEnough()} if setup.metric else None
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="BackupAndRestore comes before")  # today's order warning
        history = tc.fit(
            model, _train_loader(setup.loader), optimizer=optimizers if len(optimizers) > 1 else optimizers[0],
            loss=torch.nn.functional.mse_loss, metrics=metrics, epochs=EPOCHS, verbose=0,
            validation_data=DataLoader(TensorDataset(X[:16], Y[:16]), batch_size=BATCH_SIZE),
            steps_per_epoch=setup.steps, callbacks=listed,
        )
    outcome = Outcome(
        weights={name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        optimizer_state=_optimizer_state(optimizers),
        learning_rates=[[group["lr"] for group in optimizer.param_groups] for optimizer in optimizers],
        history_epoch=list(history.epoch),
        history={name: list(values) for name, values in history.history.items()},
        trained=crash.trained,
    )
    _observe(callbacks, outcome)
    return outcome


# -- comparing ---------------------------------------------------------------------------------------
def _tensor_differences(what: str, reference: dict[str, Any], resumed: dict[str, Any]) -> list[str]:
    if reference.keys() != resumed.keys():
        missing = sorted(reference.keys() - resumed.keys())
        extra = sorted(resumed.keys() - reference.keys())
        return [f"{what}: keys differ (missing {missing[:3]}, extra {extra[:3]})"]
    differ = [
        key for key, value in reference.items()
        if not (torch.equal(value, resumed[key]) if isinstance(value, torch.Tensor) else value == resumed[key])
    ]
    return [f"{what}: {len(differ)} of {len(reference)} differ ({', '.join(differ[:3])})"] if differ else []


def differences(reference: Outcome, resumed: Outcome) -> list[str]:
    """Every way `resumed` differs from `reference`, one short line each (empty: identical)."""
    problems = _tensor_differences("weights", reference.weights, resumed.weights)
    problems += _tensor_differences("optimizer state", reference.optimizer_state, resumed.optimizer_state)
    if reference.learning_rates != resumed.learning_rates:
        problems.append(f"learning rates: {reference.learning_rates} != {resumed.learning_rates}")
    if reference.history_epoch != resumed.history_epoch:
        problems.append(f"History.epoch: {reference.history_epoch} != {resumed.history_epoch}")
    if reference.history != resumed.history:
        keys = sorted(set(reference.history) | set(resumed.history))
        differ = [k for k in keys if reference.history.get(k) != resumed.history.get(k)]
        problems.append(f"History.history differs in {differ}")
    for key, value in reference.observed.items():
        if resumed.observed.get(key) != value:
            got = resumed.observed.get(key) or {}
            fields = {f: (v, got.get(f)) for f, v in value.items() if got.get(f) != v}
            problems.append(f"{key} (reference, resumed): {fields}")
    problems += _tensor_differences("checkpoint/EMA tensors", reference.tensors, resumed.tensors)
    for key, text in reference.texts.items():
        got = resumed.texts.get(key, "")
        if got != text:
            problems.append(f"{key} file: {len(text.splitlines())} lines expected, {len(got.splitlines())} "
                            f"written, first difference at line {_first_difference(text, got)}")
    if resumed.trained >= reference.trained:
        problems.append(f"did not resume: the rerun trained {resumed.trained} batches, the whole run {reference.trained}")
    return problems


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)):
        if x != y:
            return i + 1
    return min(len(a.splitlines()), len(b.splitlines())) + 1


# -- the reference runs, one per configuration -----------------------------------------------------------
class References:
    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.outcomes: dict[Setup, Outcome] = {}

    def __call__(self, setup: Setup) -> Outcome:
        key = setup.reference_key()
        if key not in self.outcomes:
            # No BackupAndRestore at all: the reference is a run that never crashed nor backed up.
            crash = Crash("none", setup.steps or BATCHES, armed=False)
            self.outcomes[key] = train(key, self.factory.mktemp("reference"), None, crash, FIT_SEED)
        return self.outcomes[key]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """Tiny tensors: intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory)


def crash_and_rerun(setup: Setup, point: str, tmp_path: Path, backup_dir: Path | None = None) -> Outcome:
    """Train until the crash at `point`, then rerun afresh with the same backup directory (or
    `backup_dir`) and return the rerun's outcome."""
    steps = setup.steps or BATCHES
    with pytest.raises(Crashed):
        train(setup, tmp_path, tmp_path / "backup", Crash(point, steps, armed=True), FIT_SEED)
    return train(setup, tmp_path, backup_dir or tmp_path / "backup", Crash(point, steps, armed=False), RERUN_SEED,
                 rerun=True)


def check_resume(setup: Setup, point: str, tmp_path: Path, references: References) -> None:
    reference = references(setup)
    resumed = crash_and_rerun(setup, point, tmp_path)
    problems = differences(reference, resumed)
    assert not problems, "; ".join(problems)


# -- the matrix ----------------------------------------------------------------------------------------
# The cases after test_resume_is_exact each isolate one property, in the simplest setting (one optimizer,
# full passes, unless the property is about steps_per_epoch); the matrix covers the combinations.
@pytest.mark.parametrize("optimizers", [1, 2], ids=["one_optimizer", "two_optimizers"])
@pytest.mark.parametrize("steps", [None, STEPS], ids=["full_passes", "steps_per_epoch"])
@pytest.mark.parametrize("point", list(CRASH_POINTS))
@pytest.mark.parametrize("config", MATRIX_CONFIGS)
def test_resume_is_exact(config: str, point: str, steps: int | None, optimizers: int, tmp_path: Path,
                         references: References) -> None:
    check_resume(Setup(config, steps, optimizers), point, tmp_path, references)


@pytest.mark.parametrize("save_freq", [1, "epoch"], ids=["save_freq_1", "save_freq_epoch"])
@pytest.mark.parametrize("point", ["first_batch", "last_batch", "validation"])
@pytest.mark.parametrize("config", ["mixed", "ckpt_top2", "reduce_lr"])
def test_resume_is_exact_when_the_crash_beats_the_backup_of_its_batch(
    config: str, point: str, save_freq: int | str, tmp_path: Path, references: References
) -> None:
    """The crash callback first in the list: the crashing batch is never backed up (a kill just before
    the write), so the rerun repeats work the crashed run had done, e.g. an epoch end's CSV row and
    checkpoint (save_freq=1 at the first batch: the backup is the previous epoch's last batch, before
    its validation)."""
    check_resume(Setup(config, crash_first=True, save_freq=save_freq), point, tmp_path, references)


@pytest.mark.parametrize("point", ["first_batch", "validation", "between_epochs"])
@pytest.mark.parametrize("backup_at", ["first", "middle", "last"], ids=lambda at: f"backup_{at}")
def test_the_place_of_backup_and_restore_in_the_list_does_not_matter(
    backup_at: str, point: str, tmp_path: Path, references: References
) -> None:
    check_resume(Setup("mixed", backup_at=backup_at), point, tmp_path, references)


@pytest.mark.parametrize("point", ["first_batch", "between_epochs"])
@pytest.mark.parametrize("config", ["mixed", "step_lr", "reduce_lr"])
def test_a_callback_inserted_in_front_on_the_rerun(config: str, point: str, tmp_path: Path,
                                                     references: References) -> None:
    """Callback states are found by a stable key, not by the place in the list: one more callback in
    front on the rerun (an EarlyStopping that never stops) changes nothing for the others."""
    check_resume(Setup(config, insert_in_front=True), point, tmp_path, references)


@pytest.mark.parametrize("point", ["first_batch", "last_batch"])
@pytest.mark.parametrize("steps", [None, STEPS], ids=["full_passes", "steps_per_epoch"])
def test_a_stateful_metric_resumes_mid_epoch(steps: int | None, point: str, tmp_path: Path,
                                             references: References) -> None:
    """`CloseEnough` counts over the epoch: the resumed epoch's value covers the batches before the crash."""
    check_resume(Setup("csv_append", steps, metric=True), point, tmp_path, references)


@pytest.mark.parametrize("steps", [None, STEPS], ids=["full_passes", "steps_per_epoch"])
def test_worker_side_augmentation_resumes_mid_epoch(steps: int | None, tmp_path: Path,
                                                    references: References) -> None:
    """num_workers=2, noise drawn in the workers: their seeds come from the base seed the loader draws
    when an iterator starts, so a resumed epoch must redraw it from the same random state."""
    check_resume(Setup("early_stop_best_weights", steps, loader="workers"), "first_batch", tmp_path, references)


@pytest.mark.parametrize("point", ["first_batch", "between_epochs"])
@pytest.mark.parametrize("steps", [None, STEPS], ids=["full_passes", "steps_per_epoch"])
def test_a_loader_with_its_own_generator_resumes(steps: int | None, point: str, tmp_path: Path,
                                                 references: References) -> None:
    """`DataLoader(generator=...)`: the shuffle order comes from the loader's generator, which a fresh
    process creates anew from its seed."""
    check_resume(Setup("ckpt_best", steps, loader="generator"), point, tmp_path, references)


# -- the harness itself ----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizers", [1, 2], ids=["one_optimizer", "two_optimizers"])
@pytest.mark.parametrize("steps", [None, STEPS], ids=["full_passes", "steps_per_epoch"])
def test_the_reference_runs_exercise_their_callbacks(steps: int | None, optimizers: int,
                                                     references: References) -> None:
    """The configurations do what the matrix relies on: EarlyStopping stops mid-run, after every crash
    point, at a best epoch before them; the learning rates change; top-2 deletes files; the best
    checkpoint's epoch is not the last."""
    total = EPOCHS * (steps or BATCHES)
    for config in ("early_stop", "early_stop_best_weights"):
        outcome = references(Setup(config, steps, optimizers))
        assert outcome.observed["0:EarlyStopping"]["stopped_epoch"] == CRASH_EPOCH + 1, config
        assert outcome.observed["0:EarlyStopping"]["best_epoch"] < CRASH_EPOCH, config
        assert outcome.history_epoch == list(range(CRASH_EPOCH + 2)), config
    start = [[0.1, 0.2]] if optimizers == 1 else [[0.01, 0.005], [0.05]]
    for config, factors in (("reduce_lr", 0.25), ("lr_function", 0.125)):
        outcome = references(Setup(config, steps, optimizers))
        assert outcome.learning_rates[0] == [lr * factors for lr in start[0]], config
        assert outcome.trained == total
    stepped = references(Setup("step_lr", steps, optimizers)).learning_rates
    expected = [[lr * (0.5 + 0.2 * i) ** EPOCHS for lr in lrs] for i, lrs in enumerate(start)]
    assert [pytest.approx(lrs) for lrs in stepped] == expected
    top2 = references(Setup("ckpt_top2", steps, optimizers)).observed["0:ModelCheckpoint"]
    assert len(top2["files"]) == 2
    best = references(Setup("ckpt_best", steps, optimizers)).observed["1:ModelCheckpoint"]
    assert best["files"] == ["best.safetensors"]
    # The best epoch is not the last: a later epoch's file would show a best value that was lost.
    assert best["best"] == min(SCORES) and SCORES.index(min(SCORES)) < EPOCHS - 1
    csv = references(Setup("csv_append", steps, optimizers)).texts["0:CSVLogger"]
    assert len(csv.splitlines()) == EPOCHS + 1


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_the_comparison_sees_a_rerun_that_does_not_resume(point: str, tmp_path: Path,
                                                          references: References) -> None:
    """A rerun pointed at an empty backup directory starts over: the comparison must report it."""
    setup = Setup("mixed", STEPS, 2)
    rerun = crash_and_rerun(setup, point, tmp_path, backup_dir=tmp_path / "empty")
    problems = differences(references(setup), rerun)
    assert any(p.startswith("weights") for p in problems), problems
    assert any(p.startswith("did not resume") for p in problems), problems


def test_callbacks_see_every_optimizer(tmp_path: Path) -> None:
    """With `optimizer=[a, b]` callbacks get `self.optimizers == [a, b]`; `self.optimizer` is `a`."""
    model = _model()
    optimizers = _optimizers(model, 2)
    seen: dict[str, Any] = {}

    class Look(tc.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            seen["optimizers"], seen["optimizer"] = getattr(self, "optimizers", None), self.optimizer

    tc.fit(model, _train_loader("plain"), optimizer=optimizers, loss=torch.nn.functional.mse_loss, epochs=1,
           verbose=0, callbacks=[Look()])
    assert seen["optimizer"] is optimizers[0]
    assert isinstance(seen["optimizers"], list), f"self.optimizers is {seen['optimizers']!r}, not a list"
    assert len(seen["optimizers"]) == 2
    assert all(a is b for a, b in zip(seen["optimizers"], optimizers, strict=True))
