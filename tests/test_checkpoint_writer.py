"""The atomic and asynchronous writer: kill-during-save, full disk, one write in flight, errors
raised on the training thread."""

from __future__ import annotations

import errno
import json
import os
import random
import re
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
from torchcallbacks.checkpoint import CheckpointWriter, atomic_save_file, read_file, writer

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
        state = tc.load_checkpoint(model, path)
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

    monkeypatch.setattr(writer, "save_file", disk_full)
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
    real = writer.save_file

    def slow(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        real(tensors, filename, metadata=metadata)
        with lock:
            active[0] -= 1

    monkeypatch.setattr(writer, "save_file", slow)
    w = CheckpointWriter(async_save=True)
    for i in range(4):
        w.write(tmp_path / f"{i}.safetensors", {"t": torch.full((10,), float(i))})
    w.flush()
    assert peak[0] == 1
    assert [float(load_file(tmp_path / f"{i}.safetensors")["t"][0]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_async_error_is_raised_on_the_training_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(tensors: Any, filename: str, metadata: Any = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", fail)
    w = CheckpointWriter(async_save=True)
    w.write(tmp_path / "a.safetensors", {"t": torch.zeros(3)})
    with pytest.raises(OSError, match="No space"):
        w.write(tmp_path / "b.safetensors", {"t": torch.zeros(3)})  # raised at the next save
    w.flush()  # the second write failed too
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_async_error_surfaces_at_train_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(tensors: Any, filename: str, metadata: Any = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", fail)
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


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _temp(directory: Path, base: str, host: str, pid: int, age: float = 0.0) -> Path:
    path = directory / f".{base}.{host}.{pid}.0123abcd.tmp"
    path.write_bytes(b"partial")
    if age:
        old = time.time() - age
        os.utime(path, (old, old))
    return path


def test_temp_names_carry_the_sanitised_host_and_the_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names: list[str] = []
    real = writer.save_file

    def spy(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        names.append(os.path.basename(os.path.dirname(filename)))  # the temp directory it writes in
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(writer, "save_file", spy)
    monkeypatch.setattr(writer.socket, "gethostname", lambda: "node_7.cluster.example")
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert len(names) == 1
    match = re.fullmatch(r"\.w\.safetensors\.node-7-cluster-example\.(\d+)\.[0-9a-f]{8}\.tmp", names[0])
    assert match is not None and int(match.group(1)) == os.getpid(), names
    assert os.listdir(tmp_path) == ["w.safetensors"]
    # A long file name is shortened in the temp name, never past the 255-byte limit.
    atomic_save_file({"w": torch.ones(2)}, tmp_path / ("x" * 250))
    assert len(names[1].encode()) <= 255 and names[1].endswith(f".node-7-cluster-example.{os.getpid()}.{names[1][-12:-4]}.tmp")


def test_temp_files_of_dead_writers_on_this_host_are_removed_at_the_next_save(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-write leaves `.<name>.<host>.<pid>.<hex>.tmp`; the next save in that
    directory removes it if the host is this one and the process is gone, never a temp file of a
    process of this host that is still running (nor one of this process)."""
    host = writer._host_name()
    stale = _temp(tmp_path, "best-01.safetensors", host, _dead_pid())
    alive = _temp(tmp_path, "best-02.safetensors", host, os.getppid())
    own = _temp(tmp_path, "best-02.safetensors", host, os.getpid())
    impossible = _temp(tmp_path, "best-02.safetensors", host, 10**30)  # no process has that pid
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "best-03.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, own.name, "best-03.safetensors"])
    assert not stale.exists() and not impossible.exists()


def test_a_killed_save_files_own_temp_file_goes_with_its_temp_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors' save_file writes `.tmpXXXXXX` beside the file it is given before renaming it; a
    kill leaves that one (as large as the checkpoint) inside our temp directory, which the next save
    removes whole."""
    seen: set[str] = set()
    real = writer.save_file

    def spy(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        real(tensors, filename, metadata=metadata)
        seen.update(os.listdir(tmp_path))

    monkeypatch.setattr(writer, "save_file", spy)
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    monkeypatch.undo()
    assert seen and all(name.startswith(".w.safetensors.") and name.endswith(".tmp") for name in seen)  # nothing else
    left = tmp_path / f".w.safetensors.{writer._host_name()}.{_dead_pid()}.0123abcd.tmp"
    left.mkdir()
    (left / ".tmpAb12Cd").write_bytes(b"x" * 1000)  # save_file's own temp file, killed mid-write
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_temp_files_of_other_hosts_are_removed_only_once_older_than_the_bound(tmp_path: Path) -> None:
    """On a shared file system a pid named by another host cannot be checked here (the pid of a dead
    process here may be a live write there): such a temp file is kept until its mtime is older than
    STALE_TEMP_SECONDS."""
    pid, bound = _dead_pid(), writer.STALE_TEMP_SECONDS
    assert bound == 24 * 60 * 60
    other = "other-host" if writer._host_name() != "other-host" else "another-host"
    recent = _temp(tmp_path, "w.safetensors", other, pid)
    almost = _temp(tmp_path, "w.safetensors", other, pid + 1, age=bound - 600)
    old = _temp(tmp_path, "w.safetensors", other, pid + 2, age=bound + 600)
    old_alive_here = _temp(tmp_path, "w.safetensors", writer._host_name(), os.getppid(), age=bound + 600)
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert recent.exists() and almost.exists()
    assert not old.exists() and not old_alive_here.exists()


def test_files_that_are_not_our_temp_files_are_never_touched(tmp_path: Path) -> None:
    host, pid, age = writer._host_name(), _dead_pid(), 10 * writer.STALE_TEMP_SECONDS
    others = [
        ".notes.tmp",
        "w.safetensors.tmp",
        f"w.safetensors.{host}.{pid}.0123abcd.tmp",  # no leading dot
        f".w.safetensors.{host}.{pid}.0123abcd.tmp.bak",
        f".w.safetensors.{host}.{pid}.0123ABCD.tmp",
        f".w.safetensors.{host}.{pid}.0123abc.tmp",
        f".w.safetensors.ho_st.{pid}.0123abcd.tmp",
        f".w.safetensors.{host}.{pid}x.0123abcd.tmp",
    ]
    old = time.time() - age
    for name in others:
        (tmp_path / name).write_bytes(b"not ours")
        os.utime(tmp_path / name, (old, old))
    # Our temp files, old and of a dead process, but in a directory other than the one written to.
    sub = tmp_path / "sub"
    sub.mkdir()
    nested = [_temp(sub, "w.safetensors", host, pid), _temp(sub, "w.safetensors", "other-host", pid, age=age)]
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "sub", "w.safetensors"])
    assert all(path.exists() for path in nested)


def test_a_directory_named_like_a_stale_temp_is_removed_only_when_it_holds_only_names_of_ours(tmp_path: Path) -> None:
    host, pid, age = writer._host_name(), _dead_pid(), 10 * writer.STALE_TEMP_SECONDS
    names = [f".w.safetensors.{host}.{pid}.{i:08x}.tmp" for i in range(5)]
    contents: list[dict[str, bytes | None]] = [
        {"file": b"partial", ".tmpAb12Cd": b"x"},  # ours: removed
        {"notes.txt": b"mine"},  # someone's directory that only looks like a temp name
        {"file": b"partial", "keep": None},  # a subdirectory: not ours
        {"file": b"partial", ".tmpAb12Cd.bak": b"x"},
        {},  # an empty one of ours (killed before the file was created)
    ]
    for name, inside in zip(names, contents, strict=True):
        (tmp_path / name).mkdir()
        for entry, data in inside.items():
            (tmp_path / name / entry).mkdir() if data is None else (tmp_path / name / entry).write_bytes(data)
    link = tmp_path / f".w.safetensors.{host}.{pid}.0000000f.tmp"
    link.symlink_to(tmp_path / names[1])
    old = time.time() - age
    for path in [*(tmp_path / n for n in names), link]:
        os.utime(path, (old, old), follow_symlinks=False)
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1:4], link.name, "w.safetensors"])
    assert (tmp_path / names[1] / "notes.txt").read_bytes() == b"mine" and (tmp_path / names[2] / "keep").is_dir()


def test_a_sweep_that_fails_does_not_fail_the_save_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory is removed by someone else right after the file is in place: the save succeeded."""
    real_listdir = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        if os.fspath(path) == str(tmp_path):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_listdir(path)

    monkeypatch.setattr(writer.os, "listdir", listdir)
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    monkeypatch.undo()
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.ones(2))


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="this torch build has no float8_e8m0fnu")
@pytest.mark.parametrize("async_save", [False, True])
def test_float8_e8m0fnu_round_trips(tmp_path: Path, async_save: bool) -> None:
    """dtypes safetensors stores but the old hand-written table refused (as "cannot be stored")."""
    scales = torch.tensor([2.0**-3, 0.5, 1.0, 2.0, 2.0**10]).to(torch.float8_e8m0fnu)
    state = {"scales": scales, "fnuz": torch.tensor([0.5, -1.5, 3.0]).to(torch.float8_e4m3fnuz)}
    w = CheckpointWriter(async_save=async_save)
    tc.save_weights(state, tmp_path / "s.safetensors", writer=w)
    w.close()
    for loaded in (load_file(tmp_path / "s.safetensors"), read_file(tmp_path / "s.safetensors")[0]):
        for name, tensor in state.items():
            assert loaded[name].dtype == tensor.dtype
            assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert float(load_file(tmp_path / "s.safetensors")["scales"].float()[-1]) == 1024.0


def test_save_weights_takes_writer_and_delete_after_by_keyword_only(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="positional"):
        tc.save_weights({"w": torch.ones(2)}, tmp_path / "w.safetensors", None, CheckpointWriter())  # type: ignore[misc]
    assert not (tmp_path / "w.safetensors").exists()


def test_a_dtype_safetensors_cannot_store_is_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"tensor 'z': dtype torch.complex128 cannot be stored in safetensors"):
        tc.save_weights({"ok": torch.ones(2), "z": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "z.safetensors")
    assert not list(tmp_path.iterdir())


def test_close_flushes_and_drops_the_host_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = CheckpointWriter(async_save=True)
    w.write(tmp_path / "a.safetensors", {"t": torch.ones(1000)})
    assert set(w._buffers) == {"t"}
    w.close()
    assert w._buffers == {}
    assert torch.equal(load_file(tmp_path / "a.safetensors")["t"], torch.ones(1000))
    w.write(tmp_path / "b.safetensors", {"t": torch.zeros(10)})  # still usable
    w.close()
    assert torch.equal(load_file(tmp_path / "b.safetensors")["t"], torch.zeros(10))

    def fail(tensors: Any, filename: str, metadata: Any = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", fail)
    w.write(tmp_path / "c.safetensors", {"t": torch.zeros(10)})
    with pytest.raises(OSError, match="No space"):
        w.close()  # the write's error is raised, and the buffers are dropped all the same
    assert w._buffers == {}


@pytest.mark.parametrize("callback", ["checkpoint", "backup"])
def test_after_fit_an_async_writer_holds_no_buffers(tmp_path: Path, callback: str) -> None:
    model = torch.nn.Linear(4, 1)
    data = [(torch.randn(8, 4), torch.randn(8, 1))] * 2
    if callback == "checkpoint":
        cb: Any = tc.ModelCheckpoint(str(tmp_path / "m.safetensors"), async_save=True, save_weights_only=True)
    else:
        cb = tc.BackupAndRestore(str(tmp_path / "backup"), save_freq=1, delete_checkpoint=False, async_save=True)
    seen: list[int] = []
    probe = tc.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(len(cb._writer.files._buffers)))
    tc.fit(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss=torch.nn.functional.mse_loss,
           epochs=2, verbose=0, callbacks=[cb, probe])
    assert max(seen) > 0  # the writer did keep host copies during training
    assert cb._writer.files._buffers == {}


@pytest.mark.parametrize("what", ["weights", "training state"])
def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """The order that makes a save crash-safe, recorded at the os level: the new file's data reaches the
    disk (fsync of the file) before it takes the target's name (os.replace), and the rename itself
    (fsync of the directory) after."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.path.abspath(src)))
        real_replace(src, dst)
        events.append(("replaced", os.path.abspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "ckpt" / "m.safetensors"
    model = torch.nn.Linear(3, 2)
    if what == "weights":
        tc.save_weights(model, target)
    else:
        tc.save_checkpoint(model, target, torch.optim.SGD(model.parameters(), lr=0.1))
    renames = [i for i, event in enumerate(events) if event == ("replaced", str(target))]
    assert len(renames) == 1, events
    moved = events[renames[0] - 1]
    assert moved[0] == "replace"
    temp = moved[1]
    assert ("fsync", temp) in events[: renames[0] - 1], events  # the data before the name
    assert ("fsync", str(target.parent)) in events[renames[0] + 1 :], events  # the name after the rename
    assert load_file(target).keys() == tc.checkpoint.read_file(target)[0].keys()


_FILE_TOO_LARGE = """
import errno, json, os, resource, signal, sys
import torch
import torchcallbacks as tc
from safetensors.torch import load_file

path = sys.argv[1]
tc.save_weights({"w": torch.ones(4)}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit is then EFBIG, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    tc.save_weights({"w": torch.ones(1 << 20)}, path)
except tc.CheckpointWriteError as error:
    print(json.dumps({"errno": error.errno, "filename": error.filename, "message": str(error),
                      "kept": load_file(path)["w"].tolist(), "names": os.listdir(os.path.dirname(path))}))
"""


@pytest.mark.slow  # a subprocess: the file size limit applies to the whole process
def test_a_write_beyond_the_file_size_limit_is_an_os_error_naming_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "w.safetensors")
    out = subprocess.run([sys.executable, "-c", _FILE_TOO_LARGE, path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["errno"] == errno.EFBIG and result["filename"] == path
    assert result["message"] == f"[Errno {errno.EFBIG}] File too large (writing a checkpoint file): {path!r}"
    assert result["kept"] == [1.0] * 4 and result["names"] == ["w.safetensors"]  # the old file, no temp left
