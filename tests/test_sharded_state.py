"""Callback states and ModelCheckpoint's training state of an FSDP2 model, in one process.

`fully_shard` needs a process group: these tests run in a one-process gloo group (a `HashStore`, no
network, created and destroyed around each test), where FSDP2 gives DTensor parameters as it does on
many processes (each process's shard is the whole tensor here; the torchrun tests in
tests/distributed/test_fsdp.py cover real shards on two processes).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import Crash, retype_tensor
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc


@pytest.fixture
def group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _plain_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model.register_buffer("scale", torch.tensor([2.0, 3.0]))
    return model


def _shard(model: torch.nn.Module, root_owns_first: bool = False) -> torch.nn.Module:
    """`fully_shard` on each Linear and the root; with `root_owns_first`, the first Linear's
    parameters are the root's (which FSDP2 leaves gathered after a forward without backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    for i, layer in enumerate(model):
        if isinstance(layer, torch.nn.Linear) and not (root_owns_first and i == 0):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=5)


def _fit(model: torch.nn.Module, callbacks: list[Any], epochs: int = 3, **kwargs: Any) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = tc.fit(model, _loader(), optimizer=optimizer, loss=F.mse_loss, epochs=epochs, verbose=0,
                     callbacks=callbacks, **kwargs)
    return optimizer, history


def _full(tensors: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    return {str(k): (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in items}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def _assert_local_cpu_shards(tensors: dict[str, Any], model: torch.nn.Module) -> None:
    """Every DTensor of the model's state dict has a DTensor here, of the same placements, whose
    local tensor is on the CPU and has the local shard's shape."""
    from torch.distributed.tensor import DTensor

    for name, reference in model.state_dict().items():
        if isinstance(reference, DTensor):
            ours = tensors[name]
            assert isinstance(ours, DTensor), name
            assert ours.placements == reference.placements and ours.device_mesh == reference.device_mesh
            assert ours.to_local().device.type == "cpu" and ours.to_local().shape == reference.to_local().shape


class Record(tc.Callback):
    """The model's weights (gathered, cloned) at every epoch end, after the other callbacks' updates."""

    dispatch_order = 3

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.weights.append(_full(self.model.state_dict()))


# -- EarlyStopping ------------------------------------------------------------------------------------
def test_early_stopping_keeps_local_cpu_shards_and_restores_them(group: None) -> None:
    model = _shard(_plain_model())
    record = Record()
    # mode="max" on the falling loss: the best epoch is the first, so the end restores its snapshot
    stopper = tc.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=True)
    _fit(model, [stopper, record])
    assert stopper.best_epoch == 0 and stopper.best_weights is not None
    _assert_local_cpu_shards(stopper.best_weights, model)
    _assert_equal(_full(model.state_dict()), record.weights[0])
    assert not torch.equal(record.weights[0]["0.weight"], record.weights[-1]["0.weight"])


# -- SwapEMAWeights -----------------------------------------------------------------------------------
def test_swap_ema_weights_of_a_sharded_model_averages_and_swaps_as_for_a_plain_one(group: None) -> None:
    from torch.distributed.tensor import DTensor

    runs = {}
    # No callback here reads model.state_dict() (that would put FSDP2's sharded parameters back in
    # place by itself): the swaps must not be undone by the root's gathered parameters.
    for name, model in (("plain", _plain_model()), ("sharded", _shard(_plain_model(), root_owns_first=True))):
        ema = tc.SwapEMAWeights(decay=0.9, use_ema_at_end=True)
        _, history = _fit(model, [ema], validation_data=_loader())
        runs[name] = (ema, history, _full(model.state_dict()))
    ema, history, final = runs["sharded"]
    plain_ema, plain_history, plain_final = runs["plain"]
    assert ema.ema_model is None and all(isinstance(t, DTensor) for t in ema.ema_tensors[:4])
    assert [t.placements for t in ema.ema_tensors[:4]] == [p.placements for p in ema.model.parameters()]
    assert ema.num_updates == plain_ema.num_updates == 24 and not ema.ema_weights_in_model
    # validation ran with the EMA weights and training with the training weights, as without FSDP
    for key in ("loss", "val_loss"):
        assert history.history[key] == pytest.approx(plain_history.history[key], rel=1e-6)
    # use_ema_at_end: the EMA weights are left in the model
    assert all(torch.allclose(final[k], plain_final[k], atol=1e-6) for k in plain_final)
    assert all(torch.allclose(final[k], plain_ema.ema_model.module.state_dict()[k], atol=1e-6) for k in plain_final)


def test_swap_ema_weights_of_a_sharded_model_puts_the_training_weights_back_at_the_end(group: None) -> None:
    model = _shard(_plain_model())
    ema = tc.SwapEMAWeights(decay=0.5, swap_on_epoch=True)
    record = Record()  # after the epoch-end swap: the EMA weights
    _fit(model, [ema, record], epochs=2)
    final = _full(model.state_dict())
    assert not torch.equal(final["0.weight"], record.weights[-1]["0.weight"])
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]  # the EMA's order
    _assert_equal(_full(ema.ema_tensors), {str(i): record.weights[-1][n] for i, n in enumerate(names)})


