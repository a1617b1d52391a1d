"""ReduceLROnPlateau: Keras' cases, per-group rates, cooldown, min_lr, logs, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression, run_epochs

import torchcallbacks
from torchcallbacks import CallbackList, LambdaCallback, ReduceLROnPlateau


def fit_with(reduce_lr: ReduceLROnPlateau, epochs: int, lr: float = 0.1) -> tuple[torch.optim.Optimizer, dict]:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = torchcallbacks.fit(
        model, make_regression(), optimizer=optimizer, loss=F.mse_loss, validation_data=make_regression(n=32),
        epochs=epochs, verbose=0, callbacks=[reduce_lr],
    )
    return optimizer, history.history


# Keras' reduce_lr_on_plateau_test: with min_delta=100 no epoch after the first counts as improved.
def test_keras_reduces_lr_with_fit() -> None:
    optimizer, history = fit_with(ReduceLROnPlateau(patience=1, factor=0.1, monitor="val_loss", min_delta=100), 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert history["learning_rate"] == pytest.approx([0.1, 0.1])  # the lr each epoch ran with


def test_keras_honors_min_lr() -> None:
    reduce_lr = ReduceLROnPlateau(patience=1, factor=0.1, monitor="val_loss", min_delta=10, min_lr=0.005)
    optimizer, history = fit_with(reduce_lr, 4)
    assert optimizer.param_groups[0]["lr"] == 0.005
    assert history["learning_rate"] == pytest.approx([0.1, 0.1, 0.01, 0.005])


def test_keras_cooldown() -> None:
    reduce_lr = ReduceLROnPlateau(patience=1, factor=0.1, monitor="val_loss", min_delta=100, cooldown=2)
    optimizer, _ = fit_with(reduce_lr, 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # reduced at epochs 1 and 3


def test_keras_verbose_message(capsys: pytest.CaptureFixture[str]) -> None:
    fit_with(ReduceLROnPlateau(patience=1, factor=0.1, monitor="val_loss", min_delta=100, verbose=1), 2)
    assert "Epoch 2: ReduceLROnPlateau reducing learning rate to 0.01." in capsys.readouterr().out


def test_keras_state_reset_across_runs() -> None:
    reduce_lr = ReduceLROnPlateau(patience=1, factor=0.1, monitor="loss", min_delta=0, cooldown=2)
    CallbackList([reduce_lr], model=make_model())
    reduce_lr.on_train_begin()
    reduce_lr.best, reduce_lr.wait, reduce_lr.cooldown_counter = 0.5, 3, 2
    reduce_lr.on_train_begin()
    assert (reduce_lr.best, reduce_lr.wait, reduce_lr.cooldown_counter) == (None, 0, 0)


def plateau_list(reduce_lr: ReduceLROnPlateau, lrs: tuple[float, ...] = (0.1,)) -> tuple[CallbackList, torch.optim.Optimizer]:
    model = make_model()
    params = list(model.parameters())
    groups = [{"params": params[i :: len(lrs)], "lr": lr} for i, lr in enumerate(lrs)]
    optimizer = torch.optim.SGD(groups)
    return CallbackList([reduce_lr], model=model, optimizer=optimizer), optimizer


def lrs_of(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


@pytest.mark.parametrize(("patience", "reduced_after"), [(0, 1), (1, 1), (3, 3)])
def test_patience(patience: int, reduced_after: int) -> None:
    reduce_lr = ReduceLROnPlateau(monitor="loss", patience=patience, factor=0.5)
    callbacks, _ = plateau_list(reduce_lr)
    seen: list[float] = []
    callbacks.append(LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs["learning_rate"])))
    run_epochs(callbacks, [1.0] * (reduced_after + 2))
    # the epoch that triggers the reduction is epoch `reduced_after`; the next one runs at half the rate
    assert seen[reduced_after] == 0.1
    assert seen[reduced_after + 1] == 0.05


def test_improvement_resets_wait_and_min_delta_counts() -> None:
    reduce_lr = ReduceLROnPlateau(monitor="loss", patience=2, factor=0.5, min_delta=0.25)
    callbacks, optimizer = plateau_list(reduce_lr)
    run_epochs(callbacks, [2.0, 1.0, 0.875, 0.5, 0.375])  # 0.875 and 0.375 improve by < 0.25
    assert lrs_of(optimizer) == [0.1]
    assert reduce_lr.wait == 1
    run_epochs(callbacks, [2.0, 1.0, 0.875, 0.75])
    assert lrs_of(optimizer) == [0.05]


def test_every_parameter_group_keeps_its_own_rate_and_its_min_lr() -> None:
    reduce_lr = ReduceLROnPlateau(monitor="loss", patience=0, factor=0.1, min_lr=0.005)
    callbacks, optimizer = plateau_list(reduce_lr, (0.1, 0.01))
    run_epochs(callbacks, [1.0, 1.0])
    assert lrs_of(optimizer) == pytest.approx([0.01, 0.005])
    run_epochs(callbacks, [1.0, 1.0])  # group 1 is at min_lr already: only group 0 moves
    assert lrs_of(optimizer) == pytest.approx([0.005, 0.005])


def test_min_lr_per_group() -> None:
    reduce_lr = ReduceLROnPlateau(monitor="loss", patience=0, factor=0.1, min_lr=[0.05, 0.0])
    callbacks, optimizer = plateau_list(reduce_lr, (0.1, 0.01))
    run_epochs(callbacks, [1.0, 1.0, 1.0])
    assert lrs_of(optimizer) == pytest.approx([0.05, 0.0001])
    wrong = ReduceLROnPlateau(monitor="loss", patience=0, min_lr=[0.0, 0.0, 0.0])
    callbacks, _ = plateau_list(wrong, (0.1, 0.01))
    with pytest.raises(ValueError, match="min_lr: 3 values given, but the optimizer has 2 parameter groups"):
        run_epochs(callbacks, [1.0, 1.0])


def test_at_min_lr_nothing_changes_and_no_cooldown_starts() -> None:
    reduce_lr = ReduceLROnPlateau(monitor="loss", patience=1, factor=0.5, min_lr=0.1, cooldown=5)
    callbacks, optimizer = plateau_list(reduce_lr)
    run_epochs(callbacks, [1.0, 1.0, 1.0, 1.0])
    assert lrs_of(optimizer) == [0.1]
    assert reduce_lr.cooldown_counter == 0
    assert reduce_lr.wait == 3


def test_cooldown_holds_wait_at_zero() -> None:
    reduce_lr = ReduceLROnPlateau(monitor="loss", patience=1, factor=0.5, cooldown=2)
    callbacks, _ = plateau_list(reduce_lr)
    seen: list[float] = []
    callbacks.append(LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs["learning_rate"])))
    run_epochs(callbacks, [1.0] * 7)
    # reductions at epochs 1, 3 and 5: each cooldown epoch counts down first, so with cooldown=2 and
    # patience=1 the rate falls every other epoch (Keras' test_cooldown)
    assert seen == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])


def test_max_mode_for_accuracy() -> None:
    reduce_lr = ReduceLROnPlateau(monitor="val_accuracy", patience=0, factor=0.5)
    callbacks, optimizer = plateau_list(reduce_lr)
    run_epochs(callbacks, [0.5, 0.75, 0.875], monitor="val_accuracy")
    assert lrs_of(optimizer) == [0.1]
    run_epochs(callbacks, [0.5, 0.75, 0.25], monitor="val_accuracy")
    assert lrs_of(optimizer) == [0.05]


def test_missing_monitor_warns_once_and_keeps_the_rate() -> None:
    reduce_lr = ReduceLROnPlateau(monitor="val_loss", patience=0)
    callbacks, optimizer = plateau_list(reduce_lr)
    with pytest.warns(UserWarning, match="'val_loss' is not in the logs") as record:
        run_epochs(callbacks, [1.0, 1.0, 1.0], monitor="loss")
    assert len([w for w in record if "val_loss" in str(w.message)]) == 1
    assert lrs_of(optimizer) == [0.1]


def test_tensor_learning_rate_stays_a_tensor() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.1), foreach=False)
    reduce_lr = ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5)
    run_epochs(CallbackList([reduce_lr], model=model, optimizer=optimizer), [1.0, 1.0])
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    assert float(lr) == pytest.approx(0.05)


@pytest.mark.parametrize("load_before_train_begin", [True, False])
def test_state_dict_round_trip_continues_identically(load_before_train_begin: bool) -> None:
    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.8, 0.85, 0.86, 0.87, 0.88]

    def make() -> ReduceLROnPlateau:
        return ReduceLROnPlateau(monitor="loss", patience=2, factor=0.5, cooldown=1)

    full = make()
    full_callbacks, full_opt = plateau_list(full)
    run_epochs(full_callbacks, losses)

    first = make()
    first_callbacks, first_opt = plateau_list(first)
    run_epochs(first_callbacks, losses[:4], train_end=False)
    state = json.loads(json.dumps(first.state_dict()))
    optimizer_state = first_opt.state_dict()

    second = make()
    callbacks, optimizer = plateau_list(second)
    optimizer.load_state_dict(optimizer_state)
    if load_before_train_begin:
        second.load_state_dict(state)
        callbacks.on_train_begin()
    else:
        callbacks.on_train_begin()
        second.load_state_dict(state)
    for epoch in range(4, len(losses)):
        callbacks.on_epoch_begin(epoch)
        callbacks.on_epoch_end(epoch, {"loss": losses[epoch]})
    callbacks.on_train_end()
    assert second.state_dict() == full.state_dict()
    assert lrs_of(optimizer) == lrs_of(full_opt) == [0.0125]


def test_hand_written_loop_needs_an_optimizer() -> None:
    callbacks = CallbackList([ReduceLROnPlateau(monitor="loss")], model=make_model())
    with pytest.raises(TypeError, match=r"pass it to fit\(optimizer=\.\.\.\) or to CallbackList"):
        run_epochs(callbacks, [1.0])


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="factor"):
        ReduceLROnPlateau(factor=1.0)
    with pytest.raises(ValueError, match="factor"):
        ReduceLROnPlateau(factor=-0.5)
    with pytest.raises(TypeError, match="epsilon"):
        ReduceLROnPlateau(epsilon=1e-4)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="cooldown"):
        ReduceLROnPlateau(cooldown=-1)
    with pytest.raises(ValueError, match="min_lr"):
        ReduceLROnPlateau(min_lr=-1.0)


def test_every_param_group_of_every_optimizer_is_logged_in_history_and_csv(tmp_path) -> None:
    import csv

    model = make_model()
    first = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].weight, "lr": 0.2}])
    second = torch.optim.SGD([model[2].bias], lr=0.4)
    never_better = iter([1.0, 2.0, 3.0])
    path = tmp_path / "log.csv"
    history = torchcallbacks.fit(
        model, make_regression(), optimizer=[first, second], loss=F.mse_loss, epochs=3, verbose=0,
        callbacks=[
            LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(watched=next(never_better))),
            # acts on the second optimizer only; logs every optimizer's groups, named by their place in the loop
            ReduceLROnPlateau(monitor="watched", mode="min", patience=1, factor=0.5, optimizer=second),
            torchcallbacks.CSVLogger(path),
        ],
    )
    assert history.history["learning_rate"] == [0.1, 0.1, 0.1]
    assert history.history["learning_rate/group_1"] == [0.2, 0.2, 0.2]
    assert history.history["learning_rate/optimizer_1/group_0"] == [0.4, 0.4, 0.2]  # the rate of each epoch
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [float(row["learning_rate/optimizer_1/group_0"]) for row in rows] == [0.4, 0.4, 0.2]
    assert [float(row["learning_rate/group_1"]) for row in rows] == [0.2, 0.2, 0.2]
