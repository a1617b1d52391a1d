"""LearningRateScheduler: function and torch schedules, per epoch and per batch, errors, resume."""

from __future__ import annotations

import functools
import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression, run_epochs, train_epoch_by_hand
from torch.optim import lr_scheduler

import torchcallbacks
from torchcallbacks import BackupAndRestore, Callback, CallbackList, LambdaCallback, LearningRateScheduler


def two_groups(lrs: tuple[float, ...] = (0.1, 0.01)) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD([{"params": params[i :: len(lrs)], "lr": lr} for i, lr in enumerate(lrs)])
    return model, optimizer


def lrs_of(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


def fit_lrs(callback: LearningRateScheduler, epochs: int = 3, lr: float = 0.1, **kwargs: Any) -> tuple[list, dict]:
    """Fit, recording the lr of every training batch; returns (batch lrs, history)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    seen: list[float] = []
    record = LambdaCallback(on_train_batch_begin=lambda batch, logs: seen.append(optimizer.param_groups[0]["lr"]))
    history = torchcallbacks.fit(
        model, make_regression(), optimizer=optimizer, loss=F.mse_loss, epochs=epochs, verbose=0,
        callbacks=[callback, record], **kwargs,
    )
    return seen, history.history


def test_two_argument_schedule_gets_each_groups_own_rate() -> None:
    model, optimizer = two_groups()
    calls: list[tuple[int, float]] = []

    def halve(epoch: int, lr: float) -> float:
        calls.append((epoch, lr))
        return lr * 0.5

    run_epochs(CallbackList([LearningRateScheduler(halve)], model=model, optimizer=optimizer), [1.0, 1.0])
    assert calls == [(0, 0.1), (0, 0.01), (1, 0.05), (1, 0.005)]
    assert lrs_of(optimizer) == pytest.approx([0.025, 0.0025])
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.01]


def test_one_argument_schedule_sets_every_group() -> None:
    model, optimizer = two_groups()
    run_epochs(CallbackList([LearningRateScheduler(lambda epoch: 0.1 / (epoch + 1))], model=model, optimizer=optimizer), [1.0] * 4)
    assert lrs_of(optimizer) == pytest.approx([0.025, 0.025])


def test_learning_rate_is_in_the_epoch_logs() -> None:
    seen, history = fit_lrs(LearningRateScheduler(lambda epoch, lr: lr * 0.5))
    assert history["learning_rate"] == pytest.approx([0.05, 0.025, 0.0125])
    assert seen == pytest.approx([0.05] * 4 + [0.025] * 4 + [0.0125] * 4)


def test_keras_docstring_schedule_returning_ints_and_tensors_is_accepted() -> None:
    for result in (1, np.float32(0.5), np.float64(0.25), torch.tensor(0.125), torch.tensor([0.0625]), np.array(0.5)):
        model, optimizer = two_groups()
        schedule = functools.partial(lambda value, epoch, lr: value, result)
        run_epochs(CallbackList([LearningRateScheduler(schedule)], model=model, optimizer=optimizer), [1.0])
        assert lrs_of(optimizer) == [float(result)] * 2
        assert all(type(g["lr"]) is float for g in optimizer.param_groups)


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        (float("nan"), ValueError, r"schedule\(epoch=0, lr=0.1\): expected a finite learning rate, received nan"),
        (math.inf, ValueError, "finite"),
        (-0.1, ValueError, r"expected a learning rate >= 0, received -0.1"),
        (torch.tensor(-1.0), ValueError, ">= 0"),
        ("0.1", TypeError, r"schedule\(epoch=0, lr=0.1\): expected a real number or a 0-d tensor, received str"),
        (None, TypeError, "received NoneType"),
        (True, TypeError, "bool"),
        (torch.tensor([0.1, 0.2]), TypeError, r"shape \(2,\)"),
    ],
)
def test_bad_schedule_results_are_clear_errors(result: Any, error: type[Exception], match: str) -> None:
    model, optimizer = two_groups()
    callbacks = CallbackList([LearningRateScheduler(lambda epoch, lr: result)], model=model, optimizer=optimizer)
    with pytest.raises(error, match=match):
        run_epochs(callbacks, [1.0])
    assert lrs_of(optimizer) == [0.1, 0.01]  # nothing applied


def test_one_argument_schedule_error_names_its_call() -> None:
    model, optimizer = two_groups()
    callbacks = CallbackList([LearningRateScheduler(lambda epoch: -1)], model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match=r"schedule\(epoch=0\)"):
        run_epochs(callbacks, [1.0])


def test_type_error_inside_a_two_argument_schedule_propagates() -> None:
    calls: list[int] = []

    def schedule(epoch: int, lr: float) -> float:
        calls.append(epoch)
        return lr * "oops"  # type: ignore[operator,no-any-return]  # a bug inside the schedule

    model, optimizer = two_groups()
    callbacks = CallbackList([LearningRateScheduler(schedule)], model=model, optimizer=optimizer)
    with pytest.raises(TypeError, match=r"can't multiply sequence|unsupported operand"):
        run_epochs(callbacks, [1.0])
    assert calls == [0]  # called once, with two arguments, never retried as schedule(epoch)


class OneArgument:
    def __call__(self, epoch: int) -> float:
        return 0.5


def three(epoch: int, lr: float, factor: float) -> float:
    return lr * factor


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (OneArgument(), 0.5),
        (lambda epoch, lr=None: 0.25, 0.25),  # a second positional parameter with a default: two arguments
        (lambda *args: 0.125 if len(args) == 2 else -1.0, 0.125),
        (functools.partial(three, factor=2.0), 0.2),
        (functools.partial(three, lr=0.5, factor=0.5), 0.25),  # only epoch is left positional
    ],
)
def test_arity_is_decided_from_the_signature(schedule: Any, expected: float) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run_epochs(CallbackList([LearningRateScheduler(schedule)], model=model, optimizer=optimizer), [1.0])
    assert lrs_of(optimizer) == [pytest.approx(expected)]


def test_schedule_must_be_callable_or_a_torch_scheduler() -> None:
    with pytest.raises(TypeError, match="schedule: expected a function"):
        LearningRateScheduler(0.1)  # type: ignore[arg-type]


def test_needs_an_optimizer_in_a_hand_written_loop() -> None:
    callbacks = CallbackList([LearningRateScheduler(lambda epoch: 0.1)], model=make_model())
    with pytest.raises(TypeError, match="needs the optimizer"):
        run_epochs(callbacks, [1.0])


def test_torch_scheduler_per_epoch() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = LearningRateScheduler(lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
    history = torchcallbacks.fit(
        model, make_regression(), optimizer=optimizer, loss=F.mse_loss, epochs=3, verbose=0, callbacks=[callback]
    )
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.05, 0.025])
    assert lrs_of(optimizer) == pytest.approx([0.0125])


def test_torch_reduce_lr_on_plateau_with_a_monitor() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=0)
    callbacks = CallbackList([LearningRateScheduler(plateau, monitor="val_loss")], model=model, optimizer=optimizer)
    run_epochs(callbacks, [1.0, 1.0, 1.0], monitor="val_loss")
    assert lrs_of(optimizer) == pytest.approx([0.025])
    # a missing monitor warns once and leaves the scheduler alone
    with pytest.warns(UserWarning, match="'val_loss' is not in the logs") as record:
        run_epochs(callbacks, [1.0, 1.0, 1.0], monitor="loss")
    assert len([w for w in record if "val_loss" in str(w.message)]) == 1
    assert lrs_of(optimizer) == pytest.approx([0.025])


def test_it_reads_its_monitor_without_being_a_monitor_callback() -> None:
    """It reads one value for torch's ReduceLROnPlateau; it keeps no best / baseline / min_delta state."""
    callback = LearningRateScheduler(lambda epoch, lr: lr, monitor="val_loss")
    assert not isinstance(callback, torchcallbacks.MonitorCallback)
    assert not hasattr(callback, "best") and not hasattr(callback, "min_delta")
    with pytest.raises(TypeError, match="monitor: expected the name of a logged value"):
        LearningRateScheduler(lambda epoch, lr: lr, monitor="")
    # a misspelt monitor is still an error naming it and the keys (mode "auto": Keras 3's rule)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=0)
    callbacks = CallbackList([LearningRateScheduler(plateau, monitor="los")], model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match="LearningRateScheduler: the monitored value 'los' is not in the logs; available keys: learning_rate, loss. Monitor one of them.$"):
        run_epochs(callbacks, [1.0], monitor="loss")


def test_per_batch_function_schedule_uses_the_global_step() -> None:
    warmup = LearningRateScheduler(lambda step: 0.1 * min(1.0, (step + 1) / 6), per_batch=True)
    seen, history = fit_lrs(warmup, epochs=2)
    assert seen == pytest.approx([0.1 * (i + 1) / 6 for i in range(6)] + [0.1, 0.1])
    assert history["learning_rate"] == pytest.approx([0.1 * 4 / 6, 0.1])


def test_per_batch_torch_scheduler_matches_stepping_it_by_hand() -> None:
    def cosine_with_warmup(optimizer: torch.optim.Optimizer) -> lr_scheduler.LRScheduler:
        warm = lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=3)
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=9)
        return lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[3])

    reference_optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    reference = cosine_with_warmup(reference_optimizer)
    expected = []
    for _ in range(12):
        expected.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        reference.step()

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[float] = []
    torchcallbacks.fit(
        model, make_regression(), optimizer=optimizer, loss=F.mse_loss, epochs=3, verbose=0,
        callbacks=[
            LearningRateScheduler(cosine_with_warmup(optimizer), per_batch=True),
            LambdaCallback(on_train_batch_begin=lambda batch, logs: seen.append(optimizer.param_groups[0]["lr"])),
        ],
    )
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=5),
        lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20),
        lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 0.9**epoch),
        lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=0),
        lambda opt: lr_scheduler.SequentialLR(
            opt, [lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(opt, 0.9)], [2]
        ),
    ],
)
def test_torch_scheduler_state_round_trips_through_json_and_continues(make: Any) -> None:
    def drive(callbacks: CallbackList, epochs: range) -> list[float]:
        lrs = []
        for epoch in epochs:
            callbacks.on_epoch_begin(epoch)
            logs: dict[str, Any] = {"val_loss": 1.0}
            callbacks.on_epoch_end(epoch, logs)
            lrs.append(logs["learning_rate"])
        return lrs

    def fresh() -> tuple[CallbackList, LearningRateScheduler, torch.optim.Optimizer]:
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        callback = LearningRateScheduler(make(optimizer))
        callbacks = CallbackList([callback], model=model, optimizer=optimizer)
        callbacks.on_train_begin()
        return callbacks, callback, optimizer

    full, _, _ = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OneCycleLR etc. without optimizer steps: not what is tested here
        expected = drive(full, range(8))
        first, first_callback, first_optimizer = fresh()
        got = drive(first, range(4))
        state = json.loads(json.dumps(first_callback.state_dict()))
        second, second_callback, second_optimizer = fresh()
        second_optimizer.load_state_dict(first_optimizer.state_dict())
        second_callback.load_state_dict(state)
        got += drive(second, range(4, 8))
    assert got == pytest.approx(expected)


