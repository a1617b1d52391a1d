"""The atomic and asynchronous writer: kill-during-save, full disk, one write in flight, errors
raised on the training thread."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import torchcallbacks as tc
from torchcallbacks.checkpoint import CheckpointWriter, atomic_save_file, writer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "save_loop_script.py"


def _kill_during_saves(path: Path, rng: random.Random, kills: int) -> list[int]:
    """Start the save loop `kills` times, SIGKILL it at a random moment after its first save; return
    the last version each run reported saved."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    last = []
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path)], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip().isdigit(), first
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        printed = [first, *proc.stdout.read().split()]
        proc.wait(timeout=30)
        last.append(int(printed[-1]))
        # Every time: the file loads, and it is one complete version, not older than the last reported.
        sys.path.insert(0, str(SCRIPT.parent))
        from save_loop_script import make

        model = make()
        state = tc.load_checkpoint(path, model)
        version = state.extra["version"]
        assert version >= last[-1]
        assert all(bool((p == float(version)).all()) for p in model.parameters()), version
    return last


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_torn_file(tmp_path: Path, random_seed: int) -> None:
    seed = random_seed
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        try:
            results[i] = _kill_during_saves(tmp_path / f"run{i}" / "state.safetensors", random.Random(seed + i), 5)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]  # 3 x 5 = 15 kills
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, result in results.items():
        assert not isinstance(result, BaseException), f"seed {seed} (run {i}): {result!r}"
    assert sum(len(r) for r in results.values()) == 15


def test_full_disk_keeps_the_previous_file_and_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.safetensors"
    model = torch.nn.Linear(3, 2)
    tc.save_weights(model, path)
    before = load_file(path)

    def disk_full(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        with open(filename, "wb") as f:
            f.write(b"\x00" * 16)  # part of the file got written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_serialize", disk_full)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError) as info:
        tc.save_weights(model, path)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["w.safetensors"]
    after = load_file(path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_async_write_copies_tensors_before_returning(tmp_path: Path) -> None:
    w = CheckpointWriter(async_save=True)
    tensor = torch.zeros(1000)
    w.write(tmp_path / "a.safetensors", {"t": tensor}, {"format": "pt"})
    tensor.fill_(5.0)  # the training thread goes on changing the live tensor
    w.flush()
    assert torch.equal(load_file(tmp_path / "a.safetensors")["t"], torch.zeros(1000))


def test_async_keeps_one_write_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    active, peak, lock = [0], [0], threading.Lock()
    real = writer._serialize

    def slow(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        real(tensors, filename, metadata=metadata)
        with lock:
            active[0] -= 1

    monkeypatch.setattr(writer, "_serialize", slow)
    w = CheckpointWriter(async_save=True)
    for i in range(4):
        w.write(tmp_path / f"{i}.safetensors", {"t": torch.full((10,), float(i))})
    w.flush()
    assert peak[0] == 1
    assert [float(load_file(tmp_path / f"{i}.safetensors")["t"][0]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_async_error_is_raised_on_the_training_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(tensors: Any, filename: str, metadata: Any = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_serialize", fail)
    w = CheckpointWriter(async_save=True)
    w.write(tmp_path / "a.safetensors", {"t": torch.zeros(3)})
    with pytest.raises(OSError, match="No space"):
        w.write(tmp_path / "b.safetensors", {"t": torch.zeros(3)})  # raised at the next save
    w.flush()  # the second write failed too
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_async_error_surfaces_at_train_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(tensors: Any, filename: str, metadata: Any = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_serialize", fail)
    model = torch.nn.Linear(4, 1)
    data = [(torch.randn(8, 4), torch.randn(8, 1))]
    ckpt = tc.ModelCheckpoint(str(tmp_path / "m.safetensors"), async_save=True, save_weights_only=True)
    with pytest.raises(OSError, match="No space"):
        tc.fit(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               loss=torch.nn.functional.mse_loss, verbose=0, callbacks=[ckpt])


def test_keep_previous_and_delete_after(tmp_path: Path) -> None:
    path, previous, stale = tmp_path / "latest.safetensors", tmp_path / "previous.safetensors", tmp_path / "old.safetensors"
    atomic_save_file({"v": torch.tensor([1.0])}, path)
    stale.write_bytes(b"x")
    CheckpointWriter().write(path, {"v": torch.tensor([2.0])}, keep_previous_as=previous, delete_after=[str(stale)])
    assert float(load_file(path)["v"]) == 2.0
    assert float(load_file(previous)["v"]) == 1.0
    assert not stale.exists()


def test_temp_files_of_dead_writers_are_removed_at_the_next_save(tmp_path) -> None:
    """A writer SIGKILLed mid-write leaves `.<name>.<pid>.<hex>.tmp`; the next save in that directory
    removes it, but never a temp file of a process that is still running."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".best-01.safetensors.{dead.pid}.0123abcd.tmp"
    alive = tmp_path / f".best-02.safetensors.{os.getppid()}.0123abcd.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for path in (stale, alive, unrelated):
        path.write_bytes(b"partial")
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "best-03.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, unrelated.name, "best-03.safetensors"])
