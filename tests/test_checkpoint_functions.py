"""One layout for every training state: each writer's file (save_checkpoint, BackupAndRestore, a
full-state ModelCheckpoint), with two optimizers, a GradScaler and two schedulers, read by each reader
(load_checkpoint, BackupAndRestore's restore, LoopState.load_state_dict of read_training_state) into
fresh objects, to the same state bit for bit; and files of the layout save_checkpoint wrote before it
was built on LoopState (tests/data/save_checkpoint_format3.safetensors, written by that code) still load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_model
from safetensors import safe_open

import torchcallbacks as tc
from torchcallbacks.checkpoint import read_training_state
from torchcallbacks.checkpoint.encoding import encode
from torchcallbacks.checkpoint.files import STATE_KEY

DATA = Path(__file__).parent / "data"
EPOCHS, STEPS = 2, 3
# A reader's callbacks differ from a writer's (ModelCheckpoint keeps its own state): they are told so.
pytestmark = pytest.mark.filterwarnings("ignore:.*saved states that no callback takes")


class Run:
    """A model, two optimizers (Adam on the first layer, SGD with momentum on the last), a GradScaler
    and a scheduler for each optimizer; `seed` makes the initial weights."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = make_model()
        self.optimizers = [torch.optim.Adam(self.model[0].parameters(), lr=0.01),
                           torch.optim.SGD(self.model[2].parameters(), lr=0.1, momentum=0.9)]
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        self.schedulers = [torch.optim.lr_scheduler.StepLR(self.optimizers[0], step_size=1, gamma=0.5),
                           torch.optim.lr_scheduler.ExponentialLR(self.optimizers[1], gamma=0.9)]

    def step(self) -> None:
        loss = self.model(torch.randn(8, 4)).pow(2).mean()
        self.scaler.scale(loss).backward()
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def callbacks(self, callbacks: list[tc.Callback]) -> tc.CallbackList:
        listed = tc.CallbackList(callbacks, model=self.model, optimizer=self.optimizers)
        listed.loop.scaler = self.scaler
        return listed

    def train(self, callbacks: tc.CallbackList) -> None:
        """EPOCHS epochs of STEPS steps in a hand-written loop, the schedulers stepped at epoch ends."""
        callbacks.on_train_begin()
        for epoch in range(EPOCHS):
            callbacks.on_epoch_begin(epoch)
            for batch in range(STEPS):
                callbacks.on_train_batch_begin(batch)
                self.step()
                callbacks.on_train_batch_end(batch, {"loss": 1.0})
            for scheduler in self.schedulers:
                scheduler.step()
            callbacks.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1)})
        callbacks.on_train_end()

    def state(self, counters: tuple[int, int, int]) -> tuple[Any, dict[str, torch.Tensor]]:
        """Everything a reader restores, as JSON and tensors (what `_assert_same` compares)."""
        tensors: dict[str, torch.Tensor] = {}
        document = encode({
            "model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
            "scaler": self.scaler.state_dict(), "schedulers": [s.state_dict() for s in self.schedulers],
            "counters": list(counters),
        }, "", tensors)
        return document, tensors


def _assert_same(expected: tuple[Any, dict[str, torch.Tensor]], found: tuple[Any, dict[str, torch.Tensor]]) -> None:
    assert found[0] == expected[0]
    assert found[1].keys() == expected[1].keys()
    different = [k for k, v in expected[1].items() if v.dtype != found[1][k].dtype or not torch.equal(v, found[1][k])]
    assert not different, different


# -- writers: each trains a Run and writes its file at `path`; returns what the file holds ------------
def write_save_checkpoint(run: Run, path: Path) -> None:
    for _ in range(EPOCHS):
        for _ in range(STEPS):
            run.step()
        for scheduler in run.schedulers:
            scheduler.step()
    tc.save_checkpoint(run.model, path, run.optimizers, scaler=run.scaler, scheduler=run.schedulers,
                       epoch=EPOCHS, batch=0, global_step=EPOCHS * STEPS)


def write_backup_and_restore(run: Run, path: Path) -> None:
    backup = tc.BackupAndRestore(path.parent / "backup", scheduler=run.schedulers, delete_checkpoint=False)
    run.train(run.callbacks([backup]))
    shutil.move(backup.latest_path, path)


