"""Checkpoint files at URLs (checkpoint/fsspec_storage.py): uploaded, then committed by a manifest.

Every test runs on fsspec's `memory://` store (fast; the store is emptied between tests) and, marked
slow, on a real S3 API: moto's server on 127.0.0.1 (no network), through s3fs.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import Crash, make_model, make_regression

import torchcallbacks as tc
from torchcallbacks.checkpoint.errors import CheckpointError, CheckpointWriteError
from torchcallbacks.checkpoint.fsspec_storage import FsspecStorage

fsspec = pytest.importorskip("fsspec")


class Store:
    """A place to write checkpoints: a base URL, its storage options and the fsspec file system."""

    def __init__(self, base: str, options: dict[str, Any] | None) -> None:
        self.base = base
        self.options = options
        self.fs = FsspecStorage(base, options).fs

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def key(self, name: str) -> str:
        return str(self.fs._strip_protocol(self.url(name)))

    def names(self, directory: str = "") -> list[str]:
        self.fs.invalidate_cache()
        where = self.key(directory) if directory else str(self.fs._strip_protocol(self.base))
        try:
            return sorted(os.path.basename(str(p).rstrip("/")) for p in self.fs.ls(where, detail=False))
        except FileNotFoundError:
            return []

    def put(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self.key(name), data)
        self.fs.invalidate_cache()

    def get(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(self.key(name)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpt-bucket")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        from fsspec.implementations.memory import MemoryFileSystem

        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs.clear()
        MemoryFileSystem.pseudo_dirs.append("")
        yield Store(f"memory://run-{uuid.uuid4().hex[:8]}", None)
        MemoryFileSystem.store.clear()
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    options = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    yield Store(f"s3://ckpt-bucket/run-{uuid.uuid4().hex[:8]}", options)


def _fit(model: torch.nn.Module, callbacks: list[tc.Callback], epochs: int = 3) -> None:
    tc.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.05), loss=F.mse_loss,
           epochs=epochs, verbose=0, callbacks=callbacks)


# -- files ---------------------------------------------------------------------------------------------
def test_weights_round_trip_and_the_manifest_commits_the_file(store: Store) -> None:
    model = make_model()
    tc.save_weights(model, store.url("w.safetensors"), storage_options=store.options)
    assert store.names() == ["w.safetensors", "w.safetensors.manifest.json"]
    manifest = json.loads(store.get("w.safetensors.manifest.json"))
    data = store.get("w.safetensors")
    import hashlib

    assert manifest == {"format": "torchcallbacks.manifest", "format_version": 1,
                        "objects": [{"name": "w.safetensors", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}
    other = make_model()
    tc.load_weights(other, store.url("w.safetensors"), storage_options=store.options)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)

    # replacing a committed file: the new bytes go to a unique data name, the old object goes after the commit
    with torch.no_grad():
        model[0].weight.add_(1.0)
    tc.save_weights(model, store.url("w.safetensors"), storage_options=store.options)
    names = store.names()
    assert len(names) == 2 and names[0].startswith("w.safetensors.") and names[0].endswith(".data"), names
    tc.load_weights(other, store.url("w.safetensors"), storage_options=store.options)
    assert torch.equal(other[0].weight, model[0].weight)


def test_checkpoint_round_trip(store: Store) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _fit(model, [], epochs=1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    tc.save_checkpoint(model, store.url("state.safetensors"), optimizer, epoch=3, global_step=12,
                       storage_options=store.options)
    other = make_model()
    other_optimizer = torch.optim.Adam(other.parameters(), lr=0.01)
    state = tc.load_checkpoint(other, store.url("state.safetensors"), other_optimizer, storage_options=store.options)
    assert (state.epoch, state.global_step) == (3, 12)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][name], other_optimizer.state[q][name])


def test_data_without_a_manifest_is_not_a_checkpoint(store: Store) -> None:
    model = make_model()
    tc.save_weights(model, store.url("good.safetensors"), storage_options=store.options)
    store.put("torn.safetensors", store.get("good.safetensors"))  # an upload killed before its manifest
    with pytest.raises(FileNotFoundError, match=r"no manifest .*an upload that was never committed"):
        tc.load_weights(make_model(), store.url("torn.safetensors"), storage_options=store.options)


def test_a_manifest_whose_size_or_hash_does_not_match_is_refused(store: Store) -> None:
    model = make_model()
    url = store.url("w.safetensors")
    tc.save_weights(model, url, storage_options=store.options)
    manifest = json.loads(store.get("w.safetensors.manifest.json"))
    manifest["objects"][0]["size"] += 1
    store.put("w.safetensors.manifest.json", json.dumps(manifest).encode())
    with pytest.raises(CheckpointError, match=r"the data object has \d+ bytes, its manifest says \d+"):
        tc.load_weights(make_model(), url, storage_options=store.options)
    manifest["objects"][0]["size"] -= 1
    manifest["objects"][0]["sha256"] = "0" * 64
    store.put("w.safetensors.manifest.json", json.dumps(manifest).encode())
    with pytest.raises(CheckpointError, match=r"does not match its manifest \(size or sha256\)"):
        tc.load_weights(make_model(), url, storage_options=store.options)


def test_a_header_length_over_the_limit_is_refused_from_the_first_8_bytes(store: Store) -> None:
    model = make_model()
    url = store.url("w.safetensors")
    tc.save_weights(model, url, storage_options=store.options)
    data = bytearray(store.get("w.safetensors"))
    data[:8] = (2**40).to_bytes(8, "little")
    store.put("w.safetensors", bytes(data))  # same size: the manifest's size check passes, the sha256 would not
    with pytest.raises(CheckpointError, match=r"header length field says 1099511627776 bytes"):
        tc.load_weights(make_model(), url, storage_options=store.options)


def test_interrupted_uploads_are_removed_at_the_next_save_and_only_ours(store: Store) -> None:
    model = make_model()
    tc.save_weights(model, store.url("w.safetensors"), storage_options=store.options)
    store.put(f"w.safetensors.{uuid.uuid4().hex}.data", b"half an upload")  # ours: a unique data name
    store.put("notes.txt", b"the user's")  # not ours
    store.put("w.safetensors.backup", b"not a name of ours either")
    tc.save_weights(model, store.url("w.safetensors"), storage_options=store.options)
    names = store.names()
    assert "notes.txt" in names and "w.safetensors.backup" in names
    assert len([n for n in names if n.endswith(".data")]) <= 1  # only the committed one, if it has a unique name
    manifest = json.loads(store.get("w.safetensors.manifest.json"))
    assert manifest["objects"][0]["name"] in names


# -- ModelCheckpoint -----------------------------------------------------------------------------------
class Feed(tc.Callback):
    """Overrides the epoch's `val_loss` with a scripted sequence."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs["val_loss"] = self.values[epoch]


