"""`checkpoint.training_state`: one writer for the training state, a file or a sharded directory as the
state requires, through the same `save` / `flush` / `close`; what a save makes stale is deleted only
once it is committed. The sharded cases run in a one-process gloo group (as tests/test_sharded_state.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from torchcallbacks.checkpoint import read_training_state
from torchcallbacks.checkpoint.storage import LocalStorage
from torchcallbacks.checkpoint.training_state import (
    TrainingStateWriter,
    has_training_state,
    holds_dtensors,
    read_state,
    training_state_path,
)


@pytest.fixture
def group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _dtensor(value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(value, init_device_mesh("cpu", (1,)), [Shard(0)])


def _state(step: int, sharded: bool = False) -> dict[str, Any]:
    weight = torch.arange(6.0).reshape(2, 3) + step
    return {"model": {"w": _dtensor(weight) if sharded else weight}, "epoch": step, "batch": 0, "global_step": step}


class GatedStorage(LocalStorage):
    """The local disk, with every write waiting until the test opens the gate: a write in flight."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def write_file(self, path: Any, tensors: Mapping[str, torch.Tensor], metadata: Any = None, keep_previous_as: Any = None) -> None:
        assert self.gate.wait(30)
        super().write_file(path, tensors, metadata, keep_previous_as)

    def write_json(self, path: str, value: Any) -> None:
        assert self.gate.wait(30)
        super().write_json(path, value)


def test_a_plain_state_is_a_file_and_the_stale_one_goes_only_once_the_new_one_is_written(tmp_path: Path) -> None:
    storage = GatedStorage()
    writer = TrainingStateWriter(async_save=True, storage=storage)
    storage.gate.set()
    assert writer.save(tmp_path / "e1.safetensors", _state(1)) == str(tmp_path / "e1.safetensors")
    writer.flush()
    storage.gate.clear()
    written = writer.save(tmp_path / "e2.safetensors", _state(2), delete_after=[tmp_path / "e1.safetensors"])
    assert written == str(tmp_path / "e2.safetensors")
    assert (tmp_path / "e1.safetensors").exists() and not (tmp_path / "e2.safetensors").exists()  # in flight
    storage.gate.set()
    writer.flush()
    assert sorted(os.listdir(tmp_path)) == ["e2.safetensors"]
    assert read_state(tmp_path / "e2.safetensors")["global_step"] == 2
    writer.close()
    assert writer.files._buffers == {}


def test_a_file_state_keeps_the_previous_one_as_asked(tmp_path: Path) -> None:
    writer = TrainingStateWriter()
    writer.save(tmp_path / "latest.safetensors", _state(1))
    writer.save(tmp_path / "latest.safetensors", _state(2), keep_previous_as=tmp_path / "previous.safetensors")
    assert read_training_state(tmp_path / "previous.safetensors")["global_step"] == 1
    assert read_training_state(tmp_path / "latest.safetensors")["global_step"] == 2
    writer.close()


def test_a_state_of_dtensors_is_a_sharded_directory_through_the_same_calls(group: None, tmp_path: Path) -> None:
    storage = GatedStorage()
    writer = TrainingStateWriter(async_save=True, storage=storage)
    assert holds_dtensors(_state(1, sharded=True)) and not holds_dtensors(_state(1))
    storage.gate.set()
    assert writer.save(tmp_path / "e1.safetensors", _state(1, sharded=True)) == str(tmp_path / "e1")
    writer.flush()
    assert has_training_state(tmp_path / "e1")
    storage.gate.clear()
    written = writer.save(tmp_path / "e2.safetensors", _state(2, sharded=True), delete_after=[tmp_path / "e1"])
    assert written == str(tmp_path / "e2")
    # written in the background: not published yet, and the directory it makes stale is still there
    assert (tmp_path / "e1").is_dir() and not (tmp_path / "e2").exists()
    storage.gate.set()
    writer.flush()  # published, then e1 deleted
    assert sorted(os.listdir(tmp_path)) == ["e2"]
    template = {"model": {"w": _dtensor(torch.zeros(2, 3))}}
    state = read_state(tmp_path / "e2", template)
    assert state["global_step"] == 2
    assert torch.equal(template["model"]["w"].full_tensor(), torch.arange(6.0).reshape(2, 3) + 2)
    # and the same writer writes a file for a plain state
    assert writer.save(tmp_path / "plain.safetensors", _state(3)) == str(tmp_path / "plain.safetensors")
    writer.close()
    assert read_state(tmp_path / "plain.safetensors")["global_step"] == 3


