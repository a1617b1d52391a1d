"""EarlyStopping: Keras' own sequences, the corrected baseline, restore, start_from_epoch, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression, run_epochs, train_epoch_by_hand

import torchcallbacks
from torchcallbacks import CallbackList, EarlyStopping, LambdaCallback

# Keras' test_early_stopping_patience: these losses stop at epoch max(patience, 1) + 2.
KERAS_LOSSES = [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]


def stopper_list(stopper: EarlyStopping, model: torch.nn.Module | None = None) -> CallbackList:
    return CallbackList([stopper], model=model or make_model())


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_keras_patience_sequence(patience: int) -> None:
    stopper = EarlyStopping(monitor="loss", patience=patience)
    run_epochs(stopper_list(stopper), KERAS_LOSSES)
    assert stopper.stopped_epoch == max(patience, 1) + 2
    assert stopper.best == 8.0
    assert stopper.best_epoch == 2


def test_never_stops_while_improving() -> None:
    stopper = EarlyStopping(monitor="loss", patience=0)
    epochs = run_epochs(stopper_list(stopper), [5.0, 4.0, 3.0, 2.0, 1.0])
    assert epochs == 5
    assert stopper.stopped_epoch == 0


def test_min_delta() -> None:
    # 0.75 improves on 1.0 by exactly 0.25: with min_delta=0.25 that is no improvement
    stopper = EarlyStopping(monitor="loss", patience=1, min_delta=0.25)
    assert run_epochs(stopper_list(stopper), [1.0, 0.75, 0.625, 0.5]) == 2
    assert stopper.stopped_epoch == 1
    stopper = EarlyStopping(monitor="loss", patience=1, min_delta=0.125)
    assert run_epochs(stopper_list(stopper), [1.0, 0.75, 0.625, 0.5]) == 3
    assert stopper.best == 0.75


def test_max_mode_inferred_for_accuracy() -> None:
    stopper = EarlyStopping(monitor="val_accuracy", patience=0)
    assert run_epochs(stopper_list(stopper), [0.5, 0.625, 0.5625, 0.9], monitor="val_accuracy") == 3
    assert stopper.best == 0.625
    assert stopper.resolved_mode == "max"


def test_explicit_mode_overrides_the_name() -> None:
    stopper = EarlyStopping(monitor="loss", patience=0, mode="max")
    assert run_epochs(stopper_list(stopper), [1.0, 2.0, 1.5]) == 3
    assert stopper.best == 2.0


def test_unknown_monitor_name_is_a_value_error_at_the_first_epoch_end() -> None:
    model = make_model()
    stopper = EarlyStopping(monitor="val_unknown")
    with pytest.raises(ValueError, match="val_unknown"):
        torchcallbacks.fit(
            model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss=F.mse_loss, metrics={"unknown": F.l1_loss}, validation_data=make_regression(),
            epochs=2, verbose=0, callbacks=[stopper],
        )


def test_missing_monitor_warns_once_and_does_not_stop() -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=0)
    with pytest.warns(UserWarning, match="available keys: loss") as record:
        epochs = run_epochs(stopper_list(stopper), [1.0, 2.0, 3.0], monitor="loss")
    assert epochs == 3
    assert len([w for w in record if "val_loss" in str(w.message)]) == 1


def test_baseline_never_reached_stops_after_patience_even_while_improving() -> None:
    # Keras never stops here: each epoch improves on the last, none reaches the baseline.
    stopper = EarlyStopping(monitor="loss", patience=3, baseline=0.5)
    assert run_epochs(stopper_list(stopper), [0.9, 0.8, 0.7, 0.6, 0.55, 0.52]) == 3
    assert stopper.stopped_epoch == 2
    assert stopper.best == 0.7


def test_baseline_reached_then_patience_counts_as_usual() -> None:
    stopper = EarlyStopping(monitor="loss", patience=2, baseline=0.5)
    assert run_epochs(stopper_list(stopper), [0.9, 0.4, 0.45, 0.46, 0.47, 0.3]) == 4
    assert stopper.stopped_epoch == 3
    assert (stopper.best, stopper.best_epoch) == (0.4, 1)


def test_start_from_epoch_ignores_the_warm_up() -> None:
    stopper = EarlyStopping(monitor="loss", patience=1, start_from_epoch=3)
    assert run_epochs(stopper_list(stopper), [5.0, 6.0, 7.0, 8.0, 1.0, 2.0, 3.0]) == 6
    assert stopper.stopped_epoch == 5
    assert (stopper.best, stopper.best_epoch) == (1.0, 4)
    plain = EarlyStopping(monitor="loss", patience=1)
    assert run_epochs(stopper_list(plain), [5.0, 6.0, 7.0, 8.0, 1.0, 2.0, 3.0]) == 2


def set_weights_to(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)


def weights_value(model: torch.nn.Module) -> float:
    values = {float(v) for p in model.parameters() for v in p.detach().flatten()}
    assert len(values) == 1
    return values.pop()


def run_with_weights(stopper: EarlyStopping, losses: list[float], stop_at: int | None = None) -> tuple[int, float]:
    """Keras' DummyModel test on a real module: the weights hold the epoch number."""
    model = make_model()
    callbacks = stopper_list(stopper, model)

    def on_epoch(epoch: int) -> None:
        set_weights_to(model, float(epoch))

    def other_stops(epoch: int, logs: dict) -> None:
        if epoch == stop_at:
            callbacks.stop_training = True

    if stop_at is not None:
        callbacks.append(LambdaCallback(on_epoch_end=other_stops))
    epochs = run_epochs(callbacks, losses, monitor="val_loss", on_epoch=on_epoch)
    return epochs, weights_value(model)