def write_model_checkpoint(run: Run, path: Path) -> None:
    callbacks = run.callbacks([tc.ModelCheckpoint(path, monitor="loss")])
    for i, scheduler in enumerate(run.schedulers):
        callbacks.loop.track(f"scheduler/{i}", scheduler)  # the names BackupAndRestore gives its schedulers
    run.train(callbacks)


WRITERS: dict[str, Callable[[Run, Path], None]] = {
    "save_checkpoint": write_save_checkpoint,
    "BackupAndRestore": write_backup_and_restore,
    "ModelCheckpoint": write_model_checkpoint,
}


# -- readers: each loads `path` into `run` (fresh objects) and returns the counters it read -------------
def read_load_checkpoint(run: Run, path: Path) -> tuple[int, int, int]:
    state = tc.load_checkpoint(run.model, path, run.optimizers, scaler=run.scaler, scheduler=run.schedulers)
    return state.epoch, state.batch, state.global_step


def read_backup_and_restore(run: Run, path: Path) -> tuple[int, int, int]:
    directory = path.parent / "restore"
    directory.mkdir()
    shutil.copy(path, directory / tc.BackupAndRestore.LATEST)
    backup = tc.BackupAndRestore(directory, scheduler=run.schedulers)
    callbacks = run.callbacks([backup])
    callbacks.on_train_begin()  # the restore phase
    loop = callbacks.loop
    callbacks.on_train_end()  # puts the SIGTERM handler back
    assert backup.restored is not None and loop.resumed
    assert (backup.restored.epoch, backup.restored.batch, backup.restored.global_step) == (
        loop.initial_epoch, loop.initial_batch, loop.global_step)
    return backup.restored.epoch, backup.restored.batch, backup.restored.global_step


def read_loop_state(run: Run, path: Path) -> tuple[int, int, int]:
    loop = tc.LoopState(model=run.model, optimizers=run.optimizers, scaler=run.scaler)
    for i, scheduler in enumerate(run.schedulers):
        loop.track(f"scheduler/{i}", scheduler)
    state = loop.load_state_dict(read_training_state(path), str(path))
    assert (state.epoch, state.batch, state.global_step) == (*loop.position, loop.global_step)
    return state.epoch, state.batch, state.global_step


