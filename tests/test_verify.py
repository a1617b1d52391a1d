"""verify_resume: it passes on pipelines that resume exactly and names the cause on those that do not
(a callback with unsaved state, an augmentation drawing from its own torch.Generator, a sampler and an
IterableDataset without state, data changed between the crash and the rerun, dropout drawing from a
generator of its own, a make_run that is not seeded)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset

import torchcallbacks as tc

X = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
Y = X.sum(1, keepdim=True)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


def _run(data: Any = None, model: Any = _mlp, callbacks: Any = (), **more: Any) -> dict[str, Any]:
    """fit's arguments: 6 batches of 8 per epoch, seeded first as a script would seed itself."""
    torch.manual_seed(0)
    random.seed(0)
    net = model()
    return {
        "model": net, "x": data if data is not None else DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True),
        "optimizer": torch.optim.Adam(net.parameters(), lr=0.01), "loss": torch.nn.functional.mse_loss,
        "callbacks": list(callbacks), **more,
    }


def _good() -> dict[str, Any]:
    return _run(
        validation_data=DataLoader(TensorDataset(X[:16], Y[:16]), batch_size=8),
        callbacks=[tc.EarlyStopping(monitor="val_loss", patience=5), tc.ReduceLROnPlateau(patience=1),
                   tc.LearningRateScheduler(lambda epoch, lr: lr * 0.9), tc.History()],
    )


def test_a_pipeline_that_resumes_exactly_passes_at_every_default_point() -> None:
    report = tc.verify_resume(_good, epochs=3)
    assert report.ok, str(report)
    assert [i.point for i in report.interruptions] == [
        "after step 3 (batch 3 of epoch 1)", "at the end of epoch 1, after its backup",
        "inside the validation of epoch 2", "after step 9 (batch 3 of epoch 2), its backup written asynchronously",
    ]
    assert report.runs == 9 and report.steps == 18
    text = str(report)
    assert text.startswith("verify_resume: OK: 4 interrupted and resumed run(s)") and "9 runs of fit" in text
    assert "each step's model inputs" in text and text.count("the same at every step") == 4


def _accuracy(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_pred.argmax(dim=1) == y).float().mean()


def test_the_readme_tour_with_its_file_writing_callbacks_passes(tmp_path: Path) -> None:
    """The README's fit tour (CSVLogger, TensorBoard, ModelCheckpoint, a metric): files on disk make
    some attributes differ between runs (CSVLogger.append_header, its writer), which are not state."""

    def make_run() -> dict[str, Any]:
        torch.manual_seed(0)
        features = torch.randn(256, 64)
        labels = features[:, :10].argmax(dim=1)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        return {
            "model": model, "x": DataLoader(TensorDataset(features[:192], labels[:192]), batch_size=32, shuffle=True),
            "optimizer": torch.optim.Adam(model.parameters(), lr=3e-3), "loss": torch.nn.functional.cross_entropy,
            "metrics": {"accuracy": _accuracy},
            "validation_data": DataLoader(TensorDataset(features[192:], labels[192:]), batch_size=64),
            "callbacks": [tc.TensorBoard(str(tmp_path / "logs")), tc.CSVLogger(str(tmp_path / "training.csv")),
                          tc.ModelCheckpoint(str(tmp_path / "best.safetensors"), monitor="val_loss", save_best_only=True)],
        }

    report = tc.verify_resume(make_run, epochs=3)
    assert report.ok, str(report)


def test_keras_arrays_and_names_pass() -> None:
    def make_run() -> dict[str, Any]:
        torch.manual_seed(0)
        x = torch.randn(200, 8)
        model = torch.nn.Sequential(torch.nn.Linear(8, 2), torch.nn.Softmax(dim=1))
        return {"model": model, "x": x, "y": (x[:, 0] > 0).long(), "batch_size": 32, "validation_split": 0.2,
                "optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
                "class_weight": {0: 1.0, 1: 2.0}}

    report = tc.verify_resume(make_run, epochs=3)
    assert report.ok, str(report)