def test_model_checkpoint_max_to_keep_keeps_the_best_files(store: Store) -> None:
    ckpt = tc.ModelCheckpoint(store.url("ckpt/b-{epoch}.safetensors"), save_best_only=True, max_to_keep=2,
                              save_weights_only=True, storage_options=store.options)
    model = make_model()
    store.put("ckpt/b-9.safetensors", b"an upload killed before its manifest")  # a name of ours: removed
    store.put("ckpt/README", b"the user's")
    _fit(model, [Feed([0.9, 0.5, 0.7, 0.6, 0.4]), ckpt], epochs=5)
    assert store.names("ckpt") == ["README", "b-2.safetensors", "b-2.safetensors.manifest.json",
                                   "b-5.safetensors", "b-5.safetensors.manifest.json"]
    assert ckpt.best_path == store.url("ckpt/b-5.safetensors")
    assert ckpt.committed_paths() == [store.url("ckpt/b-2.safetensors"), store.url("ckpt/b-5.safetensors")]
    other = make_model()
    tc.load_weights(other, ckpt.best_path, storage_options=store.options)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_model_checkpoint_full_state_newest_kept(store: Store) -> None:
    ckpt = tc.ModelCheckpoint(store.url("ckpt/s-{epoch}.safetensors"), max_to_keep=2, storage_options=store.options)
    model = make_model()
    _fit(model, [ckpt], epochs=3)
    assert store.names("ckpt") == ["s-2.safetensors", "s-2.safetensors.manifest.json",
                                   "s-3.safetensors", "s-3.safetensors.manifest.json"]
    state = tc.load_checkpoint(make_model(), store.url("ckpt/s-3.safetensors"), storage_options=store.options)
    assert state.epoch == 3