class CrashAt(Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if (self.loop.epoch, batch) == (self.epoch, self.batch):
            raise RuntimeError("crash")


@pytest.mark.parametrize("backup_first", [True, False])
@pytest.mark.parametrize("per_batch", [False, True])
def test_resume_in_the_middle_of_an_epoch_continues_the_schedule(
    tmp_path: Any, backup_first: bool, per_batch: bool
) -> None:
    """The schedule's position and the learning rate come back with the backup, wherever
    BackupAndRestore is in the list; the resumed epoch's on_epoch_begin does not schedule twice."""

    def schedule(position: int, lr: float) -> float:
        return lr * 0.5

    full_seen, _ = fit_lrs(LearningRateScheduler(schedule, per_batch=per_batch), epochs=3)

    def run(extra: list[Callback]) -> list[float]:
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        seen: list[float] = []
        record = LambdaCallback(on_train_batch_begin=lambda batch, logs: seen.append(optimizer.param_groups[0]["lr"]))
        backup = BackupAndRestore(tmp_path, save_freq=1)
        listed = [LearningRateScheduler(schedule, per_batch=per_batch), record, *extra]
        torchcallbacks.fit(model, make_regression(), optimizer=optimizer, loss=F.mse_loss, epochs=3, verbose=0,
                           callbacks=[backup, *listed] if backup_first else [*listed, backup])
        return seen

    with pytest.raises(RuntimeError, match="crash"):
        run([CrashAt(1, 2)])  # the backup after batch 1 of epoch 1 is the last one
    assert run([]) == pytest.approx(full_seen[6:])


def test_state_is_reset_for_a_new_run() -> None:
    model, optimizer = two_groups((0.1,))
    callback = LearningRateScheduler(lambda epoch, lr: lr * 0.5)
    callbacks = CallbackList([callback], model=model, optimizer=optimizer)
    run_epochs(callbacks, [1.0])
    run_epochs(callbacks, [1.0])  # a second run from epoch 0 applies epoch 0 again
    assert lrs_of(optimizer) == pytest.approx([0.025])
    assert callback.state_dict() == {"last_applied": 0}


def test_no_step_order_warning_when_a_grad_scaler_skips_steps() -> None:
    # float16 on the CPU with a huge loss scale: the gradients overflow, so GradScaler skips the
    # optimizer steps, and torch would warn that the scheduler stepped before the optimizer.
    reference_model = make_model()
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    reference_scheduler = lr_scheduler.StepLR(reference_optimizer, step_size=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    x, y = next(iter(make_regression()))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(reference_model(x), y)
    scaler.scale(loss).backward()
    scaler.step(reference_optimizer)
    scaler.update()
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        reference_scheduler.step()  # the false alarm this callback avoids

    for per_batch in (True, False):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
        callback = LearningRateScheduler(lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5), per_batch=per_batch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torchcallbacks.fit(
                model, make_regression(), optimizer=optimizer, loss=F.mse_loss, epochs=1, verbose=0,
                amp_dtype=torch.float16, scaler=scaler, callbacks=[callback],
            )
        assert scaler.get_scale() < 2.0**40  # steps were skipped
        assert lrs_of(optimizer) == pytest.approx([0.1 * 0.5 ** (4 if per_batch else 1)])


def test_verbose_message(capsys: pytest.CaptureFixture[str]) -> None:
    fit_lrs(LearningRateScheduler(lambda epoch: 0.5, verbose=1), epochs=1)
    assert "Epoch 1: LearningRateScheduler setting learning rate to 0.5." in capsys.readouterr().out


def test_hand_written_loop() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[float] = []
    record = LambdaCallback(on_train_batch_begin=lambda batch, logs: seen.append(optimizer.param_groups[0]["lr"]))
    scheduler = LearningRateScheduler(lambda step: 0.01 * (step + 1), per_batch=True)
    callbacks = CallbackList([scheduler, record], model=model, optimizer=optimizer)
    callbacks.on_train_begin()
    for epoch in range(2):
        callbacks.on_epoch_begin(epoch)
        train_epoch_by_hand(callbacks, model, optimizer, make_regression())
        logs: dict[str, Any] = {"loss": 0.0}
        callbacks.on_epoch_end(epoch, logs)
        assert logs["learning_rate"] == seen[-1]
    callbacks.on_train_end()
    assert seen == pytest.approx([0.01 * (i + 1) for i in range(8)])


def test_every_param_group_of_every_optimizer_is_logged() -> None:
    model = make_model()
    first = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].weight, "lr": 0.2}])
    second = torch.optim.SGD([model[2].bias], lr=0.4)
    step = lr_scheduler.StepLR(second, step_size=1, gamma=0.5)
    history = torchcallbacks.fit(
        model, make_regression(), optimizer=[first, second], loss=F.mse_loss, epochs=3, verbose=0,
        callbacks=[LearningRateScheduler(step)],
    )
    assert history.history["learning_rate"] == [0.1, 0.1, 0.1]
    assert history.history["learning_rate/group_1"] == [0.2, 0.2, 0.2]
    assert history.history["learning_rate/optimizer_1/group_0"] == [0.4, 0.2, 0.1]  # before each epoch-end step