class Counter(tc.Callback):
    """Counts batches and does not save the count."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.n += 1


class SavedCounter(Counter):
    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]


class NoisyDataset(Dataset):
    """An augmentation drawing from a torch.Generator of its own, which nothing saves."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return X[i] + 0.1 * torch.randn(4, generator=self.generator), Y[i]


class OwnOrder(Sampler[int]):
    """A sampler shuffling with a random.Random of its own, without a state_dict."""

    def __init__(self) -> None:
        self.random = random.Random(0)

    def __len__(self) -> int:
        return len(X)

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(X)))
        self.random.shuffle(order)
        return iter(order)


class Stream(IterableDataset):
    """An IterableDataset without state_dict, drawing from a generator of its own."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(len(X)):
            x = torch.randn(4, generator=self.generator)
            yield x, x.sum(0, keepdim=True)


class OwnDropout(torch.nn.Module):
    """Dropout drawing from a torch.Generator of its own, which nothing saves."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x * torch.bernoulli(torch.full_like(x, 0.8), generator=self.generator) / 0.8
        return self.linear(x)


class Changing:
    """make_run whose data changes from its third call on: the rerun after the interrupted run."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        x = X if self.calls < 3 else X.flip(0)
        return _run(DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True))


def _unseeded() -> dict[str, Any]:
    model = _mlp()  # built before the seed: each call draws other initial weights
    return {**_run(), "model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=0.01)}


BROKEN = {
    "callback with unsaved state": (
        lambda: _run(callbacks=[Counter()]), None,
        "callback Counter has state that its state_dict does not return (attribute `n`): it differs right after "
        "the resume from step 3 (restored wrong, or not saved)",
    ),
    "augmentation with its own generator": (
        lambda: _run(DataLoader(NoisyDataset(), batch_size=8, shuffle=True)), None,
        "batch 4 of epoch 1 (step 4) got other inputs (other samples, or the same ones augmented differently) "
        "although the global random states were the same",
    ),
    "sampler without state": (
        lambda: _run(DataLoader(TensorDataset(X, Y), batch_size=8, sampler=OwnOrder())), "epoch_end:1",
        "batch 1 of epoch 2 (step 7) got other inputs",
    ),
    "IterableDataset without state_dict": (
        lambda: _run(DataLoader(Stream(), batch_size=8)), "epoch_end:1", "batch 1 of epoch 2 (step 7) got other inputs",
    ),
    "data changed before the rerun": (Changing(), None, "batch 4 of epoch 1 (step 4) got other inputs"),
    "dropout with its own generator": (
        lambda: _run(model=OwnDropout), None,
        "model tensor `linear.weight` differs after step 4 although the step's inputs and the state before it were "
        "the same: the forward pass drew random numbers that are not saved",
    ),
    "make_run not seeded": (
        _unseeded, None, "the run differs from the uninterrupted one before it was interrupted (at step 1): make_run() "
        "does not build the same run twice",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_pipeline_that_does_not_resume_exactly_is_caught_naming_the_cause(case: str) -> None:
    make_run, point, message = BROKEN[case]
    report = tc.verify_resume(make_run, epochs=2, interrupt_at=[point or 3])
    assert not report.ok
    (interruption,) = report.interruptions
    assert interruption.difference is not None and interruption.difference.startswith(message), interruption.difference
    assert "verify_resume: FAILED" in str(report) and message in str(report)


def test_the_callback_with_its_state_saved_passes() -> None:
    assert tc.verify_resume(lambda: _run(callbacks=[SavedCounter()]), epochs=2, interrupt_at=[3, 8]).ok


def test_a_sharded_fsdp2_model_resumes_exactly(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def sharded() -> torch.nn.Module:
        model = _mlp()
        mesh = init_device_mesh("cpu", (1,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        report = tc.verify_resume(lambda: _run(model=sharded), epochs=2, interrupt_at=[3, "epoch_end:1"])
    finally:
        dist.destroy_process_group()
    assert report.ok, str(report)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"interrupt_at": [0]}, ValueError, r"interrupt_at: expected global steps 1\.\.11 .* received 0"),
        ({"interrupt_at": [12]}, ValueError, r"received 12"),
        ({"interrupt_at": ["epoch_end:3"]}, ValueError, r"1-based epochs\s+1\.\.2 .* received 'epoch_end:3'"),
        ({"interrupt_at": ["middle"]}, ValueError, r"received 'middle'"),
        ({"epochs": 0}, ValueError, "epochs"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        tc.verify_resume(_run, **{"epochs": 2, **kwargs})


def test_make_run_must_leave_epochs_and_backups_to_it() -> None:
    with pytest.raises(ValueError, match="make_run: leave 'epochs' out"):
        tc.verify_resume(lambda: {**_run(), "epochs": 3}, epochs=2)
    with pytest.raises(ValueError, match="make_run: leave BackupAndRestore out"):
        tc.verify_resume(lambda: _run(callbacks=[tc.BackupAndRestore("b")]), epochs=2)
    with pytest.raises(TypeError, match="make_run: expected it to return a dict"):
        tc.verify_resume(lambda: [1], epochs=2)  # type: ignore[arg-type, return-value]


_FIXTURE_TEST = '''
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc


class Counter(tc.Callback):
    def __init__(self):
        super().__init__()
        self.n = 0

    def on_train_batch_end(self, batch, logs=None):
        self.n += 1


def make_run(callbacks=()):
    torch.manual_seed(0)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    model = torch.nn.Linear(4, 1)
    return {"model": model, "x": DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.01), "loss": torch.nn.functional.mse_loss,
            "callbacks": list(callbacks)}


def test_resumes(verify_resume):
    assert verify_resume(make_run, epochs=2, interrupt_at=[2]).runs == 3


def test_does_not_resume(verify_resume):
    verify_resume(lambda: make_run([Counter()]), epochs=2, interrupt_at=[2])
'''


@pytest.mark.slow  # a pytest process of its own, which finds the fixture through the pytest11 entry point
def test_the_pytest_fixture_passes_and_fails_with_the_report(tmp_path: Path) -> None:
    (tmp_path / "test_pipeline.py").write_text(_FIXTURE_TEST)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "1 failed, 1 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    assert "callback Counter has state that its state_dict does not return (attribute `n`)" in out.stdout


def _counted() -> dict[str, Any]:
    return _run(callbacks=[Counter()])


@pytest.mark.slow  # a new Python process per interruption point, killed with SIGKILL
def test_runs_killed_with_sigkill_resume_exactly_and_a_broken_one_is_still_named() -> None:
    """sigkill=True: each interrupted run is a process of its own killed at its point (an asynchronous
    backup possibly cut mid-write: the rerun then resumes from the backup before it)."""
    report = tc.verify_resume(_good, epochs=2, interrupt_at=[3, "epoch_end:1", "async:8"], sigkill=True)
    assert report.ok, str(report)
    assert report.runs == 7
    broken = tc.verify_resume(_counted, epochs=2, interrupt_at=[3], sigkill=True)
    assert not broken.ok
    assert "callback Counter has state that its state_dict does not return (attribute `n`)" in str(broken)


def test_sigkill_needs_a_make_run_a_new_process_can_import() -> None:
    with pytest.raises(ValueError, match="sigkill=True runs make_run in a new process, so it must be a module-level"):
        tc.verify_resume(lambda: _good(), epochs=2, sigkill=True)


def test_the_report_adds_what_the_resume_said_of_the_data_order() -> None:
    """The backup's data-order fingerprint saw the sampler draw another order: the report says so."""
    report = tc.verify_resume(lambda: _run(DataLoader(TensorDataset(X, Y), batch_size=8, sampler=OwnOrder())), epochs=2,
                              interrupt_at=["epoch_end:1"])
    (interruption,) = report.interruptions
    assert interruption.difference is not None
    assert interruption.difference.endswith(
        "; the resume warned (DataOrderWarning): the data order of epoch 2 differs: the sampler drew other indices from "
        "the same random state: is it seeded from the loader's generator or the global one? (A sampler shuffling with a "
        "random.Random or a torch.Generator of its own that the backup does not hold draws another order on resume; so "
        "do another sampler, shuffle setting or world size.)"), interruption.difference
