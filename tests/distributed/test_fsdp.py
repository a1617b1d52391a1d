"""Sharded checkpoints of FSDP2 models (`torchcallbacks.checkpoint.sharded`) under real torchrun (gloo, CPU).

Each launch has a timeout, so a hang (a process waiting in a collective another one skipped) fails the
test. The worker is fsdp_worker.py beside this file; launches are shared by module-scoped fixtures.
The last tests run in one process without torchrun (DCP works without a process group).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TIMEOUT = 120

pytestmark = pytest.mark.slow


def _command(nproc: int, workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(HERE / "fsdp_worker.py"), str(workdir), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(_command(nproc, workdir, *args), capture_output=True, text=True, timeout=TIMEOUT,
                            env=_env(), cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _assert_same_state(a_path: Path, b_path: Path) -> None:
    """Two gathered full states (fsdp_worker.write_full): the same tensors bit for bit, the same rest."""
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys() and len(a) == 17  # 5 model tensors, 3 x 4 Adam states
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different
    with safe_open(a_path, "pt") as fa, safe_open(b_path, "pt") as fb:
        assert json.loads(fa.metadata()["document"]) == json.loads(fb.metadata()["document"])


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved by 2 processes (`ckpt`), then loaded by 2 and by 1."""
    workdir = tmp_path_factory.mktemp("fsdp_two")
    torchrun(2, workdir, "save", str(workdir / "ckpt"))
    torchrun(2, workdir, "load", str(workdir / "ckpt"))
    torchrun(1, workdir, "load", str(workdir / "ckpt"))
    return workdir


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved by 1 process, loaded by 2."""
    workdir = tmp_path_factory.mktemp("fsdp_one")
    torchrun(1, workdir, "save", str(workdir / "ckpt"))
    torchrun(2, workdir, "load", str(workdir / "ckpt"))
    return workdir


def test_round_trip_on_two_processes_restores_model_and_adam_state_exactly(two: Path) -> None:
    before = load_file(two / "ckpt.before.safetensors")
    after_init = load_file(two / "ckpt.after_2.safetensors")
    assert any(k.startswith("optim/state/") and k.endswith("exp_avg_sq") for k in before)
    _assert_same_state(two / "ckpt.before.safetensors", two / "ckpt.after_2.safetensors")
    assert after_init["model/0.weight"].shape == (33, 16)
    # training on from the loaded state gives what the saving run got, bit for bit (exact resume)
    _assert_same_state(two / "ckpt.continued.safetensors", two / "ckpt.resumed_2.safetensors")
    # every process's own value came back, in rank order
    for rank in range(2):
        processes = json.loads((two / f"ckpt.processes_2_{rank}.json").read_text())
        assert processes == [{"rank": 0, "t": [0.0, 0.0]}, {"rank": 1, "t": [1.0, 1.0]}]


def test_two_processes_to_one_and_one_to_two_reshard(two: Path, one: Path) -> None:
    _assert_same_state(two / "ckpt.before.safetensors", two / "ckpt.after_1.safetensors")
    _assert_same_state(one / "ckpt.before.safetensors", one / "ckpt.after_2.safetensors")
    assert json.loads((one / "ckpt.processes_2_1.json").read_text()) == [{"rank": 0, "t": [0.0, 0.0]}]


def test_the_directory_holds_safetensors_shards_and_json_only(two: Path) -> None:
    ckpt = two / "ckpt"
    names = sorted(os.listdir(ckpt))
    assert names == ["dcp_metadata.json", "replicated.safetensors", "shard-00000-of-00002.safetensors",
                     "shard-00001-of-00002.safetensors", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    metadata = json.loads((ckpt / "dcp_metadata.json").read_text())
    before = load_file(two / "ckpt.before.safetensors")
    # DTensors (4 parameters, 8 Adam moments) in shards; the rest (buffer, Adam steps) once, by rank 0
    assert sorted(metadata["tensors"]) == state["sharded"] and len(state["sharded"]) == 12
    assert sorted(state["sharded"] + state["replicated"]) == sorted(before)
    replicated = load_file(ckpt / "replicated.safetensors")
    assert sorted(replicated) == state["replicated"] == ["model/scale"] + [f"optim/state/{p}/step" for p in
                                                                           ("0.bias", "0.weight", "2.bias", "2.weight")]
    assert all(torch.equal(replicated[k], before[k]) for k in replicated)
    # safetensors' own reader reads every chunk, and the chunks put together are the full tensors
    for name, entry in metadata["tensors"].items():
        full = torch.zeros(entry["size"], dtype=before[name].dtype)
        for chunk in entry["chunks"]:
            with safe_open(ckpt / chunk["file"], "pt") as file:
                part = file.get_tensor(chunk["key"])
            assert list(part.shape) == chunk["sizes"]
            index = tuple(slice(o, o + s) for o, s in zip(chunk["offsets"], chunk["sizes"], strict=True))
            full[index] = part
        assert torch.equal(full, before[name]), name
    # the 33-row weight is split between both files
    assert {c["file"] for c in metadata["tensors"]["model/0.weight"]["chunks"]} == set(names[2:4])


def test_each_process_writes_about_its_own_shards(two: Path) -> None:
    total = sum(t.numel() * t.element_size() for t in load_file(two / "ckpt.before.safetensors").values())
    for rank in range(2):
        info = json.loads((two / f"ckpt.save_{rank}.json").read_text())
        size = os.path.getsize(two / "ckpt" / f"shard-{rank:05d}-of-00002.safetensors")
        assert info["written"] == size
        # its DTensor shards and the header (names and offsets of its 6 chunks)
        assert info["local_bytes"] <= size <= info["local_bytes"] + 1500, (rank, info, size)
        assert info["local_bytes"] < 0.6 * total


def test_loading_never_unpickles_and_the_ban_does_catch_dcps_own_format(two: Path) -> None:
    # the load runs (in `two`) ran with pickle.load/loads/Unpickler and torch.load made to raise and
    # asserted nothing called them; the control: DCP's default format does call them under that ban
    assert (two / "control.txt").read_text() == "tripped"


def test_exported_weights_are_full_tensors_in_hugging_face_layout(two: Path) -> None:
    before = load_file(two / "ckpt.before.safetensors")
    expected = {k.removeprefix("model/"): v for k, v in before.items() if k.startswith("model/")}
    assert os.listdir(two / "export") == ["model.safetensors"]
    weights = load_file(two / "export" / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 1))
    plain.register_buffer("scale", torch.zeros(2))
    plain.load_state_dict(weights, strict=True)
    # above max_shard_size: shards and an index naming every tensor's file
    index = json.loads((two / "export_small" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(n for n in os.listdir(two / "export_small") if n.endswith(".safetensors"))
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    merged: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(two / "export_small" / name)
        assert all(index["weight_map"][k] == name for k in part)
        merged.update(part)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())


def _start_holding(workdir: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / f"{args[0]}.log"
    with open(log, "wb") as out:
        job = subprocess.Popen(_command(2, workdir, *args), env=_env(), cwd=workdir, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    return job, log


def _wait_for_hold(job: subprocess.Popen[bytes], log: Path, workdir: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all((workdir / f"held_{r}").exists() for r in range(2)):
        assert job.poll() is None, "the holding job ended before holding:\n" + log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the job never reached the hold:\n" + log.read_text()[-4000:]
        time.sleep(0.2)


def _kill_when_held(job: subprocess.Popen[bytes], log: Path, workdir: Path, check: Any = None) -> None:
    """Wait until the job holds, run `check()` on what it left, then SIGKILL the whole job (also when
    the wait or the check fails, so that no process outlives the test)."""
    try:
        _wait_for_hold(job, log, workdir)
        if check is not None:
            check()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)


def test_a_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    torchrun(2, tmp_path, "save", str(ckpt), "3")
    os.replace(tmp_path / "ckpt.before.safetensors", tmp_path / "first.safetensors")
    job, log = _start_holding(tmp_path, "hold", str(ckpt), "5")
    def complete_but_unpublished() -> None:
        # both processes have written their files (the temp directory is complete) but not published it
        temps = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt.tmp-")]
        assert len(temps) == 1 and (temps[0] / "state.json").exists()

    _kill_when_held(job, log, tmp_path, complete_but_unpublished)
    assert json.loads((ckpt / "state.json").read_text())["state"]["step"] == 3
    torchrun(2, tmp_path, "load", str(ckpt))
    _assert_same_state(tmp_path / "first.safetensors", tmp_path / "ckpt.after_2.safetensors")
    # the next save replaces it and removes the temp directory the killed one left
    torchrun(2, tmp_path, "save", str(ckpt), "4")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert json.loads((ckpt / "state.json").read_text())["state"]["step"] == 4


# -- one process, no torchrun ------------------------------------------------------------------------
def _template(names: list[str], full: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A tree with a zero tensor of the full shape at each path (what a process without FSDP holds)."""
    tree: dict[str, Any] = {}
    for name in names:
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = torch.zeros_like(full[name])
    return tree


