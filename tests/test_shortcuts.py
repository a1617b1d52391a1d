"""Keras' string shortcuts (`loss="mse"`, `metrics=["accuracy"]`, `optimizer="adam"`) compute Keras 3's
numbers, log Keras' names and build torch's optimizers with Keras' defaults.

The KERAS_* constants are Keras' own results on the arrays of tests/data/keras_reference.py, printed by
that script (run as its docstring says; it is not run here: Keras is not a dependency):

    KERAS_BACKEND=torch python tests/data/keras_reference.py  (Keras 3.15.1, torch 2.13.0 CPU)
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import torchcallbacks
from torchcallbacks.training.keras_losses import accuracy_kind
from torchcallbacks.training.metrics import metric_directions, normalize_metrics
from torchcallbacks.training.shortcuts import resolve_loss, resolve_metric

_spec = importlib.util.spec_from_file_location("keras_reference", Path(__file__).parent / "data" / "keras_reference.py")
assert _spec is not None and _spec.loader is not None
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

# Keras 3.15.1, backend torch, printed by tests/data/keras_reference.py
KERAS_LOSSES = [  # (name, mean, weighted mean)
    ('mse', 0.45104166865348816, 0.25333333015441895),
    ('mean_squared_error', 0.45104166865348816, 0.25333333015441895),
    ('mae', 0.4791666865348816, 0.32500001788139343),
    ('mean_absolute_error', 0.4791666865348816, 0.32500001788139343),
    ('mape', 25000034.0, 12500027.0),
    ('mape', 66.6390609741211, 47.133182525634766),
    ('msle', 0.06649425625801086, 0.03745170682668686),
    ('huber', 0.19177083671092987, 0.10979167371988297),
    ('log_cosh', 0.17423716187477112, 0.10064317286014557),
    ('poisson', 0.7414358854293823, 0.6076979637145996),
    ('cosine_similarity', -0.982426643371582, -0.861244797706604),
    ('MeanSquaredError', 0.45104166865348816, 0.25333333015441895),
    ('binary_crossentropy', 0.322990357875824, 0.5148724913597107),
    ('categorical_crossentropy', 4.393345355987549, 8.257650375366211),
    ('sparse_categorical_crossentropy', 4.393345355987549, 8.257650375366211),
    ('kl_divergence', 4.347762107849121, 8.234856605529785),
    ('crossentropy', 4.393345355987549, 8.257650375366211),
    ('hinge', 0.762499988079071, 0.8374999761581421),
    ('hinge', 0.762499988079071, 0.8374999761581421),
    ('squared_hinge', 1.0187499523162842, 1.2487499713897705),
    ('categorical_hinge', 0.824999988079071, 1.037500023841858),
]
KERAS_METRICS = [  # (name, Keras class, logged name, value)
    ('accuracy', 'BinaryAccuracy', 'accuracy', 0.8333333134651184),
    ('accuracy', 'BinaryAccuracy', 'accuracy', 0.8333333134651184),
    ('accuracy', 'SparseCategoricalAccuracy', 'accuracy', 0.75),
    ('accuracy', 'SparseCategoricalAccuracy', 'accuracy', 0.75),
    ('accuracy', 'CategoricalAccuracy', 'accuracy', 0.75),
    ('acc', 'SparseCategoricalAccuracy', 'acc', 0.75),
    ('binary_accuracy', 'BinaryAccuracy', 'binary_accuracy', 0.8333333134651184),
    ('categorical_accuracy', 'CategoricalAccuracy', 'categorical_accuracy', 0.75),
    ('sparse_categorical_accuracy', 'SparseCategoricalAccuracy', 'sparse_categorical_accuracy', 0.75),
    ('mae', 'MeanAbsoluteError', 'mae', 0.4791666865348816),
    ('mse', 'MeanSquaredError', 'mse', 0.45104166865348816),
    ('mape', 'MeanAbsolutePercentageError', 'mape', 25000034.0),
    ('cosine_similarity', 'CosineSimilarity', 'cosine_similarity', 0.982426643371582),
    ('binary_crossentropy', 'BinaryCrossentropy', 'binary_crossentropy', 0.322990357875824),
    ('categorical_crossentropy', 'CategoricalCrossentropy', 'categorical_crossentropy', 4.393345355987549),
    ('sparse_categorical_crossentropy', 'SparseCategoricalCrossentropy', 'sparse_categorical_crossentropy', 4.393345355987549),
    ('kl_divergence', 'KLDivergence', 'kl_divergence', 4.347762107849121),
    ('hinge', 'Hinge', 'hinge', 0.762499988079071),
    ('log_cosh_error', 'LogCoshError', 'log_cosh_error', 0.17423716187477112),
    ('MeanAbsoluteError', 'MeanAbsoluteError', 'MeanAbsoluteError', 0.4791666865348816),
    ('ACC', 'BinaryAccuracy', 'ACC', 0.8333333134651184),
    ('auc', 'AUC', 'auc', 0.7777777314186096),
]
KERAS_HISTORY_KEYS = ['acc', 'accuracy', 'loss', 'mae', 'val_acc', 'val_accuracy', 'val_loss', 'val_mae']
KERAS_OPTIMIZERS = {'sgd': {'learning_rate': 0.009999999776482582, 'momentum': 0.0, 'nesterov': False, 'weight_decay': None}, 'adam': {'learning_rate': 0.0010000000474974513, 'beta_1': 0.9, 'beta_2': 0.999, 'epsilon': 1e-07, 'amsgrad': False, 'weight_decay': None}, 'adamw': {'learning_rate': 0.0010000000474974513, 'beta_1': 0.9, 'beta_2': 0.999, 'epsilon': 1e-07, 'amsgrad': False, 'weight_decay': 0.004}, 'rmsprop': {'learning_rate': 0.0010000000474974513, 'momentum': 0.0, 'epsilon': 1e-07, 'rho': 0.9, 'centered': False, 'weight_decay': None}, 'Adam': {'learning_rate': 0.0010000000474974513, 'beta_1': 0.9, 'beta_2': 0.999, 'epsilon': 1e-07, 'amsgrad': False, 'weight_decay': None}, 'RMSprop': {'learning_rate': 0.0010000000474974513, 'momentum': 0.0, 'epsilon': 1e-07, 'rho': 0.9, 'centered': False, 'weight_decay': None}}

TOLERANCE = {"rel": 1e-6, "abs": 1e-6}
#: Keras' class for "accuracy" -> our per-sample function of the same name.
KERAS_ACCURACIES = {
    "BinaryAccuracy": "binary_accuracy",
    "CategoricalAccuracy": "categorical_accuracy",
    "SparseCategoricalAccuracy": "sparse_categorical_accuracy",
}


def tensor(values: list) -> torch.Tensor:
    """float32 for floating values (Keras' floatx), int64 for class indices."""
    result = torch.tensor(values)
    return result.float() if result.is_floating_point() else result


def zero_loss(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss for evaluating metrics alone."""
    return y_pred.sum() * 0.0


def test_the_cases_are_the_ones_keras_computed() -> None:
    assert [case[0] for case in reference.LOSS_CASES] == [row[0] for row in KERAS_LOSSES]
    assert [case[0] for case in reference.METRIC_CASES] == [row[0] for row in KERAS_METRICS]


@pytest.mark.parametrize(("case", "expected"), list(zip(reference.LOSS_CASES, KERAS_LOSSES, strict=True)), ids=lambda c: c[0])
def test_each_loss_is_kerass(case: tuple, expected: tuple) -> None:
    name, y_true, y_pred, weight = case
    _, plain, weighted = expected
    x, y = tensor(y_pred), tensor(y_true)
    # through evaluate, the whole batch at once: the loss as fit and evaluate compute it
    got = torchcallbacks.evaluate(torch.nn.Identity(), x, y, loss=name, batch_size=len(x), verbose=0)
    assert got == pytest.approx(plain, **TOLERANCE)
    got = torchcallbacks.evaluate(
        torch.nn.Identity(), x, y, loss=name, sample_weight=tensor(weight), batch_size=len(x), verbose=0
    )
    assert got == pytest.approx(weighted, **TOLERANCE)


@pytest.mark.parametrize(("case", "expected"), list(zip(reference.METRIC_CASES, KERAS_METRICS, strict=True)), ids=lambda c: c[0])
def test_each_metric_is_kerass_and_logged_under_kerass_name(case: tuple, expected: tuple) -> None:
    name, y_true, y_pred = case
    _, _, logged, value = expected
    x, y = tensor(y_pred), tensor(y_true)
    # two batches: the epoch's value is the mean over samples, as Keras' mean metrics average
    logs = torchcallbacks.evaluate(
        torch.nn.Identity(), x, y, loss=zero_loss, metrics=[name], batch_size=len(x) // 2, verbose=0,
        return_dict=True,
    )
    assert set(logs) == {"loss", logged}
    if name != "auc":  # AUC is not a mean over batches: computed from all the samples at once
        assert logs[logged] == pytest.approx(value, **TOLERANCE)
    metric = resolve_metric(name)
    if hasattr(metric, "update"):
        metric.update(x, y)
        assert float(metric.compute()) == pytest.approx(value, **TOLERANCE)
    else:
        assert float(metric(x, y)) == pytest.approx(value, **TOLERANCE)


@pytest.mark.parametrize(
    ("case", "expected"),
    [(c, e) for c, e in zip(reference.METRIC_CASES, KERAS_METRICS, strict=True) if c[0].lower() in ("accuracy", "acc")],
    ids=lambda c: f"{c[0]}-{torch.tensor(c[1]).ndim}d-targets-{torch.tensor(c[2]).shape[-1]}-columns"
    if isinstance(c[1], list) else c[1],
)
def test_accuracy_is_resolved_from_the_shapes_as_keras_does(case: tuple, expected: tuple) -> None:
    name, y_true, y_pred = case
    keras_class = expected[1]
    metric = resolve_metric(name)
    metric(tensor(y_pred), tensor(y_true))
    assert metric.per_sample.chosen.__name__ == KERAS_ACCURACIES[keras_class]


def test_accuracy_of_each_kind() -> None:
    binary, binary_y = torch.tensor([[0.9], [0.5], [0.2]]), torch.tensor([[1.0], [1.0], [0.0]])
    assert accuracy_kind(binary, binary_y) == "binary"
    assert float(resolve_metric("accuracy")(binary, binary_y)) == pytest.approx(2 / 3)  # 0.5 is not > 0.5
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy_kind(scores, torch.tensor([1, 1, 1])) == "sparse_categorical"
    assert float(resolve_metric("accuracy")(scores, torch.tensor([1, 1, 1]))) == pytest.approx(2 / 3)
    one_hot = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert accuracy_kind(scores, one_hot) == "categorical"
    assert float(resolve_metric("Accuracy")(scores, one_hot)) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"metrics: 'accuracy'.*shape \(3,\).*binary_accuracy"):
        resolve_metric("accuracy")(torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1.0, 0.0, 1.0]))


def _classifier() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.randn(64, 3)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    return torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Sigmoid()), x, y


def test_history_has_kerass_logged_names() -> None:
    model, x, y = _classifier()
    history = torchcallbacks.fit(
        model, x, y, optimizer="adam", loss="binary_crossentropy", metrics=["accuracy", "acc", "mae"],
        validation_split=0.25, epochs=1, verbose=0,
    )
    assert sorted(history.history) == KERAS_HISTORY_KEYS


def test_a_dict_names_a_keras_metric_by_its_key() -> None:
    model, x, y = _classifier()
    history = torchcallbacks.fit(
        model, x, y, optimizer="sgd", loss="bce", metrics={"hit_rate": "binary_accuracy"}, epochs=1, verbose=0,
    )
    assert sorted(history.history) == ["hit_rate", "loss"]


def test_keras_metrics_declare_their_direction() -> None:
    directions = metric_directions(normalize_metrics(["accuracy", "mae", "cosine_similarity", "auc", "hinge"]))
    assert directions == {"accuracy": "max", "mae": "min", "cosine_similarity": "max", "auc": "max", "hinge": "min"}


# (name, torch class, the torch arguments that hold each Keras default: torch name -> Keras config key)
OPTIMIZER_CASES = [
    ("sgd", torch.optim.SGD, {"lr": "learning_rate", "momentum": "momentum", "nesterov": "nesterov"}),
    ("adam", torch.optim.Adam, {"lr": "learning_rate", "eps": "epsilon", "amsgrad": "amsgrad"}),
    ("Adam", torch.optim.Adam, {"lr": "learning_rate", "eps": "epsilon", "amsgrad": "amsgrad"}),
    ("adamw", torch.optim.AdamW, {"lr": "learning_rate", "eps": "epsilon", "weight_decay": "weight_decay"}),
    ("rmsprop", torch.optim.RMSprop, {"lr": "learning_rate", "alpha": "rho", "eps": "epsilon", "momentum": "momentum",
                                      "centered": "centered"}),
    ("RMSprop", torch.optim.RMSprop, {"lr": "learning_rate", "alpha": "rho", "eps": "epsilon"}),
]


@pytest.mark.parametrize(("name", "cls", "keys"), OPTIMIZER_CASES, ids=[case[0] for case in OPTIMIZER_CASES])
def test_an_optimizer_name_builds_torchs_optimizer_with_kerass_defaults_and_trains(name: str, cls: type, keys: dict) -> None:
    model, x, y = _classifier()
    frozen = torch.nn.Linear(3, 3).requires_grad_(False)
    model = torch.nn.Sequential(frozen, *model)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the frozen layer is not "left out of every optimizer"
        history = torchcallbacks.fit(model, x, y, optimizer=name, loss="binary_crossentropy", epochs=2, verbose=0)
    optimizer = history.optimizer
    assert type(optimizer) is cls
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters() if p.requires_grad]
    keras = KERAS_OPTIMIZERS[name]
    for torch_key, keras_key in keys.items():
        assert group[torch_key] == pytest.approx(keras[keras_key], rel=1e-6), torch_key  # Keras stores lr in float32
    if "beta_1" in keras:
        assert group["betas"] == (keras["beta_1"], keras["beta_2"])
    if keras.get("weight_decay") is None:
        assert group["weight_decay"] == 0
    trained = [p for p, b in zip(model.parameters(), before, strict=True) if not torch.equal(p, b)]
    assert len(trained) == 2  # the Linear's weight and bias; the frozen layer stays
    assert len(history.history["loss"]) == 2


def test_unknown_names_are_value_errors_naming_the_argument_and_the_known_names() -> None:
    model, x, y = _classifier()
    with pytest.raises(ValueError, match=r"^loss: unknown name 'msee'.*'mse'.*'binary_crossentropy'"):
        torchcallbacks.fit(model, x, y, optimizer="adam", loss="msee", verbose=0)
    with pytest.raises(ValueError, match=r"^loss: unknown name 'Mse'"):  # case-sensitive, as Keras' losses
        torchcallbacks.evaluate(model, x, y, loss="Mse", verbose=0)
    with pytest.raises(ValueError, match=r"^metrics: unknown name 'acuracy'.*'accuracy'.*'auc'.*'mae'"):
        torchcallbacks.fit(model, x, y, optimizer="adam", loss="mse", metrics=["acuracy"], verbose=0)
    with pytest.raises(ValueError, match=r"^metrics: unknown name 'nope'"):
        torchcallbacks.evaluate(model, x, y, loss="mse", metrics={"a": "nope"}, verbose=0)
    with pytest.raises(ValueError, match=r"^optimizer: unknown name 'adamm'.*'sgd', 'adam', 'adamw', 'rmsprop'"):
        torchcallbacks.fit(model, x, y, optimizer="adamm", loss="mse", verbose=0)
    with pytest.raises(TypeError, match=r"^optimizer: a name such as 'adam'"):
        torchcallbacks.fit(model, x, y, optimizer=["adam", "sgd"], loss="mse", verbose=0)
    with pytest.raises(TypeError, match=r"metrics=\['accuracy'\]"):
        torchcallbacks.fit(model, x, y, optimizer="adam", loss="mse", metrics="accuracy", verbose=0)


def test_shape_errors_name_the_loss_or_metric() -> None:
    model, x, _ = _classifier()
    with pytest.raises(ValueError, match=r"^loss='mse': .*\(32, 2\).*\(32, 1\)"):
        torchcallbacks.evaluate(model, x, torch.zeros(64, 2), loss="mse", verbose=0)
    with pytest.raises(ValueError, match=r"^metrics: 'mae': "):
        torchcallbacks.evaluate(model, x, torch.zeros(64, 2), loss=zero_loss, metrics=["mae"], verbose=0)


def test_losses_are_float32_under_low_precision_outputs() -> None:
    y_pred = torch.tensor([[0.9], [0.1]], dtype=torch.bfloat16)
    loss = resolve_loss("binary_crossentropy")(y_pred, torch.tensor([[1.0], [0.0]]))
    assert loss.dtype == torch.float32
    assert resolve_loss("mse")(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2, 1)).dtype == torch.float64


def test_auc_without_torchmetrics_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.classification", None)
    with pytest.raises(ImportError, match=r"metrics: 'auc' needs the 'torchmetrics' package.*torchcallbacks\[torchmetrics\]"):
        normalize_metrics(["auc"])


def test_a_string_loss_is_resolved_once_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    fit_module = sys.modules["torchcallbacks.training.fit"]  # the module; the package's `fit` is the function
    calls: list[Any] = []
    real = fit_module.resolve_loss
    monkeypatch.setattr(fit_module, "resolve_loss", lambda loss: calls.append(loss) or real(loss))
    model, x, y = _classifier()
    torchcallbacks.fit(model, x, y, optimizer="adam", loss="bce", epochs=2, batch_size=8, verbose=0)
    assert calls == ["bce"]


def _conversions_for(batches: int, metrics: list[str]) -> int:
    from test_logs import CountConversions  # every tensor -> host conversion (a device sync on a GPU)

    x = torch.randn(8 * batches, 3)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    with CountConversions() as counter:
        torchcallbacks.fit(
            # "sgd": torch's Adam reads its CPU step counter with .item() at every step, on any device
            model, x, y, optimizer="sgd", loss="binary_crossentropy", metrics=metrics, batch_size=8, epochs=2,
            verbose=0,
        )
    return counter.count


def test_keras_names_add_no_conversion_per_batch() -> None:
    metrics = ["accuracy", "mae", "hinge"]
    assert _conversions_for(4, metrics) == _conversions_for(40, metrics)


def test_every_listed_name_resolves() -> None:
    from torchcallbacks.training.keras_losses import KerasLoss, KerasMetric
    from torchcallbacks.training.shortcuts import OPTIMIZERS, loss_names, metric_names, resolve_optimizer

    assert {"mse", "mae", "huber", "binary_crossentropy", "categorical_crossentropy"} <= set(loss_names())
    assert all(isinstance(resolve_loss(name), KerasLoss) for name in loss_names())
    assert {"accuracy", "acc", "mae", "mse", "auc"} <= set(metric_names())
    assert all(isinstance(resolve_metric(name), KerasMetric) for name in metric_names() if name.lower() != "auc")
    model = torch.nn.Linear(2, 1)
    assert all(isinstance(resolve_optimizer(name.upper(), model), OPTIMIZERS[name][0]) for name in OPTIMIZERS)
