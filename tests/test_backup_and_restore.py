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
from conftest import Crash, make_model, make_regression
from safetensors import safe_open
from safetensors.torch import load_file

import torchcallbacks as tc
from torchcallbacks.checkpoint.files import STATE_KEY

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "resume_script.py"
TOTAL_STEPS = 48  # resume_script: 6 epochs x 8 batches


# -- helpers ---------------------------------------------------------------------------------------
def _start(workdir: Path, save_freq: str | int, pause_at: int | None = None) -> subprocess.Popen[str]:
    """The run; with `pause_at`, it waits after printing `step <pause_at>` for a line on its stdin."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if pause_at is not None:
        env["PAUSE_AT_STEP"] = str(pause_at)  # see script_progress
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(workdir), str(save_freq)],
        stdin=subprocess.PIPE if pause_at is not None else None,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _run_until(proc: subprocess.Popen[str], step: int, sig: int, delay: float) -> int:
    """Wait until the run prints `step k` with k >= step, then send `sig` after `delay` seconds (and
    let a run started with `pause_at` go on)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= step:
            time.sleep(delay)
            proc.send_signal(sig)
            if proc.stdin is not None:
                proc.stdin.write("\n")
                proc.stdin.close()
            break
    proc.stdout.read()
    return proc.wait(timeout=60)


def _finish(proc: subprocess.Popen[str]) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def _results(workdir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    # A write killed mid-way leaves its hidden temp file (never read; removed at the next save there).
    names = [n for n in os.listdir(workdir / "ckpt") if not n.startswith(".")]
    ckpts = {name: load_file(workdir / "ckpt" / name) for name in names}
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
    # save_freq="epoch": the mid-epoch backup can only come from the SIGTERM handling. The run waits
    # at step 11 until the signal is sent, so it lands mid-epoch however loaded the machine is.
    code = _run_until(_start(tmp_path, "epoch", pause_at=11), 11, signal.SIGTERM, 0.0)
    assert code == 128 + signal.SIGTERM
    with safe_open(tmp_path / "backup" / "latest.safetensors", framework="pt") as f:
        document = json.loads(f.metadata()[STATE_KEY])
    assert document["epoch"] == 1 and 0 < document["batch"] <= 8, document
    assert document["global_step"] == 8 + document["batch"]
    _finish(_start(tmp_path, "epoch"))
    _assert_same(baseline, tmp_path)


# -- in process ---------------------------------------------------------------------------------------
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


def test_bad_save_freq_and_backup_dir_are_rejected() -> None:
    with pytest.raises(ValueError, match="save_freq"):
        tc.BackupAndRestore("x", save_freq=0)
    with pytest.raises(ValueError, match="save_freq"):
        tc.BackupAndRestore("x", save_freq=True)
    with pytest.raises(ValueError, match="backup_dir"):
        tc.BackupAndRestore("")


class SendSigterm(tc.Callback):
    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.loop.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_save_freq_false_backs_up_only_on_sigterm(tmp_path: Path) -> None:
    """Keras' save_freq=False: no periodic backup; a SIGTERM still gets one, at the batch it reached."""
    with pytest.raises(RuntimeError, match="crash"):
        _train(tc.BackupAndRestore(tmp_path, save_freq=False), [Crash(9)])
    assert not (tmp_path / "latest.safetensors").exists()
    with pytest.raises(SystemExit) as exit_info:
        _train(tc.BackupAndRestore(tmp_path, save_freq=False), [SendSigterm(6)])
    assert exit_info.value.code == 128 + signal.SIGTERM
    state = tc.checkpoint.read_training_state(tmp_path / "latest.safetensors")
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 2, 6)
    reference = _train(None, [])
    resumed = _train(tc.BackupAndRestore(tmp_path, save_freq=False), [], seed=9)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_batch_backups_are_counted_over_the_run(tmp_path: Path) -> None:
    saved: list[tuple[int, int]] = []

    class Spy(tc.BackupAndRestore):
        def _save(self) -> None:
            saved.append(self.loop.position)
            super()._save()

    _train(Spy(tmp_path, save_freq=3), [], epochs=3)
    assert saved == [(0, 3), (1, 2), (2, 1), (2, 4)]  # global steps 3, 6, 9, 12 with 4 batches per epoch


def test_async_backups_resume_the_same(tmp_path: Path) -> None:
    reference = _train(None, [])
    with pytest.raises(RuntimeError):
        _train(tc.BackupAndRestore(tmp_path, save_freq=2, async_save=True), [Crash(7)])
    resumed = _train(tc.BackupAndRestore(tmp_path, save_freq=2, async_save=True), [], seed=5)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backup_first", [True, False])
