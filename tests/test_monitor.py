"""MonitorCallback: mode inference, declared directions, min_delta, missing monitor, resume mark."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression

import torchcallbacks
from torchcallbacks.callbacks.monitor import MonitorCallback, infer_mode
from torchcallbacks.checks import check_count, check_number


@pytest.mark.parametrize(
    ("monitor", "expected"),
    [
        ("loss", "min"),
        ("val_loss", "min"),
        ("val_mse", "min"),
        ("mean_absolute_error", "min"),
        ("hinge", "min"),
        ("accuracy", "max"),
        ("val_accuracy", "max"),
        ("acc", "max"),
        ("top5_accuracy", "max"),
        ("f1_score", "max"),
        ("val_auc", "max"),
        ("r2_score", "max"),
        ("iou", "max"),
    ],
)
def test_infer_mode_from_names(monitor: str, expected: str) -> None:
    assert infer_mode(monitor) == expected


def test_infer_mode_unknown_name_is_an_error_naming_the_monitor() -> None:
    with pytest.raises(ValueError, match="monitor='val_unknown'"):
        infer_mode("val_unknown")


def test_declared_direction_wins_over_the_name() -> None:
    assert infer_mode("val_agreement", {"agreement": "max"}) == "max"
    # a metric called "error" that is in fact a score: its declaration wins over the name rule
    assert infer_mode("error", {"error": "max"}) == "max"
    with pytest.raises(ValueError):
        infer_mode("val_score", {"score": None})


def agreement(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_pred.sign() == y.sign()).float().mean()


agreement.mode = "max"  # type: ignore[attr-defined]


class SumOfSquares:
    """A torchmetrics-style stateful metric that declares `higher_is_better` like torchmetrics does."""

    higher_is_better = False

    def __init__(self) -> None:
        self.total = torch.zeros(())

    def update(self, y_pred: torch.Tensor, y: torch.Tensor) -> None:
        self.total = self.total + ((y_pred - y) ** 2).sum()

    def compute(self) -> torch.Tensor:
        return self.total

    def reset(self) -> None:
        self.total = torch.zeros(())


def test_fit_passes_declared_directions_to_monitors() -> None:
    by_mode = torchcallbacks.EarlyStopping(monitor="val_agreement", patience=10)
    by_flag = torchcallbacks.EarlyStopping(monitor="val_sos", patience=10)
    loader = make_regression()
    model = make_model()
    torchcallbacks.fit(
        model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=F.mse_loss,
        metrics={"agreement": agreement, "sos": SumOfSquares()}, validation_data=loader, epochs=1, verbose=0,
        callbacks=[by_mode, by_flag],
    )
    assert by_mode.resolved_mode == "max"
    assert by_flag.resolved_mode == "min"


def test_min_delta_rule() -> None:
    low = MonitorCallback("val_loss", mode="min", min_delta=0.25)
    assert low._is_improvement(0.5, None)
    assert not low._is_improvement(0.75, 1.0)  # improved by exactly min_delta: not enough
    assert low._is_improvement(0.5, 1.0)
    high = MonitorCallback("val_accuracy", mode="auto", min_delta=-0.25)  # the sign is ignored
    assert high.min_delta == 0.25
    assert not high._is_improvement(1.25, 1.0)
    assert high._is_improvement(1.5, 1.0)
    assert not high._is_improvement(0.5, 1.0)


def test_unknown_mode_warns_and_becomes_auto() -> None:
    with pytest.warns(UserWarning, match="mode 'maximum' is unknown"):
        callback = MonitorCallback("val_accuracy", mode="maximum")
    assert callback.mode == "auto"
    assert callback.resolved_mode == "max"


def test_missing_monitor_warns_once_per_run_listing_the_keys() -> None:
    callback = MonitorCallback("val_loss")
    callback.on_train_begin()
    with pytest.warns(UserWarning, match="'val_loss' is not in the logs; available keys: accuracy, loss") as record:
        assert callback.get_monitor_value({"loss": 1.0, "accuracy": 0.5}) is None
        assert callback.get_monitor_value({"loss": 1.0, "accuracy": 0.5}) is None
    assert len(record) == 1
    callback.on_train_begin()  # a new run warns again
    with pytest.warns(UserWarning):
        callback.get_monitor_value({})


def test_missing_monitor_in_fit_warns_once_and_training_goes_on() -> None:
    stopper = torchcallbacks.EarlyStopping(monitor="val_missing", mode="min")
    model = make_model()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = torchcallbacks.fit(
            model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss=F.mse_loss, epochs=3, verbose=0, callbacks=[stopper],
        )
    messages = [str(w.message) for w in record if "val_missing" in str(w.message)]
    assert len(messages) == 1
    assert "available keys: loss" in messages[0]
    assert len(history.epoch) == 3


def test_monitor_value_reads_tensors() -> None:
    callback = MonitorCallback("loss")
    assert callback.get_monitor_value({"loss": torch.tensor(0.5)}) == 0.5


def test_argument_checks_name_the_argument() -> None:
    with pytest.raises(TypeError, match="monitor"):
        MonitorCallback("")
    with pytest.raises(TypeError, match="min_delta"):
        MonitorCallback("loss", min_delta="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="baseline"):
        MonitorCallback("loss", baseline=True)
    with pytest.raises(ValueError, match="patience"):
        check_count(-1, "patience")
    with pytest.raises(TypeError, match=r"patience: expected an integer >= 0, received float \(1.5\)"):
        check_count(1.5, "patience")
    assert check_number(torch.tensor(1.0).item(), "x") == 1.0


def _fit_with(callbacks: list, epochs: int = 3, validation: bool = True, **kwargs):
    model = make_model()
    return torchcallbacks.fit(
        model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=F.mse_loss,
        epochs=epochs, verbose=0, validation_data=make_regression(32) if validation else None,
        callbacks=callbacks, **kwargs,
    )


class _EpochsSeen(torchcallbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.epochs.append(epoch)


@pytest.mark.parametrize(
    "make",
    [
        lambda monitor: torchcallbacks.EarlyStopping(monitor=monitor),
        lambda monitor: torchcallbacks.ReduceLROnPlateau(monitor=monitor),
        lambda monitor, tmp="m.safetensors": torchcallbacks.ModelCheckpoint(tmp, monitor=monitor, save_best_only=True),
    ],
    ids=["EarlyStopping", "ReduceLROnPlateau", "ModelCheckpoint"],
)
@pytest.mark.parametrize("monitor", ["val_acc", "accuracy"])
def test_missing_monitor_with_auto_mode_raises_at_the_first_epoch_end(make, monitor, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    seen = _EpochsSeen()
    callback = make(monitor)
    with pytest.raises(ValueError, match=rf"{type(callback).__name__}: the monitored value '{monitor}' is not in "
                       r"the logs; available keys: (learning_rate, )?loss, val_loss\. "):
        _fit_with([seen, callback])
    assert seen.epochs == [0]
    assert not (tmp_path / "m.safetensors").exists()


def test_missing_monitor_with_an_explicit_mode_warns_and_training_goes_on() -> None:
    stopper = torchcallbacks.EarlyStopping(monitor="val_acc", mode="max", patience=0)
    with pytest.warns(UserWarning, match="'val_acc' is not in the logs; available keys: loss, val_loss") as record:
        history = _fit_with([stopper])
    assert len([w for w in record if "val_acc" in str(w.message)]) == 1
    assert history.epoch == [0, 1, 2]


def test_val_monitor_without_validation_warns_in_auto_mode() -> None:
    # Nothing validated this epoch (no validation data, or validation_freq): Keras 3 warns here too.
    stopper = torchcallbacks.EarlyStopping(monitor="val_loss", patience=0)
    with pytest.warns(UserWarning, match="'val_loss' is not in the logs; available keys: loss"):
        assert _fit_with([stopper], validation=False).epoch == [0, 1, 2]
    stopper = torchcallbacks.EarlyStopping(monitor="val_loss", patience=5)
    with pytest.warns(UserWarning, match="'val_loss' is not in the logs; available keys: loss"):
        assert _fit_with([stopper], epochs=4, validation_freq=2).epoch == [0, 1, 2, 3]
    assert stopper.best is not None  # the validated epochs were monitored


def test_batch_level_checkpoint_and_torch_scheduler_follow_the_same_rule(tmp_path) -> None:
    # Batch logs never hold val_ values: save_best_only on val_loss at batch level warns and saves (Keras 3).
    ckpt = torchcallbacks.ModelCheckpoint(str(tmp_path / "b.safetensors"), save_best_only=True, save_freq=2)
    with pytest.warns(UserWarning, match="'val_loss' is not in the logs"):
        _fit_with([ckpt], epochs=1)
    assert (tmp_path / "b.safetensors").exists()
    # A misspelt training value is an error at the first save.
    ckpt = torchcallbacks.ModelCheckpoint(str(tmp_path / "c.safetensors"), monitor="los", save_best_only=True, save_freq=2)
    with pytest.raises(ValueError, match="'los' is not in the logs; available keys: loss"):
        _fit_with([ckpt], epochs=1)
    # LearningRateScheduler feeding torch's ReduceLROnPlateau reads the monitor the same way.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ValueError, match="LearningRateScheduler: the monitored value 'val_los' is not in the logs"):
        torchcallbacks.fit(
            model, make_regression(), optimizer=optimizer, loss=F.mse_loss, epochs=2, verbose=0,
            validation_data=make_regression(32),
            callbacks=[torchcallbacks.LearningRateScheduler(plateau, monitor="val_los")],
        )
