"""Metrics that return a dict (a callable, or torchmetrics' MetricCollection) log one value per key."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import torchcallbacks
from torchcallbacks.logs import to_floats
from torchcallbacks.training.metrics import MetricTracker, flatten_metric_value, metric_directions

torchmetrics = pytest.importorskip("torchmetrics")


def errors(y_pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """A callable metric returning a dict: mean absolute error, and a constant that never improves."""
    return {"abs_error": (y_pred - y).abs().mean(), "stuck": torch.tensor(1.0)}


def _fit(tmp_path: Path, metrics: dict, callbacks: list, epochs: int = 3, x=None, validation_data=None):
    model = make_model()
    return torchcallbacks.fit(
        model, x if x is not None else make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss=F.mse_loss, metrics=metrics, epochs=epochs, verbose=0, callbacks=callbacks,
        validation_data=validation_data if validation_data is not None else make_regression(32),
    )


def _scalar_tags(path: Path) -> set[str]:
    return set(EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload().Tags()["scalars"])


def test_a_callable_returning_a_dict_logs_each_key(tmp_path: Path) -> None:
    csv_path = tmp_path / "log.csv"
    history = _fit(
        tmp_path, {"errors": errors},
        [torchcallbacks.CSVLogger(csv_path), torchcallbacks.TensorBoard(tmp_path / "tb", write_graph=False)],
        epochs=2,
    )
    for name in ("abs_error", "stuck", "val_abs_error", "val_stuck"):
        assert len(history.history[name]) == 2 and all(isinstance(v, float) for v in history.history[name])
    assert "errors" not in history.history and "val_errors" not in history.history
    assert history.history["stuck"] == [1.0, 1.0]
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert {"abs_error", "stuck", "val_abs_error", "val_stuck"} <= set(rows[0])
    assert [float(row["val_abs_error"]) for row in rows] == pytest.approx(history.history["val_abs_error"])
    assert {"epoch_abs_error", "epoch_stuck"} <= _scalar_tags(tmp_path / "tb" / "train")
    assert {"epoch_abs_error", "epoch_stuck"} <= _scalar_tags(tmp_path / "tb" / "validation")


def test_the_running_mean_of_each_key_is_weighted_by_batch_size() -> None:
    tracker = MetricTracker({"errors": errors})
    tracker.update({"loss": torch.tensor(0.0)}, torch.zeros(3), torch.ones(3), weight=3)
    tracker.update({"loss": torch.tensor(0.0)}, torch.zeros(1), torch.full((1,), 5.0), weight=1)
    assert to_floats(tracker.result()) == {"loss": 0.0, "abs_error": 2.0, "stuck": 1.0}
    assert to_floats(tracker.batch_logs())["abs_error"] == 2.0
    assert set(tracker.state_dict()["means"]) == {"loss", "abs_error", "stuck"}


def test_early_stopping_monitors_a_flattened_key(tmp_path: Path) -> None:
    stopper = torchcallbacks.EarlyStopping(monitor="val_stuck", mode="min", patience=1)
    history = _fit(tmp_path, {"errors": errors}, [stopper], epochs=10)
    assert len(history.history["val_stuck"]) == 2  # never better than the first epoch: stops after one more
    assert stopper.stopped_epoch == 1


def _collection() -> torchmetrics.MetricCollection:
    return torchmetrics.MetricCollection(
        {"accuracy": torchmetrics.Accuracy(task="binary"), "precision": torchmetrics.Precision(task="binary")}
    )


def _classification(n: int, seed: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_a_metric_collection_logs_each_member(tmp_path: Path) -> None:
    csv_path = tmp_path / "log.csv"
    stopper = torchcallbacks.EarlyStopping(monitor="val_accuracy", patience=100)  # mode auto: "accuracy" is max
    history = _fit(
        tmp_path, {"scores": _collection()},
        [stopper, torchcallbacks.CSVLogger(csv_path), torchcallbacks.TensorBoard(tmp_path / "tb", write_graph=False)],
        epochs=2, x=_classification(64, 1), validation_data=_classification(32, 2),
    )
    for name in ("accuracy", "precision", "val_accuracy", "val_precision"):
        assert len(history.history[name]) == 2 and all(0.0 <= v <= 1.0 for v in history.history[name])
    assert stopper.best == max(history.history["val_accuracy"])
    with open(csv_path, newline="") as file:
        header = next(csv.reader(file))
    assert {"accuracy", "precision", "val_accuracy", "val_precision"} <= set(header) and "scores" not in header
    assert {"epoch_accuracy", "epoch_precision"} <= _scalar_tags(tmp_path / "tb" / "validation")
    evaluated = torchcallbacks.evaluate(
        make_model(), _classification(32, 2), loss=F.mse_loss, metrics={"scores": _collection()}, return_dict=True,
    )
    assert {"loss", "accuracy", "precision"} == set(evaluated)


def test_a_metric_collection_state_survives_a_checkpoint() -> None:
    y_pred, y = torch.rand(8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    tracker = MetricTracker({"scores": _collection()})
    tracker.update({"loss": torch.tensor(1.0)}, y_pred, y, weight=8)
    restored = MetricTracker({"scores": _collection()})
    restored.load_state_dict(tracker.state_dict())
    for t in (tracker, restored):
        t.update({"loss": torch.tensor(1.0)}, y_pred, 1 - y, weight=8)
    assert to_floats(restored.result()) == to_floats(tracker.result())


def test_directions_of_a_collection_members() -> None:
    directions = metric_directions({"scores": _collection(), "errors": errors})
    assert directions == {"scores": None, "accuracy": "max", "precision": "max", "errors": None}


def test_two_metrics_logging_one_name_is_an_error() -> None:
    tracker = MetricTracker({"errors": errors, "abs_error": lambda y_pred, y: (y_pred - y).abs().mean()})
    with pytest.raises(ValueError, match="'abs_error'.*'errors'.*both log 'abs_error'"):
        tracker.update({"loss": torch.tensor(0.0)}, torch.zeros(2), torch.ones(2), weight=2)
    loss_key = MetricTracker({"bad": lambda y_pred, y: {"loss": y_pred.mean()}})
    with pytest.raises(ValueError, match="both log 'loss'"):
        loss_key.update({"loss": torch.tensor(0.0)}, torch.zeros(2), torch.ones(2), weight=2)


def test_flatten_rejects_nested_and_non_string_keys() -> None:
    with pytest.raises(TypeError, match="nested"):
        flatten_metric_value("m", {"a": {"b": 1.0}})
    with pytest.raises(TypeError, match="not a string"):
        flatten_metric_value("m", {1: 1.0})