READERS: dict[str, Callable[[Run, Path], tuple[int, int, int]]] = {
    "load_checkpoint": read_load_checkpoint,
    "BackupAndRestore": read_backup_and_restore,
    "LoopState": read_loop_state,
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writers_file_is_read_by_every_reader_to_the_same_state(writer: str, reader: str, tmp_path: Path) -> None:
    run = Run(seed=0)
    path = tmp_path / "state.safetensors"
    WRITERS[writer](run, path)
    expected = run.state((EPOCHS, 0, EPOCHS * STEPS))
    fresh = Run(seed=1)
    assert fresh.state((EPOCHS, 0, EPOCHS * STEPS))[0] != expected[0]  # another state before the read
    counters = READERS[reader](fresh, path)
    assert len(expected[1]) == 12  # 4 weights; Adam's 2 moments and step for 2 parameters; SGD's 2 momenta
    _assert_same(expected, fresh.state(counters))
    with safe_open(path, framework="pt") as f:  # the one layout
        document = json.loads(f.metadata()[STATE_KEY])
    assert {"scheduler/0", "scheduler/1"} <= document["loop"].keys() and document["world_size"] == 1
    assert "schedulers" not in document


def test_a_scheduler_the_file_lacks_is_refused_naming_the_field_and_nothing_changes(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.step()
    tc.save_checkpoint(run.model, tmp_path / "s.safetensors", run.optimizers, scheduler=run.schedulers[:1])
    fresh = Run(seed=1)
    before = fresh.state((0, 0, 0))
    with pytest.raises(tc.CheckpointError, match=r"s.safetensors'.*'loop/scheduler/1' is missing"):
        tc.load_checkpoint(fresh.model, tmp_path / "s.safetensors", fresh.optimizers, scheduler=fresh.schedulers)
    _assert_same(before, fresh.state((0, 0, 0)))


# -- the layout save_checkpoint wrote before (top-level `schedulers` and `extra`, no `world_size`) --------
OLD = DATA / "save_checkpoint_format3.safetensors"


def _old_file() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with safe_open(OLD, framework="pt") as f:
        return json.loads(f.metadata()[STATE_KEY]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _assert_holds_the_old_file(run: Run) -> None:
    document, tensors = _old_file()
    assert "schedulers" in document and "world_size" not in document and "loop" not in document  # the old layout
    model = {k: v for k, v in tensors.items() if not k.startswith("@")}
    assert model.keys() == run.model.state_dict().keys()
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in model.items())
    adam, sgd = (o.state_dict() for o in run.optimizers)
    assert torch.equal(adam["state"][0]["exp_avg"], tensors["@optimizers/0/state/0/exp_avg"])
    assert torch.equal(adam["state"][1]["exp_avg_sq"], tensors["@optimizers/0/state/1/exp_avg_sq"])
    assert torch.equal(sgd["state"][1]["momentum_buffer"], tensors["@optimizers/1/state/1/momentum_buffer"])
    assert adam["param_groups"][0]["lr"] == document["optimizers"][0]["param_groups"][0]["lr"] == 0.00125
    assert [s.state_dict() for s in run.schedulers] == document["schedulers"]
    assert run.scaler.state_dict()["scale"] == document["scaler"]["scale"]


@pytest.mark.parametrize("reader", list(READERS))
def test_a_file_of_the_old_save_checkpoint_layout_loads_with_every_reader(reader: str, tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    shutil.copy(OLD, path)
    fresh = Run(seed=1)
    counters = READERS[reader](fresh, path)
    assert counters == (2, 0, 6)
    _assert_holds_the_old_file(fresh)


def test_the_old_layout_is_upgraded_into_the_one_layout(tmp_path: Path) -> None:
    state = read_training_state(OLD)
    assert "schedulers" not in state and state["extra"] == {"note": "old layout"}
    document, _ = _old_file()
    assert state["loop"] == {"scheduler/0": document["schedulers"][0], "scheduler/1": document["schedulers"][1]}
    callbacks = tc.CallbackList([tc.EarlyStopping(monitor="loss", patience=4)])
    fresh = Run(seed=1)
    loaded = tc.load_checkpoint(fresh.model, OLD, fresh.optimizers, scheduler=fresh.schedulers, callbacks=callbacks)
    assert loaded.extra == {"note": "old layout"} and loaded.library_version == "0.1.0"
    early = callbacks.callbacks[0]
    assert (early.best, early.wait) == (0.25, 2)  # type: ignore[attr-defined]
    # written again, it is in the one layout, and holds the same
    tc.save_checkpoint(fresh.model, tmp_path / "new.safetensors", fresh.optimizers, scaler=fresh.scaler,
                       scheduler=fresh.schedulers, epoch=loaded.epoch, global_step=loaded.global_step, extra=loaded.extra)
    again = Run(seed=2)
    assert tc.load_checkpoint(again.model, tmp_path / "new.safetensors", again.optimizers, scaler=again.scaler,
                              scheduler=again.schedulers).extra == {"note": "old layout"}
    _assert_same(fresh.state((2, 0, 6)), again.state((2, 0, 6)))


def test_load_checkpoint_takes_any_object_with_a_state_as_callbacks(tmp_path: Path) -> None:
    class Counter:
        def __init__(self, count: int) -> None:
            self.count = count

        def state_dict(self) -> dict[str, Any]:
            return {"count": self.count}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.count = state["count"]

    model = make_model()
    tc.save_checkpoint(model, tmp_path / "c.safetensors", callbacks=Counter(5))
    other = Counter(0)
    assert tc.load_checkpoint(model, tmp_path / "c.safetensors", callbacks=other).callbacks == {"count": 5}
    assert other.count == 5
    with pytest.raises(TypeError, match="callbacks must be a CallbackList or have state_dict"):
        tc.save_checkpoint(model, tmp_path / "c.safetensors", callbacks=object())
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer .*received Linear"):
        tc.load_checkpoint(model, tmp_path / "c.safetensors", model[0])
