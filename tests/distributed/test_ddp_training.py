"""fit / evaluate / predict and the callbacks under real `torchrun --nproc_per_node=2` (gloo, CPU).

Each test launches torchrun in a subprocess with a timeout, so a hang (a process waiting in a
collective another one skipped) fails the test instead of blocking CI. Scenarios share a launch where
they can (torchrun takes a few seconds to start). The workers are the *_worker.py files beside this one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ddp_common as common
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import torchcallbacks as tc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TIMEOUT = 90
pytestmark = pytest.mark.slow  # every test here launches torchrun


def _command(worker: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(HERE / worker), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(worker: str, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(_command(worker, str(workdir), *args), capture_output=True, text=True,
                            timeout=TIMEOUT, env=_env(), cwd=workdir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _ranks(workdir: Path, pattern: str = "rank_{}.json") -> list[dict[str, Any]]:
    return [json.loads((workdir / pattern.format(r)).read_text()) for r in range(2)]


def _close(a: Any, b: Any, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel, abs_) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel, abs_) for x, y in zip(a, b, strict=True))
    if isinstance(a, str):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# -- fit / evaluate / predict against a single-process run over the same data ------------------------
@pytest.fixture(scope="module")
def fit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    workdir = tmp_path_factory.mktemp("ddp_fit")
    return workdir, torchrun("fit_worker.py", workdir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("reference")
    train = common.reference_loader(common.train_set(), shuffle=True)
    val = common.reference_loader(common.val_set(), shuffle=False)
    report = common.fit_and_report(common.make_model(), train, val, str(workdir), verbose=0)
    report["predict"] = tc.predict(common.make_model(), torch.utils.data.DataLoader(common.val_set()), verbose=0).tolist()
    return report


def test_epoch_logs_and_decisions_equal_a_single_process_run(fit_run: Any, reference: dict[str, Any]) -> None:
    workdir, _ = fit_run
    ranks = _ranks(workdir)
    assert ranks[0]["history"] == ranks[1]["history"]  # reduced: identical on both processes, bit for bit
    history = ranks[0]["history"]
    # EarlyStopping stopped both at the same epoch as the single-process run; ReduceLROnPlateau cut the
    # lr at the same epoch (at the last epoch end) to the same value on both processes.
    assert len(history["loss"]) == len(reference["history"]["loss"]) < common.EPOCHS
    assert _close(history, reference["history"])
    assert ranks[0]["lr"] == ranks[1]["lr"] == reference["lr"] < history["learning_rate"][0]
    assert _close(ranks[0]["weights"], reference["weights"]) and ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["best_path"] == ranks[1]["best_path"] == reference["best_path"]


def test_evaluate_and_gathered_predict_equal_a_single_process_run(fit_run: Any, reference: dict[str, Any]) -> None:
    workdir, _ = fit_run
    ranks = _ranks(workdir)
    assert ranks[0]["evaluate"] == ranks[1]["evaluate"]
    assert _close(ranks[0]["evaluate"], reference["evaluate"])
    # predict(gather=True): all 21 rows in dataset order, the padded duplicate dropped, on every process
    assert len(ranks[0]["predict"]) == common.N_VAL
    assert ranks[0]["predict"] == ranks[1]["predict"]
    model = common.make_model()
    state = {k: torch.tensor(v).reshape(p.shape) for (k, v), p in zip(ranks[0]["weights"].items(), model.state_dict().values(), strict=True)}
    model.load_state_dict(state)
    expected = tc.predict(model, torch.utils.data.DataLoader(common.val_set(), batch_size=7), verbose=0)
    assert _close(ranks[0]["predict"], expected.flatten().tolist())


def test_files_are_written_once_by_rank_0_with_reduced_values(fit_run: Any) -> None:
    workdir, result = fit_run
    history = _ranks(workdir)[0]["history"]
    epochs = len(history["loss"])
    # CSV: one file, one row per epoch, the reduced values
    with open(workdir / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    assert _close([float(r["val_loss"]) for r in rows], history["val_loss"], rel=1e-12)
    # TensorBoard: one event file per run directory, epoch scalars equal to the reduced logs
    for run, key in (("train", "loss"), ("validation", "val_loss")):
        files = os.listdir(workdir / "tb" / run)
        assert len(files) == 1, files
        events = EventAccumulator(str(workdir / "tb" / run))
        events.Reload()
        values = [e.value for e in events.Scalars("epoch_loss")]
        assert _close(values, history[key], rel=1e-6)
    # ModelCheckpoint: one valid file per epoch, named with the reduced val_loss
    names = sorted(os.listdir(workdir / "ckpt"))
    assert names == [f"{e + 1:02d}-{v:.6f}.safetensors" for e, v in enumerate(history["val_loss"])]
    state = tc.load_checkpoint(None, workdir / "ckpt" / names[-1], restore_rng=False)
    assert state.epoch == epochs
    last = load_file(workdir / "ckpt" / names[-1])
    assert _close(last["2.bias"].tolist(), _ranks(workdir)[0]["weights"]["2.bias"], rel=0, abs_=0)
    # ProgbarLogger (verbose=2): one line per epoch from rank 0 only
    assert result.stdout.count("Epoch 1/") == 1
    # and each of those files was written by process 0 alone (recorded in each process)
    zero, one = (rank["written"] for rank in _ranks(workdir))
    assert one == []
    assert {f"ckpt/{n}" for n in names} | {"log.csv"} <= set(zero)
    assert sum(p.startswith(("tb/train/", "tb/validation/")) for p in zero) == 2


# -- stopping decisions that differ between processes -------------------------------------------------
@pytest.fixture(scope="module")
def stop_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("ddp_stop")
    torchrun("stop_worker.py", workdir)
    return workdir


def test_a_stop_on_one_process_stops_every_process_at_the_same_epoch(stop_run: Path) -> None:
    ranks = _ranks(stop_run)
    # EarlyStopping on a per-process value: rank 1's says stop after epoch index 1, rank 0's never
    assert ranks[0]["fit_epoch_stop"] == ranks[1]["fit_epoch_stop"] == [0, 1]


def test_a_mid_epoch_stop_on_one_process_stops_every_process_after_that_batch(stop_run: Path) -> None:
    ranks = _ranks(stop_run)
    assert ranks[0]["fit_batch_stop_epochs"] == ranks[1]["fit_batch_stop_epochs"] == [0]
    assert ranks[0]["fit_batch_stop_batches"] == ranks[1]["fit_batch_stop_batches"] == [[0, 0], [0, 1], [0, 2]]


def test_a_stop_asked_at_epoch_or_train_begin_on_one_process_holds_for_every_process(stop_run: Path) -> None:
    ranks = _ranks(stop_run)
    assert ranks[0]["fit_epoch_begin_stop_epochs"] == ranks[1]["fit_epoch_begin_stop_epochs"] == [0, 1]
    batches = ranks[0]["fit_epoch_begin_stop_batches"]
    assert batches == ranks[1]["fit_epoch_begin_stop_batches"] and batches[-1] == [1, 0]
    assert ranks[0]["fit_train_begin_stop_epochs"] == ranks[1]["fit_train_begin_stop_epochs"] == [0]


def test_hand_written_ddp_loop_with_callback_list(stop_run: Path) -> None:
    ranks = _ranks(stop_run)
    hand = [r["hand"] for r in ranks]
    # rank 1's local metric rises after epoch 0: EarlyStopping stops it; rank 0 stops with it
    assert [len(h["epochs"]) for h in hand] == [2, 2]
    assert hand[0]["stopped_epoch"] == 0 and hand[1]["stopped_epoch"] == 1
    assert [e["loss"] for e in hand[0]["epochs"]] == [e["loss"] for e in hand[1]["epochs"]]  # reduce_logs
    with open(stop_run / "hand.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [float(r["loss"]) for r in rows] == [e["loss"] for e in hand[0]["epochs"]]
    assert sorted(os.listdir(stop_run / "hand")) == ["01.safetensors", "02.safetensors"]


# -- BackupAndRestore: SIGKILL of the whole job, restart, exact result ------------------------------
def test_sigkilled_job_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    plain.mkdir(), killed.mkdir()
    torchrun("backup_worker.py", plain, "run")
    proc = subprocess.Popen(_command("backup_worker.py", str(killed), "hold"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), cwd=killed, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not all((killed / f"held_{r}").exists() for r in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it was killed"
            time.sleep(0.05)
    finally:
        # SIGKILL the whole job: both workers (each in its own session) and the torchrun agent
        for r in range(2):
            if (killed / f"held_{r}").exists():
                os.kill(int((killed / f"held_{r}").read_text()), signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # one file, with each process's own random states
    state = tc.checkpoint.read_training_state(killed / "backup" / "latest.safetensors")
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 2, 8)
    ranks = [part["rng"] for part in state["ranks"]]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["current"]["torch"], ranks[1]["current"]["torch"])
    assert torch.equal(ranks[0]["current"]["torch"], state["rng"]["current"]["torch"])
    # each process's own position in its shard and running means of the interrupted epoch
    assert [part["loop"]["data"]["consumed"] for part in state["ranks"]] == [2, 2]
    assert state["ranks"][0]["loop"]["metrics"] != state["ranks"][1]["loop"]["metrics"]
    assert os.listdir(killed / "backup") == ["latest.safetensors"]
    torchrun("backup_worker.py", killed, "run")
    expected = _ranks(plain, "final_{}.json")
    resumed = _ranks(killed, "final_{}.json")
    assert [r["resumed"] for r in resumed] == [True, True]
    for r in range(2):
        assert resumed[r]["weights"] == expected[r]["weights"] == expected[0]["weights"]  # bit for bit
    assert not (killed / "backup").exists()  # deleted once after the normal finish


# -- uneven batch counts ------------------------------------------------------------------------------
def test_uneven_batch_counts_are_refused_naming_them_and_steps_per_epoch_evens_them(tmp_path: Path) -> None:
    """Before: a crash with no word from us, a silent mis-pairing of collectives, or a hang."""
    refused, evened = tmp_path / "refused", tmp_path / "evened"
    refused.mkdir(), evened.mkdir()
    torchrun("uneven_worker.py", refused, "error")
    for rank in _ranks(refused):
        assert "x: the processes have different numbers of batches per epoch (process 0: 6, process 1: 7)" in rank["error"]
        assert "steps_per_epoch" in rank["error"]
    torchrun("uneven_worker.py", evened, "steps")
    assert [r["epochs"] for r in _ranks(evened)] == [[0, 1], [0, 1]]


def test_data_without_a_length_ends_each_epoch_at_the_shortest_process(tmp_path: Path) -> None:
    """Before: the process with fewer batches left the epoch while the other waited in DDP's gradient
    all-reduce for a batch nobody else trained (a hang, or collectives paired wrongly)."""
    torchrun("uneven_worker.py", tmp_path, "iterable")
    ranks = _ranks(tmp_path)
    for rank in ranks:
        assert rank["epochs"]["batches"] == [6, 6]  # process 1 has 7 per pass: it stops with process 0
        uneven = [w for w in rank["epochs"]["warnings"] if "ran out of batches" in w]
        assert len(uneven) == 2 and "process(es) [0] ran out of batches after 6 batches" in uneven[0]
        assert "process(es) [1] had more" in uneven[0]
        # steps_per_epoch=4 over one-shot generators of 6 and 9 batches: process 0 runs dry in epoch 2
        assert rank["dry"]["batches"] == [4, 2]
        assert any("ran out of data on process(es) [0] after 2 of 4 steps" in w for w in rank["dry"]["warnings"])
    for run in ("epochs", "dry"):
        assert ranks[0][run]["weights"] == ranks[1][run]["weights"]  # the same steps on both: no divergence
    assert [rank["epochs"]["evaluated"] for rank in ranks] == [6, 7]  # evaluate takes each process's own batches


# -- stateful metrics that do not synchronise themselves -------------------------------------------------
def test_a_stateful_metric_that_does_not_sync_is_reduced_so_decisions_agree(tmp_path: Path) -> None:
    torchrun("stateful_metric_worker.py", tmp_path)
    ranks = _ranks(tmp_path)
    assert ranks[0]["local"] != ranks[1]["local"]  # each process's own value differs ...
    assert ranks[0]["logged"] == ranks[1]["logged"]  # ... the logged one is the same everywhere
    # equal shards: the sample-weighted mean of the two processes' values
    assert _close(ranks[0]["logged"], [(a + b) / 2 for a, b in zip(ranks[0]["local"], ranks[1]["local"], strict=True)])
    assert ranks[0]["lrs"] == ranks[1]["lrs"]  # so ReduceLROnPlateau decided the same on both


# -- collectives per epoch -------------------------------------------------------------------------------
def test_no_built_in_callback_adds_a_collective_per_batch(tmp_path: Path) -> None:
    """Counted by wrapping torch.distributed in the worker: the same number of collectives per epoch
    with 6 and with 12 batches per epoch, for the default callbacks and for the usual kit."""
    torchrun("collectives_worker.py", tmp_path)
    for rank in _ranks(tmp_path):
        for config in ("default", "kit"):
            six, twelve = rank[f"{config}_6"], rank[f"{config}_12"]
            assert six[1:] == twelve[1:], (config, six, twelve)  # epochs after the first (train begin)
        assert rank["default_6"][1] <= 3  # epoch logs, stop flag (and nothing per batch)


# -- another number of processes on resume -------------------------------------------------------------
def _torchrun_n(n: int, worker: str, workdir: Path, *args: str) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(HERE / worker), str(workdir), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=workdir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads((workdir / f"rank_{r}.json").read_text()) for r in range(n)]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_mid_epoch_backup_of_another_number_of_processes_is_refused_naming_both(
    tmp_path: Path, before: int, after: int
) -> None:
    """Its batches to skip are counted in the old run's per-process batches: 2 -> 1 trained 15 samples
    twice and 1 -> 2 never saw 15 (only 2 -> 1 warned, about random states)."""
    crashed = _torchrun_n(before, "world_change_worker.py", tmp_path, "2", "5")  # backup at step 4: mid-epoch
    assert all(r["outcome"] == "crashed: crash" for r in crashed)
    resumed = _torchrun_n(after, "world_change_worker.py", tmp_path, "2", "0")
    for rank in resumed:
        assert rank["outcome"].startswith("refused: "), rank
        assert f"in the middle of an epoch by {before} processes and this run has {after}" in rank["outcome"]
    assert (tmp_path / "backup" / "latest.safetensors").exists()  # still there for a rerun with the old count


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_an_epoch_end_backup_resumes_on_another_number_of_processes_with_a_warning(
    tmp_path: Path, before: int, after: int
) -> None:
    steps = 12 // before  # batches per epoch and process
    _torchrun_n(before, "world_change_worker.py", tmp_path, "epoch", str(steps + 1))  # crash in epoch 1
    resumed = _torchrun_n(after, "world_change_worker.py", tmp_path, "epoch", "0")
    for rank in resumed:
        assert rank["outcome"] == "finished" and rank["resumed_at"] == [1, 0], rank
        assert any(f"written by {before} processes and this run has {after}" in w for w in rank["warnings"]), rank


def test_mlflow_logger_makes_one_run_written_by_the_main_process_and_continued_after_a_crash(tmp_path: Path) -> None:
    """Two processes, crashed at step 6 (backup at step 4) and rerun: one MLflow run, created and
    written by process 0 only, each batch step and each epoch once, FINISHED."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    crashed = _torchrun_n(2, "tracker_worker.py", tmp_path, uri, "6")
    assert [r["outcome"] for r in crashed] == ["crashed: crash"] * 2
    assert crashed[0]["run_id"] is not None and crashed[1]["run_id"] is None  # process 1 opens no run
    resumed = _torchrun_n(2, "tracker_worker.py", tmp_path, uri, "0")
    assert [r["outcome"] for r in resumed] == ["finished"] * 2
    assert resumed[0]["run_id"] == crashed[0]["run_id"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ddp")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == crashed[0]["run_id"] and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "batch_loss"))
    assert steps == list(range(1, 19))  # 3 epochs of 6 batches per process: each step once
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2]


@pytest.mark.parametrize("case", ["resumable", "unsaved"])
def test_verify_resume_of_a_ddp_pipeline(tmp_path: Path, case: str) -> None:
    """Both processes back up into the same directory, resume and compare their own steps: a DDP
    pipeline passes; a callback with unsaved state is named on every process."""
    ranks = _torchrun_n(2, "verify_worker.py", tmp_path, case)
    assert [r["runs"] for r in ranks] == [7, 7]
    if case == "resumable":
        assert all(r["ok"] for r in ranks), ranks[0]["text"]
    else:
        for rank in ranks:
            assert not rank["ok"]
            assert "callback Counter has state that its state_dict does not return (attribute `n`)" in rank["text"]
    assert sorted(os.listdir(tmp_path)) == ["rank_0.json", "rank_1.json"]  # no backup directory left here