# -- resume from a sharded backup ---------------------------------------------------------------------
def _resumable_run(backup: Path, crash_at: int | None) -> dict[str, Any]:
    torch.manual_seed(5)
    model = _shard(_plain_model())
    stopper = tc.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=True)
    ema = tc.SwapEMAWeights(decay=0.9)
    checkpoint = tc.ModelCheckpoint(backup.parent / f"{backup.name}-ckpt" / "s-{epoch}.safetensors", monitor="loss",
                                    max_to_keep=2, async_save=True)
    callbacks: list[Any] = [tc.BackupAndRestore(backup, save_freq=4), stopper, ema, checkpoint]
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    try:
        _fit(model, callbacks)
    except RuntimeError as exc:
        assert str(exc) == "crash"
    return {"model": _full(model.state_dict()), "ema": _full(ema.ema_tensors), "best": _full(stopper.best_weights or {}),
            "stopper": stopper, "saver": callbacks[0], "checkpoint": checkpoint}


def test_a_sharded_backup_carries_the_snapshot_and_the_average_and_resumes_exactly(group: None, tmp_path: Path) -> None:
    from torchcallbacks.checkpoint.sharded import STATE_FILE

    straight = _resumable_run(tmp_path / "a", None)
    _resumable_run(tmp_path / "b", crash_at=14)  # after the backup at step 12 (epoch 1, with a snapshot)
    document = json.loads((tmp_path / "b" / "latest" / STATE_FILE).read_text())
    assert document["state"]["global_step"] == 12
    sharded = document["sharded"]
    assert "callbacks/EarlyStopping[monitor=loss,mode=max]/best_weights/0.weight" in sharded
    assert "callbacks/SwapEMAWeights/tensors/0" in sharded  # as shards, not gathered
    resumed = _resumable_run(tmp_path / "b", None)  # a fresh EarlyStopping: no snapshot until loaded
    assert resumed["saver"].restored.global_step == 12
    for part in ("model", "ema", "best"):
        _assert_equal(resumed[part], straight[part])
    assert resumed["stopper"].best_epoch == 0
    # ModelCheckpoint's directories (asynchronous) and its state came through the backup too
    assert sorted(os.listdir(tmp_path / "b-ckpt")) == sorted(os.listdir(tmp_path / "a-ckpt")) == ["s-2", "s-3"]
    assert resumed["checkpoint"].state_dict()["kept"] == [[str(tmp_path / "b-ckpt" / f"s-{e}"), loss]
                                                          for (_, loss), e in zip(straight["checkpoint"].state_dict()["kept"], (2, 3), strict=True)]


