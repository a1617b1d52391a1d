"""fit(..., gradient_accumulation_steps=k): one optimizer step every k batches, loss scaled by 1/k."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import Crash, make_arrays, make_model, seeded_model
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc

ROOT = Path(__file__).resolve().parent.parent


def _data(n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return make_arrays(n, seed)


def _count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    steps: list[int] = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    return steps


def _close(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> bool:
    return all(torch.allclose(p, q, atol=atol, rtol=0) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.mark.parametrize("k", [2, 4])
def test_k_batches_of_b_equal_one_batch_of_k_times_b_with_sgd(k: int) -> None:
    x, y = _data()
    small, big = seeded_model(), seeded_model()
    small_sgd = torch.optim.SGD(small.parameters(), lr=0.1)
    steps = _count_steps(small_sgd)
    tc.fit(small, _loader(x, y, 3), optimizer=small_sgd, loss=F.mse_loss, epochs=2, verbose=0,
           gradient_accumulation_steps=k)
    tc.fit(big, _loader(x, y, 3 * k), optimizer=torch.optim.SGD(big.parameters(), lr=0.1), loss=F.mse_loss,
           epochs=2, verbose=0)
    assert len(steps) == 2 * 16 // k
    assert _close(small, big)
    assert not _close(small, seeded_model())  # it trained


def test_logged_loss_is_the_unscaled_loss() -> None:
    x, y = _data()
    history_k, history_1 = tc.History(), tc.History()
    for history, k in ((history_k, 4), (history_1, None)):
        model = seeded_model()
        tc.fit(model, _loader(x, y, 48), optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=F.mse_loss,
               verbose=0, gradient_accumulation_steps=k, callbacks=[history])
    assert history_k.history["loss"] == pytest.approx(history_1.history["loss"])


def test_an_epoch_not_a_multiple_of_k_carries_its_gradients_into_the_next_epoch() -> None:
    """Keras 3 counts the batches over the run (optimizer iterations + 1 divisible by k): 5 batches
    per epoch and k=2 step after global batches 2, 4, 6, 8, 10; the gradient of an incomplete
    group at the end of training (none here) is not applied."""
    x, y = _data(20)
    model, by_hand = seeded_model(), seeded_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = _count_steps(sgd)
    tc.fit(model, _loader(x, y, 4), optimizer=sgd, loss=F.mse_loss, epochs=2, verbose=0, gradient_accumulation_steps=2)
    hand_sgd = torch.optim.SGD(by_hand.parameters(), lr=0.1, momentum=0.9)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 20, 4)] * 2
    for index, (bx, by) in enumerate(batches):
        (F.mse_loss(by_hand(bx), by) / 2).backward()
        if index % 2 == 1:
            hand_sgd.step()
            hand_sgd.zero_grad()
    assert len(steps) == 5
    assert _close(model, by_hand)


def test_an_incomplete_group_at_the_end_of_training_is_not_applied() -> None:
    x, y = _data(20)
    model, by_hand = seeded_model(), seeded_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = _count_steps(sgd)
    tc.fit(model, _loader(x, y, 4), optimizer=sgd, loss=F.mse_loss, verbose=0, gradient_accumulation_steps=3)
    tc.fit(by_hand, _loader(x[:12], y[:12], 12), optimizer=torch.optim.SGD(by_hand.parameters(), lr=0.1),
           loss=F.mse_loss, verbose=0)
    assert len(steps) == 1
    assert _close(model, by_hand)


# -- learning-rate schedules see optimizer steps -----------------------------------------------------------
def test_a_per_batch_schedule_counts_optimizer_steps() -> None:
    x, y = _data(24)
    positions: list[int] = []

    def schedule(step: int, lr: float) -> float:
        positions.append(step)
        return 0.1 / (1 + step)

    model = seeded_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    lrs: list[float] = []
    sgd.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    tc.fit(model, _loader(x, y, 4), optimizer=sgd, loss=F.mse_loss, epochs=2, verbose=0,
           gradient_accumulation_steps=3, callbacks=[tc.LearningRateScheduler(schedule, per_batch=True)])
    assert positions == [0, 1, 2, 3]  # applied once per optimizer step (idempotent within a group)
    assert lrs == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])


def test_a_per_batch_torch_scheduler_steps_with_the_optimizer() -> None:
    x, y = _data(24)
    model = seeded_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
    tc.fit(model, _loader(x, y, 4), optimizer=sgd, loss=F.mse_loss, epochs=2, verbose=0,
           gradient_accumulation_steps=3, callbacks=[tc.LearningRateScheduler(scheduler, per_batch=True)])
    assert scheduler.last_epoch == 4  # 12 batches, 4 optimizer steps
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


# -- GradScaler and clipping --------------------------------------------------------------------------------
class CountingScaler(torch.amp.GradScaler):
    def __init__(self, calls: list[str]) -> None:
        super().__init__("cpu")
        self.calls = calls

    def scale(self, outputs: Any) -> Any:
        self.calls.append("scale")
        return super().scale(outputs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append("unscale")
        super().unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("step")
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale: Any = None) -> None:
        self.calls.append("update")
        super().update(new_scale)


def test_grad_scaler_and_clipping_act_on_stepping_batches_only() -> None:
    x, y = _data(16)
    calls: list[str] = []
    model, big = seeded_model(), seeded_model()
    tc.fit(model, _loader(x, y, 4), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss=F.mse_loss,
           verbose=0, gradient_accumulation_steps=2, scaler=CountingScaler(calls), clip_grad_norm=0.05)
    group = ["scale", "scale", "unscale", "step", "update"]
    assert calls == group * 2
    # the clip acts on the unscaled, accumulated gradient: the same as one big batch with the clip
    tc.fit(big, _loader(x, y, 8), optimizer=torch.optim.SGD(big.parameters(), lr=0.1), loss=F.mse_loss,
           verbose=0, scaler=torch.amp.GradScaler("cpu"), clip_grad_norm=0.05)
    assert _close(model, big)


def test_clipping_without_a_scaler_clips_the_accumulated_gradient() -> None:
    x, y = _data(16)
    model, big = seeded_model(), seeded_model()
    tc.fit(model, _loader(x, y, 4), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss=F.mse_loss,
           verbose=0, gradient_accumulation_steps=2, clip_grad_norm=0.05)
    tc.fit(big, _loader(x, y, 8), optimizer=torch.optim.SGD(big.parameters(), lr=0.1), loss=F.mse_loss,
           verbose=0, clip_grad_norm=0.05)
    assert _close(model, big)


def test_bfloat16_autocast_with_a_scaler_trains() -> None:
    x, y = _data(16)
    calls: list[str] = []
    model = seeded_model()
    history = tc.fit(model, _loader(x, y, 4), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     loss=F.mse_loss, verbose=0, epochs=2, gradient_accumulation_steps=2, amp_dtype=torch.bfloat16,
                     scaler=CountingScaler(calls))
    assert calls.count("step") == 4 and calls.count("scale") == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert history.history["loss"][1] < history.history["loss"][0]


# -- exact resume in the middle of a group ---------------------------------------------------------------------
def _train(tmp_path: Path | None, extra: list[tc.Callback], seed: int, epochs: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
    x, y = _data(40)
    callbacks = [*extra, *([tc.BackupAndRestore(tmp_path, save_freq=1)] if tmp_path is not None else [])]
    tc.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), epochs=epochs, verbose=0,
           optimizer=torch.optim.Adam(model.parameters(), lr=0.01), loss=F.mse_loss, callbacks=callbacks,
           gradient_accumulation_steps=3)
    return model


# 5 batches per epoch, groups of 3 across epochs; the crash comes before that batch's backup, so the
# backups resumed from are at global steps 4, 5, 7: one or two batches into a group (8 crosses an epoch)
@pytest.mark.parametrize("crash_at", [5, 6, 8])
def test_resume_in_the_middle_of_a_group_is_exact(tmp_path: Path, crash_at: int) -> None:
    reference = _train(None, [], seed=0)
    with pytest.raises(RuntimeError, match="crash"):
        _train(tmp_path, [Crash(crash_at)], seed=0)
    resumed = _train(tmp_path, [], seed=4321)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_backup_with_another_k_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="crash"):
        _train(tmp_path, [Crash(4)], seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
    x, y = _data(40)
    with pytest.raises(tc.CheckpointError, match="gradient_accumulation_steps=3; this run has 2"):
        tc.fit(model, DataLoader(TensorDataset(x, y), batch_size=8), verbose=0, loss=F.mse_loss,
               optimizer=torch.optim.Adam(model.parameters()), gradient_accumulation_steps=2,
               callbacks=[tc.BackupAndRestore(tmp_path, save_freq=1, double_checkpoint=False)])


# -- arguments ---------------------------------------------------------------------------------------------------
def test_argument_errors() -> None:
    x, y = _data()
    model = seeded_model()
    for bad, error in ((0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="gradient_accumulation_steps: expected None or an integer >= 1"):
            tc.fit(model, _loader(x, y, 8), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss=F.mse_loss,
                   verbose=0, gradient_accumulation_steps=bad)
    with pytest.raises(ValueError, match="not applied to a custom train_step"):
        tc.fit(model, _loader(x, y, 8), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), verbose=0,
               train_step=lambda batch: torch.zeros(()), gradient_accumulation_steps=2)


def test_params_tell_callbacks_k_and_the_default_path_is_unchanged() -> None:
    x, y = _data()
    seen: list[dict[str, Any]] = []
    recorder = tc.LambdaCallback(on_train_begin=lambda logs: seen.append(dict(recorder.params)))
    for k in (None, 1, 3):
        model = seeded_model()
        stepper_params = tc.fit(model, _loader(x, y, 8), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                loss=F.mse_loss, verbose=0, gradient_accumulation_steps=k, callbacks=[recorder])
        assert stepper_params is not None
    assert "gradient_accumulation_steps" not in seen[0] and "gradient_accumulation_steps" not in seen[1]
    assert seen[2]["gradient_accumulation_steps"] == 3


# -- DistributedDataParallel: no all-reduce on the batches that do not step ------------------------------------
_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    import torch, torch.distributed as dist, torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    import torchcallbacks as tc
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    reference.load_state_dict(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    reductions = []
    def hook(state, bucket):
        reductions.append(1)
        return allreduce_hook(None, bucket)
    ddp.register_comm_hook(None, hook)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g); y = x.sum(1, keepdim=True)
    tc.fit(ddp, DataLoader(TensorDataset(x, y), batch_size=4), optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1),
           loss=F.mse_loss, verbose=0, gradient_accumulation_steps=int(sys.argv[2]))
    tc.fit(reference, DataLoader(TensorDataset(x, y), batch_size=4 * int(sys.argv[2])),
           optimizer=torch.optim.SGD(reference.parameters(), lr=0.1), loss=F.mse_loss, verbose=0)
    close = all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(model.parameters(), reference.parameters()))
    print(json.dumps({"reductions": len(reductions), "close": close}))
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 4])  # k=1: the hook counts every batch
def test_ddp_all_reduces_once_per_optimizer_step(tmp_path: Path, k: int) -> None:
    """A one-process gloo group in a subprocess (so this process's tests stay outside any group):
    the comm hook runs once per bucket per all-reduce; the model is small enough for one bucket."""
    script = tmp_path / "ddp_accumulation.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(k)], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"reductions": 12 // k, "close": True}