def test_model_checkpoint_state_naming_another_url_is_refused(store: Store) -> None:
    ckpt = tc.ModelCheckpoint(store.url("ckpt/b-{epoch}.safetensors"), storage_options=store.options)
    with pytest.raises(ValueError, match="refusing a state that points elsewhere"):
        ckpt.load_state_dict({"best": None, "best_path": store.url("elsewhere/x.safetensors"), "last_path": None,
                              "kept": []})


# -- BackupAndRestore ----------------------------------------------------------------------------------
def _train(backup: tc.BackupAndRestore | None, extra: list[tc.Callback], epochs: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    tc.fit(model, make_regression(shuffle=True), optimizer=optimizer, loss=F.mse_loss, epochs=epochs, verbose=0,
           callbacks=[*extra, *([backup] if backup is not None else [])])
    return model


@pytest.mark.parametrize("double_checkpoint", [False, True])
def test_backup_and_restore_resume_from_the_store_is_exact(store: Store, double_checkpoint: bool) -> None:
    reference = _train(None, [])
    backup_dir = store.url("backup")
    with pytest.raises(RuntimeError, match="crash"):
        _train(tc.BackupAndRestore(backup_dir, save_freq=3, double_checkpoint=double_checkpoint,
                                   storage_options=store.options), [Crash(10)])
    manifests = {n for n in store.names("backup") if n.endswith(".manifest.json")}
    assert manifests == {"latest.safetensors.manifest.json"} | (
        {"previous.safetensors.manifest.json"} if double_checkpoint else set())
    resumed = _train(tc.BackupAndRestore(backup_dir, save_freq=3, double_checkpoint=double_checkpoint,
                                         storage_options=store.options), [])
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert store.names("backup") == []  # delete_checkpoint: removed at a normal end


def test_a_torn_latest_falls_back_to_the_committed_previous(store: Store) -> None:
    backup_dir = store.url("backup")
    with pytest.raises(RuntimeError, match="crash"):
        _train(tc.BackupAndRestore(backup_dir, save_freq=3, double_checkpoint=True, storage_options=store.options),
               [Crash(10)])
    manifest = json.loads(store.get("backup/latest.safetensors.manifest.json"))
    manifest["objects"][0]["size"] += 7  # a manifest that does not match its data
    store.put("backup/latest.safetensors.manifest.json", json.dumps(manifest).encode())
    backup = tc.BackupAndRestore(backup_dir, save_freq=3, double_checkpoint=True, delete_checkpoint=False,
                                 storage_options=store.options)
    with pytest.warns(UserWarning, match=r"its manifest says .*falling back to .*previous\.safetensors"):
        _train(backup, [], epochs=4)
    assert backup.restored is not None and backup.restored.global_step == 6  # the backup before the latest (9)


def test_a_latest_without_manifest_is_ignored(store: Store) -> None:
    backup_dir = store.url("backup")
    with pytest.raises(RuntimeError, match="crash"):
        _train(tc.BackupAndRestore(backup_dir, save_freq=3, storage_options=store.options), [Crash(10)])
    for name in store.names("backup"):  # the commit never happened: data only
        if name.endswith(".manifest.json"):
            store.fs.rm_file(store.key(f"backup/{name}"))
    backup = tc.BackupAndRestore(backup_dir, save_freq=3, delete_checkpoint=False, storage_options=store.options)
    _train(backup, [], epochs=1)
    assert backup.restored is None  # started afresh: uncommitted data is no checkpoint


def test_the_manifest_of_latest_is_a_compare_and_swap_where_the_store_has_one(store: Store) -> None:
    storage = FsspecStorage(store.base, store.options)
    if store.base.startswith("memory://"):
        assert not storage.conditional_writes
        pytest.skip("this store has no conditional writes (fsspec's memory store): last writer wins")
    url = store.url("backup/latest.safetensors")
    storage.write_file(url, {"w": torch.ones(2)}, {"format": "pt"})
    real = storage._manifest_etag

    def stale_etag(u: str) -> str | None:  # another writer committed since this one read the manifest
        etag = real(u)
        other = FsspecStorage(store.base, store.options)
        other.write_file(u, {"w": torch.zeros(2)}, {"format": "pt"})
        return etag

    storage._manifest_etag = stale_etag  # type: ignore[method-assign]
    with pytest.raises(CheckpointWriteError, match="another writer replaced this checkpoint's manifest"):
        storage.write_file(url, {"w": torch.full((2,), 2.0)}, {"format": "pt"})
    tensors, _ = FsspecStorage(store.base, store.options).read_file(url)
    assert torch.equal(tensors["w"], torch.zeros(2))  # the other writer's commit stands


# -- a missing backend ---------------------------------------------------------------------------------
def test_a_missing_backend_names_the_extra_when_the_object_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = sys.modules["fsspec.registry"]
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` raises ImportError
    # fsspec looks classes up in its registry (filled at the first use of s3://, e.g. by the slow tests)
    monkeypatch.setattr(registry, "registry", MappingProxyType(
        {k: v for k, v in registry.registry.items() if k not in ("s3", "s3a")}))
    model = make_model()
    calls = {
        "ModelCheckpoint: filepath": lambda: tc.ModelCheckpoint("s3://b/m.safetensors"),
        "BackupAndRestore: backup_dir": lambda: tc.BackupAndRestore("s3://b/backup"),
        "save_weights: filepath": lambda: tc.save_weights(model, "s3://b/m.safetensors"),
        "load_weights: filepath": lambda: tc.load_weights(model, "s3://b/m.safetensors"),
        "save_checkpoint: filepath": lambda: tc.save_checkpoint(model, "s3://b/m.safetensors"),
        "load_checkpoint: filepath": lambda: tc.load_checkpoint(model, "s3://b/m.safetensors"),
    }
    for name, call in calls.items():
        with pytest.raises(ImportError, match=rf"^{name}: 's3://b[^']*' needs fsspec .*pip install torchcallbacks\[s3\]"):
            call()


def test_storage_options_with_a_local_path_are_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="storage_options apply to URLs"):
        tc.save_weights(make_model(), tmp_path / "w.safetensors", storage_options={"anon": True})


class FaultyFS:
    """An fsspec file system that fails its `fail_at`-th call (of those that touch the store) with an
    OSError, as a dropped connection would; every other call goes to the real one."""

    CALLS = frozenset({"pipe_file", "cat_file", "size", "info", "copy", "rm_file", "ls", "exists", "open"})

    def __init__(self, real: Any, fail_at: int) -> None:
        self._real, self._fail_at, self.calls = real, fail_at, 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name not in self.CALLS:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self._fail_at:
                raise OSError(f"injected failure of call {self.calls} ({name})")
            return attribute(*args, **kwargs)

        return call


def _values(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("what", ["weights", "checkpoint"])
def test_each_call_of_a_save_failing_in_turn_leaves_the_previous_checkpoint_loadable(
    store: Store, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """Fail the 1st, 2nd, ... call a save makes to the store, one save each, until a save makes no
    failing call: after each failure the file read back is the previous checkpoint, whole; after the
    save that went through, the new one."""
    url, old, new = store.url(f"{what}.safetensors"), make_model(), make_model()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)

    def save(model: torch.nn.Module) -> None:
        if what == "weights":
            tc.save_weights(model, url, storage_options=store.options)
        else:
            tc.save_checkpoint(model, url, torch.optim.SGD(model.parameters(), lr=0.1), storage_options=store.options)

    def load() -> list[torch.Tensor]:
        target = make_model()
        if what == "weights":
            tc.load_weights(target, url, storage_options=store.options)
        else:
            tc.load_checkpoint(target, url, storage_options=store.options)
        return _values(target)

    save(old)
    from fsspec.core import url_to_fs

    failed = 0
    for fail_at in range(1, 60):
        faulty: list[FaultyFS] = []

        def injected(u: str, faulty: list[FaultyFS] = faulty, fail_at: int = fail_at, **options: Any) -> Any:
            fs, path = url_to_fs(u, **options)
            faulty.append(FaultyFS(fs, fail_at))
            return faulty[-1], path

        monkeypatch.setattr("fsspec.core.url_to_fs", injected)  # FsspecStorage imports it when built
        try:
            save(new)
        except (OSError, CheckpointError) as exc:
            assert "injected failure" in str(exc) or isinstance(exc.__cause__, OSError), exc
            failed += 1
            monkeypatch.undo()
            got = load()
            assert all(torch.equal(a, b) for a, b in zip(got, _values(old), strict=True)) or all(
                torch.equal(a, b) for a, b in zip(got, _values(new), strict=True)), f"torn after failing call {fail_at}"
            save(old)  # back to the old one for the next round
            continue
        monkeypatch.undo()
        if all(f.calls < fail_at for f in faulty):  # no call failed: the save went through whole
            break
        save(old)  # the failing call was one the save does not need to succeed (a cleanup): go on
    else:
        pytest.fail("every save kept failing")
    assert failed >= 3, failed  # the upload, the manifest and the checks around them each failed once
    assert all(torch.equal(a, b) for a, b in zip(load(), _values(new), strict=True))


@pytest.mark.slow  # 20 and more training processes, each killed during its uploads
def test_sigkilled_during_uploads_to_s3_resumes_exactly_and_never_reads_a_torn_backup(
    s3_endpoint: str, tmp_path: Any, random_seed: int
) -> None:
    """A real process backing up to the S3 server is killed with SIGKILL at random moments of its
    uploads (a backup every 2 steps, 0-30 ms after the step that starts one), 20 times; each rerun
    resumes from what was committed, and the run ends with the weights of one never killed."""
    import random
    import signal
    import subprocess
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    rng = random.Random(random_seed)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parent), "OMP_NUM_THREADS": "1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    script = [sys.executable, str(here / "remote_kill_script.py")]

    def run(workdir: Path, url: str, kill_after: int | None = None) -> int:
        workdir.mkdir(exist_ok=True)
        process = subprocess.Popen([*script, str(workdir), s3_endpoint, url], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if kill_after is not None and line.startswith("step ") and int(line.split()[1]) >= kill_after:
                    time.sleep(rng.uniform(0.0, 0.03))  # somewhere in the backup's upload, or after it
                    process.send_signal(signal.SIGKILL)
                    break
            _, err = process.communicate(timeout=120)
        finally:
            process.kill()
        if process.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"seed {random_seed}: exit status {process.returncode}: {err[-3000:]}")
        return process.returncode

    prefix = f"s3://ckpt-bucket/kill-{uuid.uuid4().hex[:8]}"
    assert run(tmp_path / "reference", f"{prefix}/reference") == 0
    reference = load_file(tmp_path / "reference" / "final.safetensors")
    kills = 0
    while kills < 20:  # 96 steps: a kill lands at a step >= its target, and a rerun gets 2 steps further at most
        if run(tmp_path / "killed", f"{prefix}/killed", kill_after=rng.randint(1, 40)) == 0:
            break  # it ended before the kill landed
        kills += 1
    assert kills == 20, f"seed {random_seed}: only {kills} kills landed"
    assert run(tmp_path / "killed", f"{prefix}/killed") == 0
    resumed = load_file(tmp_path / "killed" / "final.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), f"seed {random_seed}"


@pytest.mark.slow  # torchrun: two processes
def test_a_ddp_run_backs_up_to_s3_and_resumes_exactly(s3_endpoint: str, tmp_path: Any) -> None:
    """Two processes (gloo): process 0 uploads the backups, both read the committed one at the resume;
    the resumed run ends with the weights of the uninterrupted one on both processes."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent / "distributed"
    env = {**os.environ, "PYTHONPATH": str(here.parent.parent), "OMP_NUM_THREADS": "1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    prefix = f"s3://ckpt-bucket/ddp-{uuid.uuid4().hex[:8]}"

    def torchrun(name: str, crash: int) -> list[dict[str, Any]]:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(here / "s3_worker.py"), str(workdir), s3_endpoint, f"{prefix}/{name}", str(crash)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=workdir)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return [json.loads((workdir / f"rank_{r}.json").read_text()) for r in range(2)]

    reference = torchrun("reference", 0)
    crashed = torchrun("run", 10)
    assert [r["outcome"] for r in crashed] == ["crashed: crash"] * 2
    resumed = torchrun("run", 0)
    assert [(r["outcome"], r["resumed_at"]) for r in resumed] == [("finished", 8)] * 2
    for ours, theirs in zip(resumed, reference, strict=True):
        assert ours["weights"] == theirs["weights"]