def test_double_checkpoint_of_a_sharded_backup_falls_back_to_the_previous_directory(group: None, tmp_path: Path) -> None:
    """The directory a sharded backup replaces becomes backup/previous/; a damaged latest/ resumes
    from it, with a warning."""
    from torchcallbacks.checkpoint.sharded import STATE_FILE

    backup = tmp_path / "backup"

    class Crash(tc.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.loop.global_step == 13:
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _fit(_shard(_plain_model()), [tc.BackupAndRestore(backup, save_freq=4, double_checkpoint=True), Crash()])
    assert sorted(os.listdir(backup)) == ["latest", "previous"]
    assert json.loads((backup / "previous" / STATE_FILE).read_text())["state"]["global_step"] == 8
    document = json.loads((backup / "latest" / STATE_FILE).read_text())
    document["state"]["epoch"] = "two"  # damaged
    (backup / "latest" / STATE_FILE).write_text(json.dumps(document))
    restored = tc.BackupAndRestore(backup, save_freq=4, double_checkpoint=True)
    with pytest.warns(UserWarning, match=r"field 'epoch' must be an integer >= 0.*; falling back to .*previous'"):
        _fit(_shard(_plain_model(seed=1)), [restored])
    assert restored.restored is not None and restored.restored.global_step == 8
    assert not backup.exists()  # finished: both deleted


@pytest.mark.filterwarnings("ignore:.*saved states that no callback takes")
def test_a_backup_without_a_snapshot_yet_resumes_into_a_stopper_that_has_one(group: None, tmp_path: Path) -> None:
    """The template follows the saved state: no snapshot in the backup, none asked for."""
    _resumable_run(tmp_path / "b", crash_at=5)  # backup at step 4: before the first epoch end
    torch.manual_seed(5)
    model = _shard(_plain_model())
    stopper = tc.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=True)
    stopper.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # left from elsewhere
    stopper.set_model(model)
    assert stopper.state_template({"best_weights": None}) == {}
    saver = tc.BackupAndRestore(tmp_path / "b", save_freq=4)
    _fit(model, [saver, stopper, tc.SwapEMAWeights(decay=0.9)])
    assert saver.restored is not None and saver.restored.global_step == 4


# -- ModelCheckpoint(save_weights_only=False) ----------------------------------------------------------
def test_model_checkpoint_saves_sharded_directories_and_keeps_max_to_keep(group: None, tmp_path: Path) -> None:
    from torchcallbacks.checkpoint.sharded import STATE_FILE

    model = _shard(_plain_model())
    every = tc.ModelCheckpoint(tmp_path / "ckpt" / "state-{epoch:02d}.safetensors", monitor="loss", max_to_keep=2)
    best = tc.ModelCheckpoint(tmp_path / "best.safetensors", monitor="loss", save_best_only=True)
    record = Record()
    optimizer, _ = _fit(model, [every, best, record, tc.SwapEMAWeights(decay=0.9),
                                tc.EarlyStopping(monitor="loss", restore_best_weights=True, patience=5)])
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["state-02", "state-03"]
    assert every.last_path == every.best_path == str(tmp_path / "ckpt" / "state-03")
    assert best.best_path == str(tmp_path / "best") and os.path.isfile(tmp_path / "best" / STATE_FILE)
    assert sorted(os.listdir(tmp_path)) == ["best", "ckpt"]  # no temp directory left
    assert [item[0] for item in every.state_dict()["kept"]] == [str(tmp_path / "ckpt" / f"state-0{i}") for i in (2, 3)]

    fresh = _shard(_plain_model(seed=1))
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    state = tc.load_checkpoint(fresh, tmp_path / "ckpt" / "state-02", fresh_optimizer)
    assert (state.epoch, state.batch, state.global_step) == (2, 0, 16)
    _assert_equal(_full(fresh.state_dict()), record.weights[1])
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-2
    assert {every.state_key, best.state_key, "EarlyStopping[monitor=loss]", "SwapEMAWeights"} <= set(state.callbacks)
    assert optimizer.state_dict()["state"][0]["step"] == 24


