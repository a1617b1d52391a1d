"""BackupAndRestore: exact resume (in process and across SIGKILLed / SIGTERMed processes), fallbacks,
deletion rules and the Keras bugs it fixes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_model, make_regression
from safetensors import safe_open
from safetensors.torch import load_file

import torchcallbacks as tc
from torchcallbacks.checkpoint.files import STATE_KEY

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "resume_script.py"
TOTAL_STEPS = 48  # resume_script: 6 epochs x 8 batches


# -- helpers ---------------------------------------------------------------------------------------
def _start(workdir: Path, save_freq: str | int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(workdir), str(save_freq)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _run_until(proc: subprocess.Popen[str], step: int, sig: int, delay: float) -> int:
    """Wait until the run prints `step k` with k >= step, then send `sig` after `delay` seconds."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= step:
            time.sleep(delay)
            proc.send_signal(sig)
            break
    proc.stdout.read()
    return proc.wait(timeout=60)


def _finish(proc: subprocess.Popen[str]) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def _results(workdir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    ckpts = {name: load_file(workdir / "ckpt" / name) for name in os.listdir(workdir / "ckpt")}
    return load_file(workdir / "final.safetensors"), json.loads((workdir / "final.json").read_text()), ckpts


def _assert_same(a: Path, b: Path) -> None:
    weights_a, info_a, ckpts_a = _results(a)
    weights_b, info_b, ckpts_b = _results(b)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    info_a.pop("resumed"), info_b.pop("resumed")
    assert info_a == info_b  # ModelCheckpoint best/best_path/kept files, the patience state and record
    for name, tensors in ckpts_a.items():
        assert all(torch.equal(tensors[k], ckpts_b[name][k]) for k in tensors), name


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("baseline")
    _finish(_start(workdir, "epoch"))
    return workdir


# -- across processes --------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_weights(tmp_path: Path, baseline: Path, random_seed: int) -> None:
    seed = random_seed
    rng = random.Random(seed)
    # Kills land at least two epochs before the end: a run that reaches its end deletes its backup
    # (delete_checkpoint) and could be killed between that and its exit.
    targets = sorted(rng.sample(range(2, TOTAL_STEPS - 16), 3))
    targets[-1] = max(targets[-1], 6)  # at least one kill after a backup exists, so a run resumes
    killed = 0
    for target in targets:
        code = _run_until(_start(tmp_path, 3), target, signal.SIGKILL, rng.uniform(0.0, 0.01))
        if code == 0:  # finished before the kill landed
            break
        assert code == -signal.SIGKILL, f"seed {seed}"
        killed += 1
        # The run prints "step k" before its backup of step k is written (save_freq=3): only once
        # "step 6" was printed is the step-3 backup certain to be on disk.
        if target >= 6:
            assert (tmp_path / "backup" / "latest.safetensors").exists(), f"seed {seed}"
    if not (tmp_path / "final.json").exists():
        _finish(_start(tmp_path, 3))
    assert killed >= 1, f"seed {seed}: no run was killed"
    info = json.loads((tmp_path / "final.json").read_text())
    assert info["resumed"], f"seed {seed}"
    _assert_same(baseline, tmp_path)
    assert not (tmp_path / "backup" / "latest.safetensors").exists()  # deleted after the normal finish


@pytest.mark.slow
def test_sigterm_writes_a_mid_epoch_backup_and_exits(tmp_path: Path, baseline: Path) -> None:
    # save_freq="epoch": the mid-epoch backup can only come from the SIGTERM handling.
    code = _run_until(_start(tmp_path, "epoch"), 11, signal.SIGTERM, 0.0)
    assert code == 128 + signal.SIGTERM
    with safe_open(tmp_path / "backup" / "latest.safetensors", framework="pt") as f:
        document = json.loads(f.metadata()[STATE_KEY])
    assert document["epoch"] == 1 and 0 < document["batch"] <= 8, document
    assert document["global_step"] == 8 + document["batch"]
    _finish(_start(tmp_path, "epoch"))
    _assert_same(baseline, tmp_path)


# -- in process ---------------------------------------------------------------------------------------
class Crash(tc.Callback):
    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.loop.global_step == self.at_step:
            raise RuntimeError("crash")


class EpochRecorder(tc.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []
        self.batches: list[tuple[int, int]] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append(epoch)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.batches.append((self.loop.epoch, batch))


def _train(backup: tc.BackupAndRestore | None, extra: list[tc.Callback], epochs: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
    loader = make_regression(shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    callbacks = [*extra, *([backup] if backup is not None else [])]
    tc.fit(model, loader, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=epochs, verbose=0,
           callbacks=callbacks)
    return model


@pytest.mark.parametrize(("save_freq", "crash_at"), [("epoch", 9), (3, 10), (2, 8), (1, 5)])
def test_in_process_resume_is_exact(tmp_path: Path, save_freq: Any, crash_at: int) -> None:
    reference = _train(None, [])
    with pytest.raises(RuntimeError, match="crash"):
        _train(tc.BackupAndRestore(tmp_path, save_freq=save_freq), [Crash(crash_at)])
    assert (tmp_path / "latest.safetensors").exists()  # kept after an exception
    recorder = EpochRecorder()
    backup = tc.BackupAndRestore(tmp_path, save_freq=save_freq)
    resumed = _train(backup, [recorder], seed=123)  # other initial weights and RNG: all must be restored
    assert backup.restored is not None
    saved_step = backup.restored.global_step
    assert recorder.batches[0] == divmod(saved_step, 4)  # 4 batches per epoch: resumes at that batch
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not (tmp_path / "latest.safetensors").exists()  # deleted after the normal finish


class CrashAtEpochEnd(tc.Callback):
    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if epoch == 1:
            raise RuntimeError("crash")


@pytest.mark.parametrize(("save_freq", "crash"), [(4, CrashAtEpochEnd), (3, lambda: Crash(10))])
def test_a_resumed_epoch_logs_the_means_of_all_its_batches(tmp_path: Path, save_freq: int, crash: Any) -> None:
    """The epoch's running means are part of a mid-epoch backup. Before, the resumed epoch's `loss`
    covered only the batches after the resume, and a backup at an epoch's last batch (save_freq
    dividing the steps per epoch; a crash during validation or epoch end) resumed into an epoch with
    no `loss` at all: History's lists lost their alignment with its epochs, and a CSVLogger wrote no
    loss column for the whole run."""
    reference = tc.History()
    _train(None, [reference])
    with pytest.raises(RuntimeError, match="crash"):
        _train(tc.BackupAndRestore(tmp_path, save_freq=save_freq), [crash()])
    history = tc.History()
    backup = tc.BackupAndRestore(tmp_path, save_freq=save_freq)
    _train(backup, [history], seed=123)
    assert backup.restored is not None and backup.restored.batch > 0
    assert history.epoch == reference.epoch[-len(history.epoch):]
    assert history.history.keys() == reference.history.keys() == {"loss"}
    assert history.history["loss"] == pytest.approx(reference.history["loss"][-len(history.epoch):], rel=1e-9)


def test_start_epoch_does_not_leak_into_the_next_fit(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _train(tc.BackupAndRestore(tmp_path), [Crash(9)])
    backup, recorder = tc.BackupAndRestore(tmp_path), EpochRecorder()
    model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = make_regression(shuffle=True)
    tc.fit(model, loader, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=4, verbose=0,
           callbacks=[recorder, backup])
    assert recorder.epochs == [2, 3]
    recorder.epochs.clear()
    tc.fit(model, loader, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=4, verbose=0,
           callbacks=[recorder, backup])
    assert recorder.epochs == [0, 1, 2, 3]


def test_delete_checkpoint_false_keeps_the_backup(tmp_path: Path) -> None:
    _train(tc.BackupAndRestore(tmp_path, delete_checkpoint=False), [], epochs=2)
    with safe_open(tmp_path / "latest.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()[STATE_KEY])["epoch"] == 2


def test_double_checkpoint_falls_back_when_latest_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _train(tc.BackupAndRestore(tmp_path, double_checkpoint=True), [Crash(12)])
    latest = tmp_path / "latest.safetensors"
    assert (tmp_path / "previous.safetensors").exists()
    latest.write_bytes(latest.read_bytes()[:100])  # damaged
    backup, recorder = tc.BackupAndRestore(tmp_path, double_checkpoint=True), EpochRecorder()
    with pytest.warns(UserWarning, match="falling back"):
        _train(backup, [recorder])
    assert backup.restored is not None and backup.restored.epoch == 1  # latest was at epoch 2
    assert recorder.epochs == [1, 2, 3]


def test_unreadable_backup_without_fallback_raises(tmp_path: Path) -> None:
    (tmp_path / "latest.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(tc.CheckpointError, match=r"latest\.safetensors"):
        _train(tc.BackupAndRestore(tmp_path), [])


def test_save_freq_false_is_rejected() -> None:
    with pytest.raises(ValueError, match="save_freq"):
        tc.BackupAndRestore("x", save_freq=False)
    with pytest.raises(ValueError, match="save_freq"):
        tc.BackupAndRestore("x", save_freq=0)
    with pytest.raises(ValueError, match="backup_dir"):
        tc.BackupAndRestore("")


def test_batch_backups_are_counted_over_the_run(tmp_path: Path) -> None:
    saved: list[tuple[int, int]] = []

    class Spy(tc.BackupAndRestore):
        def _save(self, epoch: int, batch: int) -> None:
            saved.append((epoch, batch))
            super()._save(epoch, batch)

    _train(Spy(tmp_path, save_freq=3), [], epochs=3)
    assert saved == [(0, 3), (1, 2), (2, 1), (2, 4)]  # global steps 3, 6, 9, 12 with 4 batches per epoch


def test_async_backups_resume_the_same(tmp_path: Path) -> None:
    reference = _train(None, [])
    with pytest.raises(RuntimeError):
        _train(tc.BackupAndRestore(tmp_path, save_freq=2, async_save=True), [Crash(7)])
    resumed = _train(tc.BackupAndRestore(tmp_path, save_freq=2, async_save=True), [], seed=5)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_warns_when_a_stateful_callback_comes_after_it(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "m.safetensors"), monitor="loss")
    with pytest.warns(UserWarning, match="put BackupAndRestore last"):
        _train(None, [tc.BackupAndRestore(tmp_path / "b"), ckpt], epochs=1)


def test_running_means_of_a_backup_from_more_processes_are_merged() -> None:
    """A backup written by 2 processes, resumed by 1: its running sums and weights are added up, so
    the resumed epoch's means still cover every sample of the trained batches."""
    saved = [{"loss": [2.0, 4.0]}, {"loss": [6.0, 4.0], "mae": [1.0, 4.0]}]
    assert tc.BackupAndRestore._own_metrics(saved) == {"loss": [8.0, 8.0], "mae": [1.0, 4.0]}
    assert tc.BackupAndRestore._own_metrics([{"loss": [2.0, 4.0]}]) == {"loss": [2.0, 4.0]}
    assert tc.BackupAndRestore._own_metrics(None) is None


@pytest.mark.parametrize("swap_on_epoch", [False, True])
def test_resume_with_swap_ema_weights_is_exact(tmp_path: Path, swap_on_epoch: bool) -> None:
    """The EMA is part of the backup: a resumed run validates with the same averaged weights (so
    decisions on val_* match) and ends with the same training and EMA weights. With swap_on_epoch the
    backup is written while the EMA weights are in the model."""

    def run(backup: tc.BackupAndRestore | None, extra: list[tc.Callback], seed: int = 0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        ema = tc.SwapEMAWeights(decay=0.9, swap_on_epoch=swap_on_epoch)
        history = tc.fit(model, make_regression(shuffle=True), optimizer=optimizer,
                         loss=torch.nn.functional.mse_loss, epochs=4, verbose=0,
                         validation_data=make_regression(n=32), callbacks=[ema, *extra, *filter(None, [backup])])
        ema.swap_out()
        return model, ema, history

    reference, reference_ema, reference_history = run(None, [])
    with pytest.raises(RuntimeError, match="crash"):
        run(tc.BackupAndRestore(tmp_path, save_freq=3), [Crash(10)])
    resumed, resumed_ema, resumed_history = run(tc.BackupAndRestore(tmp_path, save_freq=3), [], seed=123)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    reference_average, resumed_average = reference_ema.ema_model.state_dict(), resumed_ema.ema_model.state_dict()
    assert reference_average.keys() == resumed_average.keys()
    for key, tensor in reference_average.items():  # the averaged weights and n_averaged
        assert torch.equal(tensor, resumed_average[key]), key
    assert resumed_history.history["val_loss"] == reference_history.history["val_loss"][-len(resumed_history.epoch):]