def test_every_param_group_of_a_function_schedule_is_logged() -> None:
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}])
    history = torchcallbacks.fit(
        model, make_regression(), optimizer=optimizer, loss=F.mse_loss, epochs=2, verbose=0,
        callbacks=[LearningRateScheduler(lambda epoch, lr: lr * 10 if epoch == 1 else lr)],
    )
    assert history.history["learning_rate"] == [0.1, 1.0]
    assert history.history["learning_rate/group_1"] == [0.2, 2.0]


@pytest.mark.parametrize(
    ("per_batch", "torch_scheduler", "called"),
    [(False, False, set()), (False, True, set()), (True, False, {"on_train_batch_begin"}), (True, True, {"on_train_batch_end"})],
)
def test_only_the_batch_hook_a_per_batch_schedule_needs_is_called(per_batch: bool, torch_scheduler: bool, called: set) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if torch_scheduler else (lambda step, lr: lr * 0.5)
    callbacks = CallbackList([LearningRateScheduler(schedule, per_batch=per_batch)], model=model, optimizer=optimizer)
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    assert {h for h in ("on_train_batch_begin", "on_train_batch_end") if callbacks.has_hook(h)} == called
    callbacks.on_train_batch_begin(0)
    callbacks.on_train_batch_end(0, {"loss": 1.0})
    halved = per_batch or not torch_scheduler  # a function schedule applies at epoch begin too
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 if halved else 0.1)