def test_model_checkpoint_state_names_its_directories_only(group: None, tmp_path: Path) -> None:
    checkpoint = tc.ModelCheckpoint(tmp_path / "ckpt" / "state-{epoch:02d}.safetensors")
    checkpoint.load_state_dict({"best": 1.0, "best_path": str(tmp_path / "ckpt" / "state-01"), "last_path": None,
                                "kept": [[str(tmp_path / "ckpt" / "state-01"), 1.0]]})
    for bad in (tmp_path / "ckpt", tmp_path / "ckpt" / "other", tmp_path / "state-01",
                f"{tmp_path}/ckpt/state-01/../other", tmp_path / "ckpt" / "state-01" / "x"):
        with pytest.raises(ValueError, match="refusing a state that points elsewhere"):
            checkpoint.load_state_dict({"best": None, "best_path": None, "last_path": None, "kept": [[str(bad), None]]})


class Look(tc.Callback):
    """At every epoch end, after ModelCheckpoint's save: the names in the checkpoint directory."""

    dispatch_order = 3

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory, self.seen = directory, []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.seen.append(sorted(n.split(".tmp-")[0] + (".tmp" if ".tmp-" in n else "") for n in os.listdir(self.directory)))


def test_async_save_of_a_sharded_state_is_published_at_the_next_save_then_the_stale_go(group: None, tmp_path: Path) -> None:
    model = _shard(_plain_model())
    checkpoint = tc.ModelCheckpoint(tmp_path / "state-{epoch}.safetensors", monitor="loss", async_save=True, max_to_keep=2)
    look, record = Look(tmp_path), Record()
    _fit(model, [checkpoint, look, record])
    # written in the background: right after its save an epoch's directory is still a temp one; it is
    # published by the next save, and state-1, stale after the third save, stays until state-3 is published
    assert look.seen == [["state-1.tmp"], ["state-1", "state-2.tmp"], ["state-1", "state-2", "state-3.tmp"]]
    assert sorted(os.listdir(tmp_path)) == ["state-2", "state-3"]  # state-3 published at train end
    fresh = _shard(_plain_model(seed=1))
    tc.load_checkpoint(fresh, tmp_path / "state-2")  # written while epoch 3 trained: the shards of its save
    _assert_equal(_full(fresh.state_dict()), record.weights[1])
    tc.load_checkpoint(fresh, tmp_path / "state-3")
    _assert_equal(_full(fresh.state_dict()), record.weights[2])