def test_a_synchronous_sharded_save_deletes_what_it_made_stale_at_once(group: None, tmp_path: Path) -> None:
    writer = TrainingStateWriter()
    writer.save(tmp_path / "e1.safetensors", _state(1, sharded=True))
    writer.save(tmp_path / "e2.safetensors", _state(2, sharded=True), delete_after=[tmp_path / "e1"])
    assert sorted(os.listdir(tmp_path)) == ["e2"]
    writer.close()


@pytest.mark.parametrize("async_save", [False, True])
def test_a_sharded_state_replaced_becomes_the_previous_directory(group: None, tmp_path: Path, async_save: bool) -> None:
    """keep_previous_as for a sharded state (BackupAndRestore's double_checkpoint): the directory
    replaced becomes `previous/` (exchanged with the older one there), never a moment without either."""
    writer = TrainingStateWriter(async_save=async_save)
    template = lambda: {"model": {"w": _dtensor(torch.zeros(2, 3))}}  # noqa: E731
    for step in (1, 2, 3):
        writer.save(tmp_path / "latest.safetensors", _state(step, sharded=True), keep_previous_as=tmp_path / "previous")
        writer.flush()
    writer.close()
    assert sorted(os.listdir(tmp_path)) == ["latest", "previous"]
    assert read_state(tmp_path / "latest", template())["global_step"] == 3
    assert read_state(tmp_path / "previous", template())["global_step"] == 2
    (tmp_path / "previous" / "state.json").unlink()  # not a complete checkpoint of ours: left alone
    (tmp_path / "previous" / "notes.txt").write_text("mine")
    writer = TrainingStateWriter(async_save=async_save)
    with pytest.warns(UserWarning, match="previous' exists and is not a checkpoint directory: it is left as it is"):
        writer.save(tmp_path / "latest.safetensors", _state(4, sharded=True), keep_previous_as=tmp_path / "previous")
        writer.flush()
    writer.close()
    assert (tmp_path / "previous" / "notes.txt").read_text() == "mine"
    assert read_state(tmp_path / "latest", template())["global_step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["latest", "previous"]


def test_an_abandoned_sharded_save_is_not_published_and_deletes_nothing(group: None, tmp_path: Path) -> None:
    storage = GatedStorage()
    storage.gate.set()
    writer = TrainingStateWriter(async_save=True, storage=storage)
    writer.save(tmp_path / "e1.safetensors", _state(1, sharded=True))
    writer.save(tmp_path / "e2.safetensors", _state(2, sharded=True), delete_after=[tmp_path / "e1"])
    writer.abandon()  # after an error: no collective, e2 dropped unpublished
    assert sorted(n for n in os.listdir(tmp_path) if ".tmp-" not in n) == ["e1"]
    assert read_state(tmp_path / "e1", {"model": {"w": _dtensor(torch.zeros(2, 3))}})["global_step"] == 1
    writer.save(tmp_path / "e2.safetensors", _state(2, sharded=True))  # the next save there removes the temp one
    writer.flush()
    assert sorted(os.listdir(tmp_path)) == ["e1", "e2"]
    writer.close()


def test_where_a_state_is_follows_the_model(group: None, tmp_path: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain = torch.nn.Linear(2, 2)
    assert training_state_path("b/latest.safetensors", plain) == "b/latest.safetensors"
    assert training_state_path("b/latest.safetensors", None) == "b/latest.safetensors"
    sharded = fully_shard(torch.nn.Linear(2, 2), mesh=init_device_mesh("cpu", (1,)))
    assert training_state_path("b/latest.safetensors", sharded) == "b/latest"
    assert not has_training_state(tmp_path / "latest")
    (tmp_path / "latest").mkdir()  # not a complete checkpoint
    assert not has_training_state(tmp_path / "latest")


def test_a_sharded_directory_needs_a_template(group: None, tmp_path: Path) -> None:
    from torchcallbacks.checkpoint.errors import CheckpointError

    TrainingStateWriter().save(tmp_path / "s.safetensors", _state(1, sharded=True))
    with pytest.raises(CheckpointError, match="is a sharded training state: pass the model"):
        read_state(tmp_path / "s")