def test_a_process_without_a_process_group_loads_full_tensors(two: Path, tmp_path: Path) -> None:
    from torchcallbacks.checkpoint.sharded import load_sharded

    before = load_file(two / "ckpt.before.safetensors")
    sharded = json.loads((two / "ckpt" / "state.json").read_text())["sharded"]
    template = _template(sharded, before)
    state, processes = load_sharded(two / "ckpt", template)
    assert state["model"]["0.weight"] is template["model"]["0.weight"]
    assert torch.equal(state["model"]["0.weight"], before["model/0.weight"])
    assert torch.equal(state["optim"]["state"]["2.weight"]["exp_avg_sq"], before["optim/state/2.weight/exp_avg_sq"])
    assert torch.equal(state["optim"]["state"]["2.weight"]["step"], before["optim/state/2.weight/step"])  # replicated
    assert state["step"] == 3 and state["note"] == {"tuple": (1, 2.5), "inf": float("inf")}
    assert [p["rank"] for p in processes or []] == [0, 1]


def test_a_template_that_does_not_fit_is_refused_naming_the_tensors(two: Path) -> None:
    from torchcallbacks.checkpoint.errors import CheckpointError
    from torchcallbacks.checkpoint.sharded import load_sharded

    before = load_file(two / "ckpt.before.safetensors")
    sharded = json.loads((two / "ckpt" / "state.json").read_text())["sharded"]
    template = _template(sharded, before)
    del template["model"]["0.weight"]
    template["model"]["extra"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"template lacks: \['model/0.weight'\].*checkpoint lacks: \['model/extra'\]"):
        load_sharded(two / "ckpt", template)
    template = _template(sharded, before)
    template["model"]["0.weight"] = torch.zeros(34, 16)
    with pytest.raises(CheckpointError, match=r"tensor 'model/0.weight' is stored as \(33, 16\) torch.float32, the tensor it is "
                                              r"loaded into is \(34, 16\) torch.float32$"):
        load_sharded(two / "ckpt", template)
    template = _template(sharded, before)
    template["model"]["scale"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"replicated.safetensors.*'model/scale' is \(2,\)"):
        load_sharded(two / "ckpt", template)