def test_load_checkpoint_refuses_a_sharded_state_that_does_not_fit_before_reading_it(group: None, tmp_path: Path) -> None:
    model = _shard(_plain_model())
    _fit(model, [tc.ModelCheckpoint(tmp_path / "s.safetensors", monitor="loss")], epochs=1)
    fresh = _shard(_plain_model(seed=1))
    before = _full(fresh.state_dict())
    with pytest.raises(tc.CheckpointError, match=r"optimizers/0 \(SGD\) holds the state of a torch.optim.adam.Adam"):
        tc.load_checkpoint(fresh, tmp_path / "s", torch.optim.SGD(fresh.parameters(), lr=0.1))
    with pytest.raises(tc.CheckpointError, match=r"field 'optimizers' .*2"):
        tc.load_checkpoint(fresh, tmp_path / "s", [torch.optim.Adam(fresh.parameters())] * 2)
    _assert_equal(_full(fresh.state_dict()), before)
    other = _shard(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)))
    with pytest.raises(tc.CheckpointError, match="does not fit FSDPSequential: not in the model: scale"):
        tc.load_checkpoint(other, tmp_path / "s")
    with pytest.raises(tc.CheckpointError, match="pass the model"):
        tc.load_checkpoint(None, tmp_path / "s")
    tc.load_checkpoint(fresh, tmp_path / "s")  # the model only: the optimizer state is not read
    _assert_equal(_full(fresh.state_dict()), _full(model.state_dict()))
    # save_checkpoint writes files; a sharded model's training state is a directory written by the callbacks
    with pytest.raises(ValueError, match="save_checkpoint: model is FSDP2-sharded .*ModelCheckpoint"):
        tc.save_checkpoint(fresh, tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()


def test_a_sharded_load_refused_after_its_shards_were_read_leaves_model_and_optimizer_as_they_were(
    group: None, tmp_path: Path
) -> None:
    """A damaged part found only once the shards are read (here History's state, checked when it is
    applied) must not leave the refused checkpoint's weights and moments in the model and optimizer."""
    import json

    model = _shard(_plain_model())
    _fit(model, [tc.ModelCheckpoint(tmp_path / "s.safetensors", monitor="loss"), tc.History()], epochs=2)
    state_file = tmp_path / "s" / "state.json"
    document = json.loads(state_file.read_text())
    document["state"]["callbacks"]["History"] = {"epoch": 3}
    state_file.write_text(json.dumps(document))
    fresh = _shard(_plain_model(seed=1))
    optimizer, _ = _fit(fresh, [], epochs=1)  # weights and moments of its own, to keep
    before, moments = _full(fresh.state_dict()), _full(_plain_state(fresh, optimizer))
    with pytest.raises(tc.CheckpointError, match=r"field 'callbacks/History' does not fit"):
        tc.load_checkpoint(fresh, tmp_path / "s", optimizer, callbacks=tc.CallbackList([tc.History()]))
    _assert_equal(_full(fresh.state_dict()), before)
    _assert_equal(_full(_plain_state(fresh, optimizer)), moments)


class Gather(tc.Callback):
    """At every epoch end, after ModelCheckpoint's save: the model's and Adam's state, gathered in full
    and keyed by parameter names (`get_state_dict`), what a plain process must read back."""

    dispatch_order = 3

    def __init__(self) -> None:
        super().__init__()
        self.states: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from torchcallbacks.checkpoint.encoding import encode

        tensors: dict[str, Any] = {}
        encode(dict(zip(("model", "optimizer"), get_state_dict(self.model, self.optimizer), strict=True)), "", tensors)
        self.states.append(_full(tensors))


def _plain_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A plain model's and optimizer's state in Gather's layout."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from torchcallbacks.checkpoint.encoding import encode

    tensors: dict[str, Any] = {}
    encode(dict(zip(("model", "optimizer"), get_state_dict(model, optimizer), strict=True)), "", tensors)
    return _full(tensors)


def test_a_plain_process_without_a_process_group_reads_a_sharded_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After FSDP2 training with a full-state ModelCheckpoint, an inference script (one process, no
    process group, no FSDP) reads the directory with load_weights and load_checkpoint, nothing unpickled."""
    import pickle

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        gather = Gather()
        stopper = tc.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=True)
        ema = tc.SwapEMAWeights(decay=0.9)
        _fit(_shard(_plain_model()), [tc.ModelCheckpoint(tmp_path / "ckpt" / "m-{epoch:02d}.safetensors", monitor="loss"),
                                      gather, stopper, ema], epochs=2)
        snapshot, average = _full(stopper.best_weights), _full(ema.ema_tensors)  # as saved at the last epoch end
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
    saved = gather.states[1]
    model_keys = {k.removeprefix("/model/") for k in saved if k.startswith("/model/")}

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling attempted")

    class Refused(pickle.Unpickler):  # a class still: modules imported meanwhile may subclass it
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(torch, "load", refuse)
    plain = _plain_model(seed=1)
    tc.load_weights(plain, tmp_path / "ckpt" / "m-02")
    assert plain.state_dict().keys() == model_keys
    _assert_equal({k: v for k, v in plain.state_dict().items()}, {k: saved[f"/model/{k}"] for k in model_keys})

    other = _plain_model(seed=2)
    optimizer = torch.optim.Adam(other.parameters(), lr=0.5)
    callbacks = tc.CallbackList([tc.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=True),
                                 tc.SwapEMAWeights(decay=0.9)], model=other, optimizer=optimizer)
    with pytest.warns(UserWarning, match="saved states that no callback takes: ModelCheckpoint"):
        state = tc.load_checkpoint(other, tmp_path / "ckpt" / "m-02", optimizer, callbacks=callbacks)
    assert (state.epoch, state.batch, state.global_step) == (2, 0, 16)
    _assert_equal(_full(callbacks.callbacks[0].best_weights), snapshot)  # type: ignore[attr-defined]
    _assert_equal(_full(callbacks.callbacks[1].ema_tensors), average)  # type: ignore[attr-defined]
    assert optimizer.param_groups[0]["lr"] == 1e-2
    monkeypatch.undo()
    _assert_equal(_plain_state(other, optimizer), saved)
    # a model that does not fit is refused naming the keys, before anything is read
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    with pytest.raises(tc.CheckpointError, match=r"m-02'.*not in the model: scale"):
        tc.load_weights(wrong, tmp_path / "ckpt" / "m-02")
    tc.load_weights(wrong, tmp_path / "ckpt" / "m-02", strict=False)
    assert torch.equal(wrong[0].weight, saved["/model/0.weight"])


def test_sharded_random_states_hold_their_words_as_tensors_and_version_1_lists_still_load(group: None, tmp_path: Path) -> None:
    from safetensors import safe_open

    from torchcallbacks.checkpoint.sharded import REPLICATED_FILE, STATE_FILE

    model = _shard(_plain_model())
    _fit(model, [tc.ModelCheckpoint(tmp_path / "s.safetensors", monitor="loss")], epochs=1)
    directory = tmp_path / "s"
    words = {"numpy": "key", "python": "internal"}
    with safe_open(directory / REPLICATED_FILE, framework="pt") as f:
        saved = {part: f.get_tensor(f"rng/current/{part}/{name}") for part, name in words.items()}
    assert [(t.dtype, tuple(t.shape)) for t in saved.values()] == [(torch.int64, (624,)), (torch.int64, (625,))]
    document = json.loads((directory / STATE_FILE).read_text())
    assert document["format_version"] == 2
    assert document["state"]["rng"]["current"]["numpy"]["key"] == {"__tensor__": "rng/current/numpy/key"}
    fresh = _shard(_plain_model(seed=1))
    tc.load_checkpoint(fresh, directory)
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    for part, name in words.items():  # as version 1 wrote them: JSON lists
        document["state"]["rng"]["current"][part][name] = saved[part].tolist()
        document["replicated"].remove(f"rng/current/{part}/{name}")
    document["format_version"] = 1
    (directory / STATE_FILE).write_text(json.dumps(document))
    np.random.seed(9), random.seed(9), torch.manual_seed(9)
    tc.load_checkpoint(fresh, directory)
    assert np.array_equal(np.random.rand(3), expected[0]) and random.random() == expected[1]
    assert torch.equal(torch.rand(2), expected[2])


# -- load_sharded: templates from the saved tree -------------------------------------------------------
def test_load_sharded_takes_a_template_made_from_the_saved_tree_and_may_read_part(tmp_path: Path) -> None:
    from torchcallbacks.checkpoint.sharded import load_sharded, save_sharded

    save_sharded(tmp_path / "c", {"model": {"w": torch.arange(4.0)}, "snapshot": None, "step": 3})
    seen: list[dict[str, Any]] = []

    def template(saved: dict[str, Any]) -> dict[str, Any]:
        seen.append(saved)
        return {"model": {"w": torch.zeros(4)}}

    state, _ = load_sharded(tmp_path / "c", template)
    assert seen == [{"model": {"w": None}, "snapshot": None, "step": 3}]
    assert torch.equal(state["model"]["w"], torch.arange(4.0)) and state["step"] == 3
    state, _ = load_sharded(tmp_path / "c", {}, partial=True)  # replicated tensors are read anyway
    assert torch.equal(state["model"]["w"], torch.arange(4.0))


# -- dtypes --------------------------------------------------------------------------------------------
def test_full_weights_of_another_dtype_are_refused_for_a_sharded_model_unless_cast(group: None, tmp_path: Path) -> None:
    """load_weights into an FSDP2 model read each tensor and cast it to the shard's dtype, silently
    (its header check took every file tensor for float32)."""
    saved = _plain_model(seed=3)
    tc.save_weights(saved, tmp_path / "w.safetensors")
    retype_tensor(tmp_path / "w.safetensors", "0.weight", "I32")  # float32 bytes said to be int32
    model = _shard(_plain_model())
    before = _full(model.state_dict())
    with pytest.raises(tc.CheckpointError, match=r"w\.safetensors.*dtypes differ for 0\.weight: file torch\.int32 vs model torch\.float32"):
        tc.load_weights(model, tmp_path / "w.safetensors")
    _assert_equal(_full(model.state_dict()), before)
    tc.save_weights(saved.half(), tmp_path / "half.safetensors")
    with pytest.raises(tc.CheckpointError, match=r"file torch\.float16 vs model torch\.float32"):
        tc.load_weights(model, tmp_path / "half.safetensors")
    tc.load_weights(model, tmp_path / "half.safetensors", cast_dtypes=True)
    _assert_equal(_full(model.state_dict()), {k: v.float() for k, v in saved.state_dict().items()})


# -- damaged and edited directories ----------------------------------------------------------------------
def _edit_json(name: str, edit: Any) -> Any:
    def damage(directory: Path) -> None:
        document = json.loads((directory / name).read_text())
        edit(document)
        (directory / name).write_text(json.dumps(document))
    return damage


def _chunk(directory: Path, tensor: str) -> dict[str, Any]:
    from torchcallbacks.checkpoint.sharded import METADATA_FILE

    return json.loads((directory / METADATA_FILE).read_text())["tensors"][tensor]["chunks"][0]


def _overlapping_chunks(directory: Path) -> None:
    """model/0.weight (8 x 4) as rows 0-3 and rows 2-5: as many elements as the tensor, rows 6 and 7
    in no chunk (they kept the values of the model loaded into)."""
    from safetensors.torch import load_file, save_file

    from torchcallbacks.checkpoint.sharded import METADATA_FILE

    metadata = json.loads((directory / METADATA_FILE).read_text())
    entry = metadata["tensors"]["model/0.weight"]
    whole = entry["chunks"][0]
    shard = directory / whole["file"]
    tensors = load_file(shard)
    tensors["model/0.weight@2,0"] = tensors[whole["key"]][2:6].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    entry["chunks"] = [{**whole, "sizes": [4, 4]},
                       {**whole, "offsets": [2, 0], "sizes": [4, 4], "key": "model/0.weight@2,0"}]
    (directory / METADATA_FILE).write_text(json.dumps(metadata))


def _linked(name: Any) -> Any:
    """The file `name(directory)` moved out of the directory, a symbolic link to it in its place."""
    def damage(directory: Path) -> None:
        inside = directory / name(directory)
        outside = directory.parent / f"outside-{inside.name}"
        inside.rename(outside)
        inside.symlink_to(outside)
    return damage


def _retyped_shard(directory: Path) -> None:
    chunk = _chunk(directory, "model/2.weight")
    retype_tensor(directory / chunk["file"], chunk["key"], "I32")  # the metadata still says float32


def _set_in(path: str, value: Any) -> Any:
    def edit(document: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for key in parents:
            document = document[int(key)] if isinstance(document, list) else document[key]
        document[last] = value
    return edit


DAMAGED_DIRECTORIES = {  # (damage, what the CheckpointError says)
    "overlapping chunks": (_overlapping_chunks, r"dcp_metadata.json': chunks 0 and 1 of tensor 'model/0.weight' overlap"),
    "a shard whose header dtype differs from the metadata": (
        _retyped_shard, r"shard-00000-of-00001.safetensors': tensor 'model/2.weight@0,0' is \(1, 8\) torch.int32 in the "
        r"shard's header, but dcp_metadata.json says \(1, 8\) torch.float32"),
    "metadata of another dtype than the model's": (
        _edit_json("dcp_metadata.json", lambda document: document["tensors"]["model/2.weight"].update(dtype="int32")),
        r"tensor 'model/2.weight' is stored as \(1, 8\) torch.int32, the tensor it is loaded into is \(1, 8\) torch.float32"),
    "a shard that is a symbolic link": (_linked(lambda d: _chunk(d, "model/0.weight")["file"]),
                                        r"shard-00000-of-00001.safetensors' is a symbolic link"),
    "the replicated file a symbolic link": (_linked(lambda d: "replicated.safetensors"),
                                            r"replicated.safetensors' is a symbolic link"),
    "metadata format_version true": (_edit_json("dcp_metadata.json", _set_in("format_version", True)),
                                     r"not a torchcallbacks.dcp_metadata document of version 1 .*'format_version' True"),
    "metadata of another format": (_edit_json("dcp_metadata.json", _set_in("format", "dcp")),
                                   r"not a torchcallbacks.dcp_metadata document of version 1 \(field 'format' is 'dcp'"),
    "state of another format": (_edit_json("state.json", _set_in("format", "other")), r"not a torchcallbacks.sharded_state document"),
    "state of a newer format_version": (_edit_json("state.json", _set_in("format_version", 3)),
                                        r"format version 3; this torchcallbacks reads 1 to 2"),
    "lr a string": (_edit_json("state.json", _set_in("state/optimizers/0/param_groups/0/lr", "x")),
                    r"field 'optimizers/0/param_groups/0/lr' must be a finite number \(Adam reads it\), found 'x'"),
    "betas one number": (_edit_json("state.json", _set_in("state/optimizers/0/param_groups/0/betas", {"__tuple__": [0.9]})),
                         r"field 'optimizers/0/param_groups/0/betas' must be 2 finite numbers"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_DIRECTORIES))
def test_a_damaged_sharded_directory_is_refused_naming_the_file_and_changes_nothing(
    group: None, tmp_path: Path, case: str
) -> None:
    _fit(_shard(_plain_model()), [tc.ModelCheckpoint(tmp_path / "s.safetensors", monitor="loss")], epochs=1)
    directory = tmp_path / "s"
    damage, message = DAMAGED_DIRECTORIES[case]
    damage(directory)
    model = _shard(_plain_model(seed=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    before = _full(model.state_dict())
    with pytest.raises(tc.CheckpointError, match=message) as error:
        tc.load_checkpoint(model, directory, optimizer)  # into an FSDP2 model: its parameters are the template
    assert str(directory) in str(error.value)
    _assert_equal(_full(model.state_dict()), before)
    assert optimizer.state_dict()["state"] == {} and optimizer.param_groups[0]["lr"] == 0.5
    if "lr" not in case and "betas" not in case:  # the model part alone, into a plain model
        plain = _plain_model(seed=1)
        with pytest.raises(tc.CheckpointError, match=message):
            tc.load_weights(plain, directory)
        _assert_equal(plain.state_dict(), _plain_model(seed=1).state_dict())


def test_a_sharded_directory_of_another_dtype_is_refused_naming_the_tensor_unless_cast(group: None, tmp_path: Path) -> None:
    saved = _shard(_plain_model())
    _fit(saved, [tc.ModelCheckpoint(tmp_path / "s.safetensors", monitor="loss")], epochs=1)
    plain = _plain_model(seed=1).double()
    with pytest.raises(tc.CheckpointError, match=r"tensor 'model/0.weight' is stored as \(8, 4\) torch.float32, the tensor "
                                                 r"it is loaded into is \(8, 4\) torch.float64;.*\(cast_dtypes=True casts dtypes\)"):
        tc.load_weights(plain, tmp_path / "s")
    tc.load_weights(plain, tmp_path / "s", cast_dtypes=True)
    _assert_equal(plain.state_dict(), {k: v.double() for k, v in _full(saved.state_dict()).items()})