def test_restore_best_weights_at_stop() -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    epochs, weights = run_with_weights(stopper, [0.2, 0.15, 0.1, 0.11, 0.12])
    assert (epochs, weights) == (5, 2.0)
    assert stopper.stopped_epoch == 4


def test_restore_when_no_epoch_beats_the_baseline() -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=5, baseline=0.5, restore_best_weights=True)
    epochs, weights = run_with_weights(stopper, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73])
    assert (epochs, weights) == (5, 2.0)


def test_restore_when_another_callback_stops() -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=5, baseline=0.5, restore_best_weights=True)
    epochs, weights = run_with_weights(stopper, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], stop_at=3)
    assert (epochs, weights) == (4, 2.0)


def test_restore_at_natural_end() -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)
    epochs, weights = run_with_weights(stopper, [0.3, 0.1, 0.2])
    assert (epochs, weights) == (3, 1.0)
    assert stopper.stopped_epoch == 0


def test_no_restore_without_the_flag() -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    assert run_with_weights(stopper, [0.2, 0.15, 0.1, 0.11, 0.12]) == (5, 4.0)
    assert stopper.best_weights is None


def test_snapshot_is_a_cpu_copy_including_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    stopper = EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)
    callbacks = CallbackList([stopper], model=model)
    callbacks.on_train_begin()
    callbacks.on_epoch_end(0, {"loss": 1.0})
    assert stopper.best_weights is not None
    assert set(stopper.best_weights) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        snapshot = stopper.best_weights[key]
        assert snapshot.device.type == "cpu"
        assert snapshot.data_ptr() != tensor.data_ptr()
        assert torch.equal(snapshot, tensor)
    with torch.no_grad():
        model[1].running_mean.fill_(7.0)
        model[0].weight.fill_(7.0)
    callbacks.on_epoch_end(1, {"loss": 2.0})
    callbacks.on_train_end()
    assert torch.equal(model[1].running_mean, torch.zeros(3))
    assert not torch.equal(model[0].weight, torch.full((3, 3), 7.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_snapshot_of_a_cuda_model_lives_on_the_cpu() -> None:
    model = make_model().cuda()
    stopper = EarlyStopping(monitor="loss", restore_best_weights=True)
    callbacks = CallbackList([stopper], model=model)
    callbacks.on_train_begin()
    callbacks.on_epoch_end(0, {"loss": 1.0})
    assert stopper.best_weights is not None
    assert all(t.device.type == "cpu" for t in stopper.best_weights.values())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    set_weights_to(model, 3.0)
    callbacks.on_train_end()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def fit_with_scores(stopper: EarlyStopping, model: torch.nn.Module, seen: list, failing: bool) -> None:
    """fit where a callback before the stopper logs `val_score` 0.3, 0.1, 0.2, 0.25 (best: epoch 1)
    and appends the weights at each epoch end to `seen`; with `failing`, it raises at epoch 2."""
    scores = iter([0.3, 0.1, 0.2, 0.25])

    def score(epoch: int, logs: dict) -> None:
        logs["val_score"] = next(scores)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        if failing and epoch == 2:
            raise RuntimeError("boom")

    torchcallbacks.fit(
        model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.05), loss=F.mse_loss,
        epochs=4, verbose=0, callbacks=[LambdaCallback(on_epoch_end=score), stopper],
    )


@pytest.mark.parametrize("failing", [False, True])
def test_restore_in_fit_at_natural_end_and_after_an_exception(failing: bool) -> None:
    stopper = EarlyStopping(monitor="val_score", mode="min", patience=10, restore_best_weights=True)
    model = make_model()
    seen: list[dict[str, torch.Tensor]] = []
    if failing:
        with pytest.raises(RuntimeError, match="boom"):
            fit_with_scores(stopper, model, seen, failing)
    else:
        fit_with_scores(stopper, model, seen, failing)
    assert stopper.best_epoch == 1
    assert len(seen) == (3 if failing else 4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, seen[1][key])


def test_state_is_reset_for_a_new_run() -> None:
    stopper = EarlyStopping(monitor="loss", patience=1)
    callbacks = stopper_list(stopper)
    run_epochs(callbacks, [1.0, 2.0, 3.0])
    assert stopper.stopped_epoch == 1
    callbacks.stop_training = False
    assert run_epochs(callbacks, [5.0, 4.0, 3.0]) == 3
    assert (stopper.stopped_epoch, stopper.best, stopper.wait) == (0, 3.0, 0)


@pytest.mark.parametrize("load_before_train_begin", [True, False])
def test_state_dict_round_trip_continues_identically(load_before_train_begin: bool) -> None:
    losses = [1.0, 0.8, 0.7, 0.75, 0.74, 0.69, 0.7, 0.71, 0.72, 0.73]
    full = EarlyStopping(monitor="loss", patience=3, baseline=0.72)
    full_epochs = run_epochs(stopper_list(full), losses)

    first = EarlyStopping(monitor="loss", patience=3, baseline=0.72)
    run_epochs(stopper_list(first), losses[:4], train_end=False)
    state = json.loads(json.dumps(first.state_dict()))

    second = EarlyStopping(monitor="loss", patience=3, baseline=0.72)
    callbacks = stopper_list(second)
    if load_before_train_begin:
        second.load_state_dict(state)
        callbacks.on_train_begin()
    else:  # a restoring callback later in the list loads it during on_train_begin
        callbacks.on_train_begin()
        second.load_state_dict(state)
    epochs = 4
    for epoch in range(4, len(losses)):
        callbacks.on_epoch_begin(epoch)
        callbacks.on_epoch_end(epoch, {"loss": losses[epoch]})
        epochs += 1
        if callbacks.stop_training:
            break
    callbacks.on_train_end()
    assert epochs == full_epochs == 9
    assert second.state_dict() == full.state_dict()
    # the next run of the same instance starts fresh again
    callbacks.stop_training = False
    run_epochs(callbacks, [1.0])
    assert second.best == 1.0


def test_hand_written_training_loop_with_real_training() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    stopper = EarlyStopping(monitor="val_loss", patience=0, restore_best_weights=True)
    callbacks = CallbackList([stopper], model=model, optimizer=optimizer, epochs=50)
    loader = make_regression()
    callbacks.on_train_begin()
    epochs = 0
    for epoch in range(50):
        callbacks.on_epoch_begin(epoch)
        loss = train_epoch_by_hand(callbacks, model, optimizer, loader)
        # a validation value that gets worse from epoch 3 on: the stop must come at epoch 3
        val_loss = torch.tensor(1.0 / (epoch + 1) if epoch < 3 else 1.0)
        callbacks.on_epoch_end(epoch, {"loss": loss, "val_loss": val_loss})
        epochs += 1
        if callbacks.stop_training:
            break
    callbacks.on_train_end()
    assert epochs == 4
    assert stopper.stopped_epoch == 3
    assert stopper.best_epoch == 2


def test_verbose_messages(capsys: pytest.CaptureFixture[str]) -> None:
    stopper = EarlyStopping(monitor="loss", patience=1, verbose=1, restore_best_weights=True)
    run_epochs(stopper_list(stopper), [1.0, 0.5, 0.75, 0.8])
    out = capsys.readouterr().out
    assert "Epoch 3: early stopping" in out
    assert "Restoring model weights from the end of the best epoch: 2." in out


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)
    with pytest.raises(TypeError, match="start_from_epoch"):
        EarlyStopping(start_from_epoch=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="baseline"):
        EarlyStopping(baseline="0.5")  # type: ignore[arg-type]
