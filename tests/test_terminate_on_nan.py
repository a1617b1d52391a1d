"""TerminateOnNaN: stop or raise on a NaN/inf loss, check_every, epoch-end check, hand-written loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks
from torchcallbacks import CallbackList, LambdaCallback, NonFiniteLossError, TerminateOnNaN


def loader_with_bad_batch(bad_batch: int, value: float = float("nan")) -> DataLoader:
    """8 batches of 4 samples; the inputs of batch `bad_batch` hold `value`, so its loss is non-finite."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(32, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    x[bad_batch * 4] = value
    return DataLoader(TensorDataset(x, y), batch_size=4)


def fit_counting(callback: TerminateOnNaN, loader: DataLoader, epochs: int = 3) -> tuple[list[tuple[int, int]], Any]:
    model = make_model()
    batches: list[tuple[int, int]] = []
    epoch_of = {"epoch": 0}
    count = LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epoch_of.update(epoch=epoch),
        on_train_batch_end=lambda batch, logs: batches.append((epoch_of["epoch"], batch)),
    )
    history = torchcallbacks.fit(
        model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=F.mse_loss,
        epochs=epochs, verbose=0, callbacks=[count, callback],
    )
    return batches, history


def test_nan_loss_stops_after_that_batch(capsys: pytest.CaptureFixture[str]) -> None:
    batches, history = fit_counting(TerminateOnNaN(), loader_with_bad_batch(2))
    assert batches == [(0, 0), (0, 1), (0, 2)]
    assert len(history.epoch) == 1
    assert "Batch 2: Invalid loss, terminating training (loss value: nan)" in capsys.readouterr().out


def test_infinite_loss_stops_too() -> None:
    batches, _ = fit_counting(TerminateOnNaN(), loader_with_bad_batch(1, float("inf")))
    assert batches == [(0, 0), (0, 1)]


def test_finite_losses_run_to_the_end() -> None:
    batches, history = fit_counting(TerminateOnNaN(), loader_with_bad_batch(0, 1.0), epochs=2)
    assert len(batches) == 16
    assert len(history.epoch) == 2


def test_raise_error_raises_and_on_train_end_still_runs() -> None:
    ended: list[BaseException | None] = []
    callback = TerminateOnNaN(raise_error=True)

    class RecordEnd(torchcallbacks.Callback):
        def on_train_end(self, logs: Any = None) -> None:
            ended.append(self.loop.exception)

    model = make_model()
    with pytest.raises(NonFiniteLossError, match=r"^NaN or Inf loss encountered at batch 2 \(loss value: nan\)") as raised:
        torchcallbacks.fit(
            model, loader_with_bad_batch(2), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss=F.mse_loss, epochs=2, verbose=0, callbacks=[callback, RecordEnd()],
        )
    assert isinstance(raised.value, RuntimeError)
    assert ended == [raised.value]


def test_check_every_n_batches_catches_it_through_the_running_mean() -> None:
    # batch 2 (global step 3) is bad; checks happen at global steps 4, 8, ...: the running mean of
    # the epoch's loss is NaN from batch 2 on, so the check after batch 3 sees it
    batches, _ = fit_counting(TerminateOnNaN(check_every=4), loader_with_bad_batch(2))
    assert batches == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_epoch_end_check_when_batches_are_not_checked() -> None:
    batches, history = fit_counting(TerminateOnNaN(check_every=1000), loader_with_bad_batch(5))
    assert len(batches) == 8
    assert len(history.epoch) == 1


def test_hand_written_loop_with_tensor_losses() -> None:
    model = make_model()
    callbacks = CallbackList([TerminateOnNaN()], model=model)
    losses = [torch.tensor(1.0), torch.tensor(0.5), torch.tensor(float("nan")), torch.tensor(0.25)]
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    seen = 0
    for i, loss in enumerate(losses):
        callbacks.on_train_batch_begin(i)
        callbacks.on_train_batch_end(i, {"loss": loss})
        seen += 1
        if callbacks.stop_training:
            break
    callbacks.on_train_end()
    assert seen == 3
    assert model.stop_training is True


def test_logs_without_a_loss_are_ignored() -> None:
    callbacks = CallbackList([TerminateOnNaN()], model=make_model())
    callbacks.on_train_batch_end(0, {"accuracy": float("nan")})
    callbacks.on_epoch_end(0, {})
    assert not callbacks.stop_training


def test_check_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="check_every"):
        TerminateOnNaN(check_every=0)
    with pytest.raises(TypeError, match="check_every"):
        TerminateOnNaN(check_every=1.5)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "raise"])
def test_every_process_stops_at_the_same_batch_under_torchrun(mode: str, tmp_path: Path) -> None:
    worker = Path(__file__).parent / "distributed" / "terminate_on_nan_worker.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), mode],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    verb = "raised" if mode == "raise" else "stopped"
    lines = [(tmp_path / f"rank_{rank}.txt").read_text() for rank in range(2)]
    assert lines == [f"rank 0 {verb} after batch 2", f"rank 1 {verb} after batch 2"]


def test_messages_begin_as_keras(capsys: pytest.CaptureFixture[str]) -> None:
    fit_counting(TerminateOnNaN(), loader_with_bad_batch(3))
    assert capsys.readouterr().out.startswith("Batch 3: Invalid loss, terminating training (loss value: nan)")
    with pytest.raises(NonFiniteLossError, match=r"^NaN or Inf loss encountered at batch 3 \(loss value: nan\)\."):
        fit_counting(TerminateOnNaN(raise_error=True), loader_with_bad_batch(3))
    callback = TerminateOnNaN(raise_error=True)
    callback.set_model(torch.nn.Linear(1, 1))
    with pytest.raises(NonFiniteLossError, match=r"^NaN or Inf loss encountered at epoch 2 "):
        callback.on_epoch_end(1, {"loss": float("nan")})


def test_the_default_checks_every_batch_only_where_it_is_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check costs a device sync on an accelerator and a collective under torch.distributed: the
    default (check_every=None) checks every batch on a single CPU process only, else every 100."""
    from torchcallbacks.callbacks import terminate_on_nan

    def every(model: torch.nn.Module, distributed: bool = False, check_every: int | None = None) -> int:
        monkeypatch.setattr(terminate_on_nan, "is_distributed", lambda: distributed)
        callback = TerminateOnNaN(check_every=check_every)
        CallbackList([callback], model=model).on_train_begin()
        return callback.interval

    assert every(torch.nn.Linear(2, 1)) == 1
    assert every(torch.nn.Linear(2, 1, device="meta")) == terminate_on_nan.AUTO_CHECK_EVERY == 100
    assert every(torch.nn.Linear(2, 1), distributed=True) == 100
    assert every(torch.nn.Linear(2, 1), distributed=True, check_every=1) == 1
