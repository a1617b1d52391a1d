"""Keras' string shortcuts: `loss="mse"`, `metrics=["accuracy"]`, `optimizer="adam"`.

The names are Keras 3's (`keras.losses.get`, `keras.metrics.get`, `keras.optimizers.get` and
`compile_utils.get_metric` / `get_loss`), looked up as Keras looks them up: losses and metrics by
their exact snake-case name, class name or short alias (`"mse"` and `"MSE"`, `"mean_squared_error"`,
`"MeanSquaredError"`), `"accuracy"` / `"acc"` and `"crossentropy"` / `"ce"` in any case (chosen from
the first batch's shapes), optimizers in any case (`"Adam"`). Each name is resolved once, when
`fit` or `evaluate` starts; an unknown one is a ValueError naming the argument and the known names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchcallbacks.training import keras_losses as k

# (snake-case name, Keras class name, aliases, per-sample function) of each loss.
_LOSSES: tuple[tuple[str, str, tuple[str, ...], k.PerSample], ...] = (
    ("mean_squared_error", "MeanSquaredError", ("mse", "MSE"), k.mean_squared_error),
    ("mean_absolute_error", "MeanAbsoluteError", ("mae", "MAE"), k.mean_absolute_error),
    ("mean_absolute_percentage_error", "MeanAbsolutePercentageError", ("mape", "MAPE"), k.mean_absolute_percentage_error),
    ("mean_squared_logarithmic_error", "MeanSquaredLogarithmicError", ("msle", "MSLE"), k.mean_squared_logarithmic_error),
    ("binary_crossentropy", "BinaryCrossentropy", ("bce", "BCE"), k.binary_crossentropy),
    ("categorical_crossentropy", "CategoricalCrossentropy", (), k.categorical_crossentropy),
    ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy", (), k.sparse_categorical_crossentropy),
    ("huber", "Huber", (), k.huber),
    ("log_cosh", "LogCosh", (), k.log_cosh),
    ("kl_divergence", "KLDivergence", ("kld", "KLD"), k.kl_divergence),
    ("poisson", "Poisson", (), k.poisson),
    ("hinge", "Hinge", (), k.hinge),
    ("squared_hinge", "SquaredHinge", (), k.squared_hinge),
    ("categorical_hinge", "CategoricalHinge", (), k.categorical_hinge),
    ("cosine_similarity", "CosineSimilarity", (), k.cosine_similarity),
)


def _positive_cosine_similarity(y_pred: Any, y: Any) -> torch.Tensor:
    """Keras' metric `cosine_similarity`: the cosine itself (1 is best), the loss's opposite."""
    return -k.cosine_similarity(y_pred, y)


# (snake-case name, class name, aliases, per-sample function, direction) of each mean metric.
_METRICS: tuple[tuple[str, str, tuple[str, ...], k.PerSample, str], ...] = (
    ("binary_accuracy", "BinaryAccuracy", (), k.binary_accuracy, "max"),
    ("categorical_accuracy", "CategoricalAccuracy", (), k.categorical_accuracy, "max"),
    ("sparse_categorical_accuracy", "SparseCategoricalAccuracy", (), k.sparse_categorical_accuracy, "max"),
    ("mean_squared_error", "MeanSquaredError", ("mse", "MSE"), k.mean_squared_error, "min"),
    ("mean_absolute_error", "MeanAbsoluteError", ("mae", "MAE"), k.mean_absolute_error, "min"),
    ("mean_absolute_percentage_error", "MeanAbsolutePercentageError", ("mape", "MAPE"), k.mean_absolute_percentage_error, "min"),
    ("mean_squared_logarithmic_error", "MeanSquaredLogarithmicError", ("msle", "MSLE"), k.mean_squared_logarithmic_error, "min"),
    ("log_cosh_error", "LogCoshError", (), k.log_cosh, "min"),
    ("cosine_similarity", "CosineSimilarity", (), _positive_cosine_similarity, "max"),
    ("binary_crossentropy", "BinaryCrossentropy", ("bce", "BCE"), k.binary_crossentropy, "min"),
    ("categorical_crossentropy", "CategoricalCrossentropy", (), k.categorical_crossentropy, "min"),
    ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy", (), k.sparse_categorical_crossentropy, "min"),
    ("kl_divergence", "KLDivergence", (), k.kl_divergence, "min"),
    ("poisson", "Poisson", (), k.poisson, "min"),
    ("hinge", "Hinge", (), k.hinge, "min"),
    ("squared_hinge", "SquaredHinge", (), k.squared_hinge, "min"),
    ("categorical_hinge", "CategoricalHinge", (), k.categorical_hinge, "min"),
)

#: Keras 3's default hyperparameters, as torch's arguments (RMSprop's `rho` is torch's `alpha`).
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.0, "nesterov": False}),
    "adam": (torch.optim.Adam, {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-7, "amsgrad": False}),
    "adamw": (torch.optim.AdamW, {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.004, "amsgrad": False}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.001, "alpha": 0.9, "eps": 1e-7, "momentum": 0.0, "centered": False}),
}


def _table(rows: Iterable[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {name: row for row in rows for name in (row[0], row[1], *row[2])}


_LOSS_NAMES = _table(_LOSSES)
_METRIC_NAMES = _table(_METRICS)
_SHAPE_RESOLVED_LOSSES = ("crossentropy", "ce")
_SHAPE_RESOLVED_METRICS = ("accuracy", "acc")
_AUC_NAMES = ("auc", "AUC")


def _known(rows: Iterable[tuple[Any, ...]], extra: Iterable[str]) -> str:
    names = [*extra, *(n for row in rows for n in (row[0], *row[2][:1]))]
    return ", ".join(repr(n) for n in names)


def loss_names() -> list[str]:
    """Every name `loss=` takes (besides any case of `"crossentropy"` / `"ce"`).

    Example:

    ```python
    "mse" in loss_names()  # True
    ```
    """
    return sorted(_LOSS_NAMES) + list(_SHAPE_RESOLVED_LOSSES)


def metric_names() -> list[str]:
    """Every name `metrics=` takes (besides any case of `"accuracy"` / `"acc"`).

    Example:

    ```python
    "mae" in metric_names()  # True
    ```
    """
    return sorted(_METRIC_NAMES) + list(_SHAPE_RESOLVED_METRICS) + list(_AUC_NAMES)


def resolve_loss(loss: Callable[..., Any] | str | None) -> Callable[..., Any] | None:
    """`loss` itself, or for a string Keras' loss of that name (a `KerasLoss`).

    `"crossentropy"` / `"ce"` (any case) is Keras' binary, sparse categorical or categorical
    crossentropy, chosen from the first batch's shapes as `compile_utils.get_loss` does. The
    crossentropies take probabilities (a model ending in a sigmoid or softmax); for logits pass
    `torch.nn.functional.binary_cross_entropy_with_logits` or `torch.nn.functional.cross_entropy`.

    Args:
        loss: `fit`'s or `evaluate`'s `loss` argument.

    Returns:
        The callable `loss(y_pred, y)` to train or evaluate with.

    Example:

    ```python
    loss = resolve_loss("mse")
    loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]]))  # tensor(2.5000)
    ```
    """
    if not isinstance(loss, str):
        return loss  # a callable, or something check_callable names
    if loss.lower() in _SHAPE_RESOLVED_LOSSES:
        return k.KerasLoss(loss, k.ByShape(loss, k.CROSSENTROPIES))
    row = _LOSS_NAMES.get(loss)
    if row is None:
        raise ValueError(
            f"loss: unknown name {loss!r}; expected a callable loss(y_pred, y) or one of Keras' names "
            f"{_known(_LOSSES, _SHAPE_RESOLVED_LOSSES)} (or their Keras class names, e.g. 'MeanSquaredError')"
        )
    return k.KerasLoss(loss, row[3])


def _auc(name: str) -> Any:
    """Keras' `AUC()` (ROC, 200 thresholds, trapezoidal sum) as a torchmetrics `BinaryAUROC` with
    200 thresholds; targets count as positive where they are not 0, as Keras casts them to bool."""
    try:
        from torchmetrics.classification import BinaryAUROC
    except ImportError as exc:
        raise ImportError(
            f"metrics: {name!r} needs the 'torchmetrics' package, which is not installed: "
            "pip install torchcallbacks[torchmetrics]"
        ) from exc

    class AUC(BinaryAUROC):
        def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
            super().update(preds, torch.as_tensor(target, device=preds.device) != 0)

    return AUC(thresholds=200, validate_args=False)


def resolve_metric(metric: str) -> Any:
    """Keras' metric of that name: a `KerasMetric` (a callable averaged over the epoch, with its
    `mode` for monitors), or for `"auc"` a torchmetrics metric.

    `"accuracy"` / `"acc"` (any case) is binary accuracy (threshold 0.5) when the predictions' last
    dimension is 1, sparse categorical accuracy when the targets have one dimension less than the
    predictions (or end in a dimension of 1), else categorical accuracy, chosen from the first batch
    as Keras does.

    Args:
        metric: the name, e.g. `"accuracy"`, `"mae"`, `"auc"`.

    Returns:
        The metric, for `normalize_metrics`; it is logged under `metric` itself, as Keras logs it.

    Example:

    ```python
    accuracy = resolve_metric("accuracy")
    accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))  # tensor(0.5000)
    ```
    """
    if metric.lower() in _SHAPE_RESOLVED_METRICS:
        return k.KerasMetric(metric, k.ByShape(metric, k.ACCURACIES), "max")
    if metric in _AUC_NAMES:
        return _auc(metric)
    row = _METRIC_NAMES.get(metric)
    if row is None:
        raise ValueError(
            f"metrics: unknown name {metric!r}; expected a callable metric(y_pred, y), an object with "
            f"update/compute/reset, or one of Keras' names {_known(_METRICS, (*_SHAPE_RESOLVED_METRICS, 'auc'))} "
            "(or their Keras class names, e.g. 'MeanAbsoluteError')"
        )
    return k.KerasMetric(metric, row[3], row[4])


def resolve_optimizer(optimizer: Any, model: torch.nn.Module) -> Any:
    """`optimizer` itself, or for a string (any case, as Keras) torch's optimizer of that name over the
    model's trainable parameters with Keras 3's defaults:

    | name | torch optimizer |
    |---|---|
    | `"sgd"` | `SGD(lr=0.01, momentum=0)` |
    | `"adam"` | `Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-7)` |
    | `"adamw"` | `AdamW(lr=0.001, betas=(0.9, 0.999), eps=1e-7, weight_decay=0.004)` |
    | `"rmsprop"` | `RMSprop(lr=0.001, alpha=0.9, eps=1e-7, momentum=0, centered=False)` |

    Where torch's update differs from Keras' (the epsilon of Adam, AdamW and RMSprop): see
    docs/porting-from-keras.md.

    Args:
        optimizer: `fit`'s `optimizer` argument.
        model: the model whose parameters (those with `requires_grad`) the optimizer is built over.

    Returns:
        What `check_optimizers` takes: an optimizer, or the argument as it was.

    Example:

    ```python
    model = torch.nn.Linear(4, 1)
    resolve_optimizer("Adam", model)  # torch.optim.Adam(model.parameters(), lr=0.001, eps=1e-7)
    ```
    """
    if isinstance(optimizer, (list, tuple)) and any(isinstance(o, str) for o in optimizer):
        raise TypeError(
            "optimizer: a name such as 'adam' is built over all of the model's parameters, so it cannot be one "
            "of several optimizers; pass the name alone, or build each torch optimizer over its parameters"
        )
    if not isinstance(optimizer, str):
        return optimizer
    entry = OPTIMIZERS.get(optimizer.lower())
    if entry is None:
        raise ValueError(
            f"optimizer: unknown name {optimizer!r}; expected a torch.optim.Optimizer or one of "
            f"{', '.join(repr(n) for n in OPTIMIZERS)} (any case), which are built with Keras' defaults"
        )
    cls, defaults = entry
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"optimizer: {optimizer!r} has nothing to train: the model has no trainable parameters")
    return cls(parameters, **defaults)

