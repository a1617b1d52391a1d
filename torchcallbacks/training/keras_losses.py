"""Keras' losses and metrics written in torch, for the string shortcuts (`loss="mse"`, `metrics=["accuracy"]`).

Each per-sample function takes torch's argument order, `(y_pred, y)`, and computes what Keras 3
computes (keras/src/losses/losses.py, keras/src/metrics/accuracy_metrics.py and the crossentropies of
keras/src/backend/torch/nn.py): one value per sample (the mean or sum over the last axis), with
Keras' epsilon (1e-7) clipping and the rank adjustment of `squeeze_or_expand_to_same_rank`. The
crossentropies take probabilities, as Keras' do without `from_logits=True`. `KerasLoss` reduces them
as Keras' `"sum_over_batch_size"` does (a mean over the per-sample values); its `per_sample` is what
`compute_loss` weighs with sample weights. Values are computed in float32 (float64 for float64
predictions), as Keras computes losses in float32 under mixed precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

PerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Keras' `backend.epsilon()`.
EPSILON = 1e-7


def _prepared(y_pred: Any, y: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`y_pred` in the compute dtype (float32, or float64 kept) and `y` in the same dtype and device."""
    if not isinstance(y_pred, torch.Tensor):
        raise TypeError(
            f"{name!r}: expected the model's output to be a tensor, received {type(y_pred).__name__}; a model "
            "with several outputs needs a loss (or metric) function of its own"
        )
    dtype = torch.float64 if y_pred.dtype == torch.float64 else torch.float32
    y = torch.as_tensor(y, device=y_pred.device)
    return y_pred.to(dtype), y.to(dtype)


def same_rank(y: torch.Tensor, y_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keras' `squeeze_or_expand_to_same_rank(y_true, y_pred)`: when the ranks differ by one and the
    longer one ends in a dimension of 1, a rank-1 tensor gets a last dimension of 1 (`(n,)` with
    `(n, 1)` becomes `(n, 1)` twice), else the longer one loses it.

    Args:
        y: the targets.
        y_pred: the predictions.

    Example:

    ```python
    y, y_pred = same_rank(torch.zeros(4), torch.zeros(4, 1))  # both (4, 1)
    ```
    """
    if y.ndim == y_pred.ndim + 1 and y.shape[-1] == 1:
        if y_pred.ndim == 1:
            y_pred = y_pred.unsqueeze(-1)
        else:
            y = y.squeeze(-1)
    elif y_pred.ndim == y.ndim + 1 and y_pred.shape[-1] == 1:
        if y.ndim == 1:
            y = y.unsqueeze(-1)
        else:
            y_pred = y_pred.squeeze(-1)
    return y, y_pred


def _elementwise(y_pred: Any, y: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tensors of a regression-like function: prepared, ranks made the same, shapes checked."""
    y_pred, y = _prepared(y_pred, y, name)
    y, y_pred = same_rank(y, y_pred)
    if y.shape != y_pred.shape:
        raise ValueError(
            f"{name!r}: the targets' shape {tuple(y.shape)} does not match the predictions' {tuple(y_pred.shape)}"
        )
    return y_pred, y


def mean_squared_error(y_pred: Any, y: Any) -> torch.Tensor:
    """`mean((y - y_pred) ** 2, axis=-1)` per sample (Keras' `mean_squared_error`)."""
    y_pred, y = _elementwise(y_pred, y, "mean_squared_error")
    return (y - y_pred).square().mean(-1)


def mean_absolute_error(y_pred: Any, y: Any) -> torch.Tensor:
    """`mean(|y - y_pred|, axis=-1)` per sample (Keras' `mean_absolute_error`)."""
    y_pred, y = _elementwise(y_pred, y, "mean_absolute_error")
    return (y - y_pred).abs().mean(-1)


def mean_absolute_percentage_error(y_pred: Any, y: Any) -> torch.Tensor:
    """`100 * mean(|(y - y_pred) / max(|y|, 1e-7)|, axis=-1)` per sample."""
    y_pred, y = _elementwise(y_pred, y, "mean_absolute_percentage_error")
    return 100.0 * ((y - y_pred) / y.abs().clamp_min(EPSILON)).abs().mean(-1)


def mean_squared_logarithmic_error(y_pred: Any, y: Any) -> torch.Tensor:
    """`mean((log(max(y_pred, 1e-7) + 1) - log(max(y, 1e-7) + 1)) ** 2, axis=-1)` per sample."""
    y_pred, y = _elementwise(y_pred, y, "mean_squared_logarithmic_error")
    return (torch.log(y_pred.clamp_min(EPSILON) + 1.0) - torch.log(y.clamp_min(EPSILON) + 1.0)).square().mean(-1)


def cosine_similarity(y_pred: Any, y: Any) -> torch.Tensor:
    """Keras' loss `cosine_similarity`: `-sum(l2_normalize(y) * l2_normalize(y_pred), axis=-1)`
    (between -1 and 1; -1 is best). A zero vector's norm counts as 1e-12 (torch's and Keras' guard)."""
    y_pred, y = _elementwise(y_pred, y, "cosine_similarity")
    return -(torch.nn.functional.normalize(y, dim=-1) * torch.nn.functional.normalize(y_pred, dim=-1)).sum(-1)


def huber(y_pred: Any, y: Any, delta: float = 1.0) -> torch.Tensor:
    """Keras' `huber` (delta 1.0): `0.5 e**2` where `|e| <= delta`, else `delta |e| - 0.5 delta**2`,
    averaged over the last axis."""
    y_pred, y = _elementwise(y_pred, y, "huber")
    error = y_pred - y
    absolute = error.abs()
    return torch.where(absolute <= delta, 0.5 * error.square(), delta * absolute - 0.5 * delta**2).mean(-1)


def log_cosh(y_pred: Any, y: Any) -> torch.Tensor:
    """`mean(log(cosh(y_pred - y)), axis=-1)`, computed as `x + softplus(-2x) - log(2)` (Keras' form)."""
    y_pred, y = _elementwise(y_pred, y, "log_cosh")
    x = y_pred - y
    return (x + torch.nn.functional.softplus(-2.0 * x) - math.log(2.0)).mean(-1)


def _hinge_labels(y: torch.Tensor) -> torch.Tensor:
    """Keras' `convert_binary_labels_to_hinge`: 0/1 labels become -1/1 when every label of the batch
    is 0 or 1 (decided without a host synchronisation)."""
    binary = ((y == 0) | (y == 1)).all()
    return torch.where(binary, 2.0 * y - 1.0, y)


def hinge(y_pred: Any, y: Any) -> torch.Tensor:
    """`mean(max(1 - y * y_pred, 0), axis=-1)`; labels -1/1 (0/1 are converted, as Keras does)."""
    y_pred, y = _elementwise(y_pred, y, "hinge")
    return (1.0 - _hinge_labels(y) * y_pred).clamp_min(0.0).mean(-1)


def squared_hinge(y_pred: Any, y: Any) -> torch.Tensor:
    """`mean(max(1 - y * y_pred, 0) ** 2, axis=-1)`; labels -1/1 (0/1 are converted)."""
    y_pred, y = _elementwise(y_pred, y, "squared_hinge")
    return (1.0 - _hinge_labels(y) * y_pred).clamp_min(0.0).square().mean(-1)


def categorical_hinge(y_pred: Any, y: Any) -> torch.Tensor:
    """`max(max((1 - y) * y_pred) - sum(y * y_pred) + 1, 0)` over the last axis; `y` one-hot."""
    y_pred, y = _elementwise(y_pred, y, "categorical_hinge")
    positive = (y * y_pred).sum(-1)
    negative = ((1.0 - y) * y_pred).amax(-1)
    return (negative - positive + 1.0).clamp_min(0.0)


def kl_divergence(y_pred: Any, y: Any) -> torch.Tensor:
    """`sum(y * log(y / y_pred), axis=-1)` with both clipped to `[1e-7, 1]`."""
    y_pred, y = _elementwise(y_pred, y, "kl_divergence")
    y, y_pred = y.clamp(EPSILON, 1.0), y_pred.clamp(EPSILON, 1.0)
    return (y * torch.log(y / y_pred)).sum(-1)


def poisson(y_pred: Any, y: Any) -> torch.Tensor:
    """`mean(y_pred - y * log(y_pred + 1e-7), axis=-1)`."""
    y_pred, y = _elementwise(y_pred, y, "poisson")
    return (y_pred - y * torch.log(y_pred + EPSILON)).mean(-1)


def binary_crossentropy(y_pred: Any, y: Any) -> torch.Tensor:
    """Keras' `binary_crossentropy` on probabilities: `y_pred` clipped to `[1e-7, 1 - 1e-7]`,
    `-(y log(p) + (1 - y) log(1 - p))` averaged over the last axis. For logits use
    `torch.nn.functional.binary_cross_entropy_with_logits` (the same mean for `(n, 1)` outputs)."""
    y_pred, y = _elementwise(y_pred, y, "binary_crossentropy")
    p = y_pred.clamp(EPSILON, 1.0 - EPSILON)
    return -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p)).mean(-1)


def categorical_crossentropy(y_pred: Any, y: Any) -> torch.Tensor:
    """Keras' `categorical_crossentropy` on probabilities, `y` one-hot (or a distribution): `y_pred`
    divided by its sum over the last axis, clipped to `[1e-7, 1 - 1e-7]`, `-sum(y log(p), axis=-1)`."""
    y_pred, y = _elementwise(y_pred, y, "categorical_crossentropy")
    p = (y_pred / y_pred.sum(-1, keepdim=True)).clamp(EPSILON, 1.0 - EPSILON)
    return -(y * torch.log(p)).sum(-1)


def sparse_categorical_crossentropy(y_pred: Any, y: Any) -> torch.Tensor:
    """Keras' `sparse_categorical_crossentropy` on probabilities, `y` class indices of shape `(n,)`
    (or `(n, 1)`): `y_pred` normalised over the last axis and clipped to `[1e-7, 1 - 1e-7]`, minus the
    log of the target class's value. For logits use `torch.nn.functional.cross_entropy`."""
    name = "sparse_categorical_crossentropy"
    y_pred, _ = _prepared(y_pred, torch.zeros(()), name)
    y = torch.as_tensor(y, device=y_pred.device)
    if y.ndim == y_pred.ndim and y.ndim and y.shape[-1] == 1:
        y = y.squeeze(-1)
    if y.shape != y_pred.shape[:-1]:
        raise ValueError(
            f"{name!r}: expected class indices of shape {tuple(y_pred.shape[:-1])} for predictions of shape "
            f"{tuple(y_pred.shape)}, received {tuple(y.shape)}"
        )
    p = (y_pred / y_pred.sum(-1, keepdim=True)).clamp(EPSILON, 1.0 - EPSILON)
    return -torch.log(p).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)


def binary_accuracy(y_pred: Any, y: Any, threshold: float = 0.5) -> torch.Tensor:
    """1.0 where `(y_pred > 0.5) == y`, else 0.0, per element (Keras' `binary_accuracy`)."""
    if not isinstance(y_pred, torch.Tensor):
        _prepared(y_pred, y, "binary_accuracy")
    y = torch.as_tensor(y, device=y_pred.device)
    y, y_pred = same_rank(y, y_pred)
    return (y == (y_pred > threshold).to(y.dtype)).float()


def categorical_accuracy(y_pred: Any, y: Any) -> torch.Tensor:
    """1.0 where `argmax(y_pred, -1) == argmax(y, -1)` (one-hot `y`), else 0.0, per sample."""
    if not isinstance(y_pred, torch.Tensor):
        _prepared(y_pred, y, "categorical_accuracy")
    y = torch.as_tensor(y, device=y_pred.device)
    return (y.argmax(-1) == y_pred.argmax(-1)).float()


def sparse_categorical_accuracy(y_pred: Any, y: Any) -> torch.Tensor:
    """1.0 where `argmax(y_pred, -1) == y` (class indices, `(n,)` or `(n, 1)`), else 0.0, per sample."""
    y_pred, y = _prepared(y_pred, y, "sparse_categorical_accuracy")
    if y.ndim == y_pred.ndim and y.ndim and y.shape[-1] == 1:
        y = y.squeeze(-1)
    return (y == y_pred.argmax(-1).to(y.dtype)).float()


def accuracy_kind(y_pred: torch.Tensor, y: torch.Tensor) -> str:
    """Which accuracy Keras' `"accuracy"` means for these shapes (`compile_utils.get_metric`):
    `"binary"` when the predictions' last dimension is 1, `"sparse_categorical"` when the targets
    have fewer dimensions or end in a dimension of 1, else `"categorical"`. Predictions of rank 1 are
    a ValueError (Keras would take their argmax over the batch).

    Args:
        y_pred: one batch's predictions.
        y: its targets.

    Example:

    ```python
    accuracy_kind(torch.zeros(8, 3), torch.zeros(8))  # "sparse_categorical"
    ```
    """
    y = torch.as_tensor(y)
    if y_pred.ndim < 2:
        raise ValueError(
            f"predictions of shape {tuple(y_pred.shape)}: Keras' 'accuracy' would be the categorical one over "
            "the batch axis; give the model an output of shape (n, 1) for binary accuracy or (n, classes), "
            "or name the metric: 'binary_accuracy', 'categorical_accuracy', 'sparse_categorical_accuracy'"
        )
    if y_pred.shape[-1] == 1:
        return "binary"
    if y.ndim < y_pred.ndim or (y.ndim and y.shape[-1] == 1):
        return "sparse_categorical"
    return "categorical"


ACCURACIES: dict[str, PerSample] = {
    "binary": binary_accuracy,
    "sparse_categorical": sparse_categorical_accuracy,
    "categorical": categorical_accuracy,
}
CROSSENTROPIES: dict[str, PerSample] = {
    "binary": binary_crossentropy,
    "sparse_categorical": sparse_categorical_crossentropy,
    "categorical": categorical_crossentropy,
}


class ByShape:
    """A per-sample function chosen from the first batch's shapes, as Keras chooses `"accuracy"` and
    `"crossentropy"` when it builds its metrics (see `accuracy_kind`); later batches use the same.

    Args:
        name: the name given, for messages.
        choices: `"binary"`, `"sparse_categorical"`, `"categorical"` -> per-sample function.

    Example:

    ```python
    accuracy = ByShape("accuracy", ACCURACIES)
    accuracy(torch.tensor([[0.9], [0.2]]), torch.tensor([1.0, 1.0]))  # binary: tensor([[1.], [0.]])
    ```
    """

    def __init__(self, name: str, choices: dict[str, PerSample]) -> None:
        self.name = name
        self.choices = choices
        self.chosen: PerSample | None = None

    def __call__(self, y_pred: Any, y: Any) -> torch.Tensor:
        chosen = self.chosen
        if chosen is None:
            if not isinstance(y_pred, torch.Tensor):
                _prepared(y_pred, y, self.name)  # the error naming it
            chosen = self.chosen = self.choices[accuracy_kind(y_pred, y)]
        return chosen(y_pred, y)


class KerasLoss:
    """A Keras loss by name: the mean of its per-sample values (Keras' `"sum_over_batch_size"`).

    With sample weights, `compute_loss` calls `per_sample` and weighs those values (the sum of the
    weighted values over their number, as Keras does).

    Args:
        name: the name it was given by (e.g. `"mse"`), shown in its repr.
        per_sample: `(y_pred, y) -> one value per sample`.

    Example:

    ```python
    loss = KerasLoss("mse", mean_squared_error)
    loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]]))  # tensor(2.5000)
    ```
    """

    def __init__(self, name: str, per_sample: PerSample) -> None:
        self.name = name
        self._per_sample = per_sample

    def per_sample(self, y_pred: Any, y: Any) -> torch.Tensor:
        """One value per sample (what sample weights weigh); errors name `loss`."""
        try:
            return self._per_sample(y_pred, y)
        except (TypeError, ValueError) as exc:  # shapes, or an output that is not a tensor
            raise type(exc)(f"loss={self.name!r}: {exc}") from exc

    def __call__(self, y_pred: Any, y: Any) -> torch.Tensor:
        return self.per_sample(y_pred, y).mean()

    def __repr__(self) -> str:
        return f"KerasLoss({self.name!r})"


class KerasMetric:
    """A Keras metric by name: the batch mean of its per-sample values (averaged over the epoch
    weighted by batch size, as Keras' mean metrics average over samples), with its direction for
    monitors in `mode`.

    Args:
        name: the name it was given by (the logged name).
        per_sample: `(y_pred, y) -> one value per sample`.
        mode: `"max"` (accuracies) or `"min"` (errors, crossentropies).

    Example:

    ```python
    mae = KerasMetric("mae", mean_absolute_error, "min")
    mae(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [0.0]]))  # tensor(2.)
    ```
    """

    def __init__(self, name: str, per_sample: PerSample, mode: str) -> None:
        self.__name__ = name
        self.per_sample = per_sample
        self.mode = mode

    def __call__(self, y_pred: Any, y: Any) -> torch.Tensor:
        try:
            return self.per_sample(y_pred, y).mean()
        except (TypeError, ValueError) as exc:  # shapes, or an output that is not a tensor
            raise type(exc)(f"metrics: {self.__name__!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"KerasMetric({self.__name__!r})"