def test_damaged_metadata_is_refused_naming_the_file_and_field(two: Path, tmp_path: Path) -> None:
    from torchcallbacks.checkpoint.errors import CheckpointError
    from torchcallbacks.checkpoint.sharded import load_sharded

    shutil.copytree(two / "ckpt", tmp_path / "c")
    before = load_file(two / "ckpt.before.safetensors")
    sharded = json.loads((two / "ckpt" / "state.json").read_text())["sharded"]
    path = tmp_path / "c" / "dcp_metadata.json"
    document = json.loads(path.read_text())
    del document["tensors"]["model/0.weight"]["chunks"][1]  # as if process 1's part were lost
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"dcp_metadata.json.*'tensors/model/0.weight' cover 272 of its 528 elements"):
        load_sharded(tmp_path / "c", _template(sharded, before))
    (tmp_path / "c" / "shard-00001-of-00002.safetensors").unlink()
    path.write_text((two / "ckpt" / "dcp_metadata.json").read_text())
    with pytest.raises(CheckpointError, match=r"names file 'shard-00001-of-00002.safetensors', which the directory lacks"):
        load_sharded(tmp_path / "c", _template(sharded, before))
    (tmp_path / "c" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        load_sharded(tmp_path / "c", _template(sharded, before))


def _single(path: Path, step: int = 7) -> None:
    from torchcallbacks.checkpoint.sharded import save_sharded

    state = {"model": {"w": torch.arange(6.0).reshape(2, 3) + step}, "step": step, "rng": [torch.tensor([1, 2], dtype=torch.uint8)]}
    save_sharded(path, state, per_process={"seed": 3})


def test_a_crash_between_the_two_renames_of_the_fallback_leaves_a_readable_old_directory(tmp_path: Path) -> None:
    from torchcallbacks.checkpoint import sharded

    _single(tmp_path / "c")
    os.rename(tmp_path / "c", tmp_path / "c.old-abc")  # what the fallback leaves after its first rename
    with pytest.warns(UserWarning, match="interrupted"):
        state, processes = sharded.load_sharded(tmp_path / "c", {})
    assert state["step"] == 7 and processes == [{"seed": 3}]
    assert torch.equal(state["rng"][0], torch.tensor([1, 2], dtype=torch.uint8))


def test_the_fallback_publication_replaces_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchcallbacks.checkpoint import sharded, storage

    _single(tmp_path / "c")
    monkeypatch.setattr(storage, "exchange_directories", lambda a, b: False)
    _single(tmp_path / "c", step=8)
    assert sorted(os.listdir(tmp_path)) == ["c"]
    template = {"model": {"w": torch.zeros(2, 3)}}
    state, _ = sharded.load_sharded(tmp_path / "c", template)
    assert state["step"] == 8 and torch.equal(template["model"]["w"], torch.arange(6.0).reshape(2, 3) + 8)


def test_an_async_save_copies_the_state_and_is_published_at_flush(tmp_path: Path) -> None:
    from torchcallbacks.checkpoint.sharded import ShardedCheckpointWriter, load_sharded

    saver = ShardedCheckpointWriter(async_save=True)
    weights = torch.arange(6.0).reshape(2, 3)
    saver.save(tmp_path / "c", {"model": {"w": weights}, "step": 1})
    weights.add_(100.0)  # training goes on: the save holds its own copy
    assert not (tmp_path / "c").exists()  # written in the background, published at the next save or flush
    saver.flush()
    state, _ = load_sharded(tmp_path / "c", {})
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    # a save dropped after an error stays unpublished; the next save removes its temp directory
    saver.save(tmp_path / "c", {"model": {"w": weights}, "step": 2})
    saver.abandon()
    assert load_sharded(tmp_path / "c", {})[0]["step"] == 1
    saver.save(tmp_path / "c", {"model": {"w": weights}, "step": 3})
    saver.flush()
    assert load_sharded(tmp_path / "c", {})[0]["step"] == 3 and sorted(os.listdir(tmp_path)) == ["c"]


# -- BackupAndRestore of an FSDP2 model ---------------------------------------------------------------
STOPPER = "EarlyStopping[monitor=loss,mode=max]"


def _assert_local_cpu_shards(info_path: str) -> None:
    """fsdp_worker.write_shard_info: the snapshot and the average hold each process's rows of the
    33-row weight (17 and 16), on the CPU, as DTensors of the global shape: never the full model."""
    for rank, rows in ((0, 17), (1, 16)):
        info = json.loads(Path(f"{info_path}_{rank}.json").read_text())
        assert info == {"best": ["DTensor", [rows, 16], "cpu", [33, 16]], "ema": ["DTensor", [rows, 16], "cpu", [33, 16]]}


def _assert_same_tensors(a_path: Path, b_path: Path) -> None:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different


def test_backup_and_restore_of_an_fsdp_model_resumes_exactly_after_a_sigkill(tmp_path: Path) -> None:
    """With EarlyStopping(restore_best_weights) and SwapEMAWeights, whose snapshot and average go
    through the backup as shards (the resumed run's EarlyStopping has no snapshot until it loads one)."""
    torchrun(2, tmp_path, "backup", "straight", "states")  # uninterrupted
    assert not (tmp_path / "backup").exists()  # deleted at the end of a finished run
    job, log = _start_holding(tmp_path, "backup-hold", "held", "states")
    _kill_when_held(job, log, tmp_path)
    state = json.loads((tmp_path / "backup" / "latest" / "state.json").read_text())
    assert state["state"]["global_step"] == 8 and len(state["state"]["ranks"]) == 2
    assert "model/0.weight" in state["sharded"] and "optimizers/0/state/0.weight/exp_avg" in state["sharded"]
    # the snapshot of epoch 0 (step 6) and the average, as shards
    assert f"callbacks/{STOPPER}/best_weights/0.weight" in state["sharded"]
    assert "callbacks/SwapEMAWeights/tensors/0" in state["sharded"]
    torchrun(2, tmp_path, "backup", "resumed", "states")
    assert json.loads((tmp_path / "resumed.json").read_text()) == {"resumed_at": 8}
    _assert_same_state(tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors")
    _assert_same_tensors(tmp_path / "straight.callbacks.safetensors", tmp_path / "resumed.callbacks.safetensors")
    # the final model is the restored snapshot of epoch 0: the one that went through the backup
    model = {k.removeprefix("model/"): v for k, v in load_file(tmp_path / "resumed.safetensors").items() if k.startswith("model/")}
    best = load_file(tmp_path / "resumed.callbacks.safetensors")
    assert all(torch.equal(v, best[f"{STOPPER}/best_weights/{k}"]) for k, v in model.items())
    _assert_local_cpu_shards(str(tmp_path / "resumed.shards"))
    # async_save: the backup of step 8 is written while steps 9 and 10 train, and published at the next
    # save; killed at step 10, the one on disk is step 4's (complete) and the resumed run is exact too
    for r in range(2):
        (tmp_path / f"held_{r}").unlink()
    job, log = _start_holding(tmp_path, "backup-hold", "async-held", "states")

    def written_but_unpublished() -> None:
        temps = [p for p in (tmp_path / "backup").iterdir() if p.name.startswith("latest.tmp-")]
        assert len(temps) == 1 and json.loads((temps[0] / "state.json").read_text())["state"]["global_step"] == 8

    _kill_when_held(job, log, tmp_path, written_but_unpublished)
    assert json.loads((tmp_path / "backup" / "latest" / "state.json").read_text())["state"]["global_step"] == 4
    torchrun(2, tmp_path, "backup", "async-resumed", "states")  # no snapshot in step 4's backup
    assert json.loads((tmp_path / "async-resumed.json").read_text()) == {"resumed_at": 4}
    _assert_same_state(tmp_path / "straight.safetensors", tmp_path / "async-resumed.safetensors")
    _assert_same_tensors(tmp_path / "straight.callbacks.safetensors", tmp_path / "async-resumed.callbacks.safetensors")
    assert not (tmp_path / "backup").exists()  # the last one published, then deleted at the end


# -- ModelCheckpoint (full training state) of an FSDP2 model -------------------------------------------
@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fit with ModelCheckpoint directories and a load by 2 processes (fsdp_worker `checkpoint`), and
    the last directory loaded by 1 process."""
    workdir = tmp_path_factory.mktemp("fsdp_checkpoint")
    torchrun(2, workdir, "checkpoint")
    torchrun(1, workdir, "load-checkpoint", str(workdir / "ckpt" / "state-03"))
    return workdir


def test_model_checkpoint_of_an_fsdp_model_keeps_max_to_keep_directories(checkpointed: Path) -> None:
    assert sorted(os.listdir(checkpointed / "ckpt")) == ["state-02", "state-03"]
    leftovers = [str(p) for p in checkpointed.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers
    states = json.loads((checkpointed / "checkpoint.json").read_text())
    every, best = states["every"], states["best"]
    assert [item[0] for item in every["kept"]] == [str(checkpointed / "ckpt" / f"state-0{e}") for e in (2, 3)]
    assert every["last_path"] == str(checkpointed / "ckpt" / "state-03")
    assert best["best_path"] == best["last_path"] == str(checkpointed / "best")
    for directory in (checkpointed / "ckpt" / "state-02", checkpointed / "ckpt" / "state-03", checkpointed / "best"):
        assert sorted(os.listdir(directory)) == ["dcp_metadata.json", "replicated.safetensors", "shard-00000-of-00002.safetensors",
                                                 "shard-00001-of-00002.safetensors", "state.json"]
    _assert_local_cpu_shards(str(checkpointed / "checkpoint.shards"))


def test_its_directories_hold_the_gathered_training_state(checkpointed: Path) -> None:
    from torchcallbacks.checkpoint.encoding import encode
    from torchcallbacks.checkpoint.sharded import load_sharded

    for epoch in (1, 2):
        directory = checkpointed / "ckpt" / f"state-0{epoch + 1}"
        gathered = load_file(checkpointed / f"epoch-{epoch}.safetensors")
        document = json.loads((directory / "state.json").read_text())
        assert document["state"]["epoch"] == epoch + 1
        assert set(document["sharded"]) <= gathered.keys()  # every DTensor: model, Adam moments, callbacks
        assert {f"callbacks/{STOPPER}/best_weights/0.weight", "callbacks/SwapEMAWeights/tensors/0"} <= set(document["sharded"])
        state, _ = load_sharded(directory, _template(document["sharded"], gathered))  # one process, full tensors
        tensors: dict[str, torch.Tensor] = {}
        encode(state, "", tensors)
        read = {k.removeprefix("/"): v for k, v in tensors.items()}
        different = [k for k in gathered if not torch.equal(read[k], gathered[k])]
        assert not different, different


def test_load_checkpoint_reads_a_directory_into_a_sharded_model_on_2_and_on_1_processes(checkpointed: Path) -> None:
    # model, Adam state, EarlyStopping's snapshot and the EMA, as saved at the end of epoch 2
    _assert_same_tensors(checkpointed / "epoch-2.safetensors", checkpointed / "loaded_2.safetensors")
    _assert_same_tensors(checkpointed / "epoch-2.safetensors", checkpointed / "loaded_1.safetensors")


# -- the other callbacks, evaluate and predict -------------------------------------------------------
def test_the_other_callbacks_evaluate_and_predict_work_with_an_fsdp_model_and_agree(tmp_path: Path) -> None:
    result = torchrun(2, tmp_path, "kit")
    ranks = [json.loads((tmp_path / f"kit_{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the same logs, learning rates and results on both processes
    kit = ranks[0]
    # LearningRateScheduler (x0.9 at each epoch begin) and ReduceLROnPlateau (x0.5 at each epoch end)
    assert kit["lrs"] == pytest.approx([1e-2 * 0.9, 1e-2 * 0.9 * 0.5 * 0.9, 1e-2 * (0.9 * 0.5) ** 2 * 0.9])
    assert kit["ends"] == [0, 1, 2] and kit["predictions"] == [40, 1]
    rows = (tmp_path / "kit.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,")  # one writer
    assert result.stdout.count("Epoch 3/3") == 1  # the progress bar of rank 0 only
    assert "Could not reach RemoteMonitor root server" in result.stderr  # it warned, training went on