def test_the_place_in_the_list_does_not_matter(tmp_path: Path, backup_first: bool) -> None:
    """Before, a BackupAndRestore placed before a stateful callback saved that callback's state before
    its epoch-end update and loaded it before its on_train_begin reset (and warned about it)."""

    def run(backup: tc.BackupAndRestore | None, extra: list[tc.Callback], seed: int = 0) -> tc.EarlyStopping:
        stopper = tc.EarlyStopping(monitor="loss", patience=10, restore_best_weights=True)
        listed: list[tc.Callback] = [stopper, *extra]
        if backup is not None:
            listed = [backup, *listed] if backup_first else [*listed, backup]
        _train(None, listed, epochs=4, seed=seed)
        return stopper

    reference = run(None, [])
    with pytest.raises(RuntimeError):
        run(tc.BackupAndRestore(tmp_path), [Crash(13)])
    resumed = run(tc.BackupAndRestore(tmp_path), [], seed=3)
    assert (resumed.best, resumed.best_epoch, resumed.wait) == (reference.best, reference.best_epoch, reference.wait)
    assert reference.best_weights is not None and resumed.best_weights is not None
    assert all(torch.equal(reference.best_weights[k], resumed.best_weights[k]) for k in reference.best_weights)


def test_a_mid_epoch_backup_of_more_processes_is_refused_naming_both_counts() -> None:
    """Its batches to skip are counted in the old run's per-process batches: resuming it on another
    number of processes would train samples twice or never; say so instead of diverging silently."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callbacks = tc.CallbackList(model=model, optimizer=optimizer)
    state = callbacks.loop.state_dict()
    own = {"rng": state["rng"], "loop": {}}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tc.CheckpointError, match=r"2 processes and this run has 1"):
        callbacks.loop.load_state_dict({**state, "batch": 3, "ranks": [own, own]}, "two.safetensors")
    with pytest.warns(UserWarning, match="random states of process 0"):  # at an epoch end: a warning only
        callbacks.loop.load_state_dict({**state, "batch": 0, "ranks": [own, own]}, "two.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


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


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_dataloader_workers_backs_up_and_resumes_exactly(tmp_path: Path) -> None:
    """A preemption notice to the whole process group reaches the DataLoader workers too. Before, they
    died at once and the run failed with "DataLoader worker exited unexpectedly" before its backup
    (lost in 2 of 3 tries). Worker-side random augmentation is reproduced by the resumed run."""
    script = Path(__file__).resolve().parent / "sigterm_workers_script.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def start(workdir: Path, pause_at: int | None = None) -> subprocess.Popen[str]:
        """The run; with `pause_at`, it waits after `step <pause_at>` for a line on its stdin (script_progress)."""
        return subprocess.Popen([sys.executable, str(script), str(workdir)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                stdin=subprocess.PIPE if pause_at is not None else None,
                                env={**env, "PAUSE_AT_STEP": str(pause_at)} if pause_at is not None else env)

    plain = start(tmp_path / "plain")
    _, err = plain.communicate(timeout=120)
    assert plain.returncode == 0, err
    for attempt in range(2):
        workdir = tmp_path / f"term{attempt}"
        step = 5 + 7 * attempt
        proc = start(workdir, pause_at=step)  # waits there until the signal is sent, however loaded the machine is
        assert proc.stdout is not None and proc.stdin is not None
        for line in proc.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= step:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.stdin.write("\n")
                proc.stdin.flush()  # communicate() closes it
                break
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
        state = tc.checkpoint.read_training_state(workdir / "backup" / "latest.safetensors")
        assert state["batch"] > 0
        rerun = start(workdir)
        _, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        expected, resumed = load_file(tmp_path / "plain" / "final.safetensors"), load_file(workdir / "final.safetensors")
        assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_constructor_messages_begin_as_keras_and_save_freq_false_is_accepted() -> None:
    assert tc.BackupAndRestore("x", save_freq=False).save_freq is False  # Keras: only at preemption
    for bad in (0, True, "batch", 1.5, None):
        with pytest.raises(ValueError, match=r"^Invalid value for argument `save_freq`\. Received: save_freq="):
            tc.BackupAndRestore("x", save_freq=bad)
    for empty in ("", None):
        with pytest.raises(ValueError, match=r"^Empty `backup_dir` argument passed"):
            tc.BackupAndRestore(empty)
    with pytest.raises(TypeError, match="backup_dir"):
        tc.BackupAndRestore(3)


def test_dataloader_workers_end_with_a_fit_that_raised(tmp_path: Path) -> None:
    """The error's traceback keeps the data iterator alive, and BackupAndRestore's workers ignore
    SIGTERM (a preemption notice to the process group must not kill them before the backup): unless
    fit shuts them down itself, the interpreter's exit waits for them forever."""
    import multiprocessing

    dataset = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    model = make_model()
    with pytest.raises(RuntimeError) as raised:
        tc.fit(model, torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, multiprocessing_context="forkserver"),
               optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss=torch.nn.functional.mse_loss, epochs=2,
               verbose=0, steps_per_epoch=5, callbacks=[tc.BackupAndRestore(tmp_path, save_freq=2), Crash(3)])
    assert raised.value.__traceback__ is not None  # still held, as by a caller that reports it
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []
