"""One training, evaluation or prediction step: forward, loss, backward, optimizer, AMP, clipping."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.training.batches import batch_size, call_model, to_device, unpack, unpack_x
from torchcallbacks.training.metrics import MetricTracker

StepFunction = Callable[[Any], Any]


def compute_loss(loss_fn: Callable[..., Any], y_pred: Any, y: Any, sample_weight: Any) -> torch.Tensor:
    """`loss_fn(y_pred, y)`, checked to be a scalar; with `sample_weight`, per-sample losses weighted
    and averaged over the batch as Keras does (sum of weighted losses / number of elements).

    Args:
        loss_fn: `(y_pred, y) -> tensor`: a scalar, or per-sample losses when there are sample weights.
        y_pred: the model's output.
        y: the targets.
        sample_weight: one weight per sample, or None.

    Example:

    ```python
    per_sample = functools.partial(torch.nn.functional.mse_loss, reduction="none")
    loss = compute_loss(per_sample, y_pred, y, sample_weight=torch.tensor([1.0, 0.0]))
    ```
    """
    try:
        value = loss_fn(y_pred, y)
    except Exception as exc:
        if _works_swapped(loss_fn, y_pred, y):
            raise TypeError(
                f"loss: loss(y_pred, y) raised {type(exc).__name__} ({exc}), but loss(y, y_pred) works: the "
                "loss looks written in Keras' order (y_true, y_pred). torchcallbacks calls loss(y_pred, y), "
                "torch's order (like F.cross_entropy(input, target)): swap the loss's arguments"
            ) from exc
        raise
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss: expected loss(y_pred, y) to return a tensor, received {type(value).__name__}")
    if sample_weight is None:
        if value.ndim != 0:
            raise ValueError(
                f"loss: expected loss(y_pred, y) to return a scalar (0-d) tensor, received shape "
                f"{tuple(value.shape)}; reduce it (e.g. reduction='mean'), or add sample weights to the batch"
            )
        return value
    if value.ndim == 0:
        raise ValueError(
            "loss: the batch has sample_weight, so loss(y_pred, y) must return one value per sample "
            "(e.g. functools.partial(F.cross_entropy, reduction='none')); it returned a scalar"
        )
    weight = torch.as_tensor(sample_weight, device=value.device, dtype=value.dtype)
    while weight.ndim < value.ndim:
        weight = weight.unsqueeze(-1)
    return (value * weight).mean()


def _works_swapped(loss_fn: Callable[..., Any], y_pred: Any, y: Any) -> bool:
    """Whether `loss_fn(y, y_pred)` returns a tensor (tried only after `loss_fn(y_pred, y)` raised)."""
    try:
        with torch.no_grad():
            return isinstance(loss_fn(y, y_pred), torch.Tensor)
    except Exception:
        return False


def _as_values(result: Any, where: str) -> Mapping[str, Any]:
    if isinstance(result, torch.Tensor):
        return {"loss": result}
    if isinstance(result, Mapping):
        return result
    raise TypeError(f"{where}: expected the step to return a loss tensor or a dict of scalars, received {type(result).__name__}")


class Stepper:
    """Runs single steps for `fit`, `evaluate` and `predict` and feeds a `MetricTracker`.

    The default training step is `loss(model(x), y)`, backward, optional gradient clipping by norm,
    `optimizer.step()`; under `amp_dtype` the forward pass and loss run in `torch.autocast`, and a
    `GradScaler` (if given) scales the loss. A custom `train_step(batch)` / `test_step(batch)` /
    `predict_step(batch)` replaces the default; the batch it receives is already on the device.

    Args:
        model: the model (already on `device`).
        device: where batches are moved.
        tracker: the running means that `train` and `test` update (not needed to predict).
        loss: `(y_pred, y) -> tensor`, for the default train and test steps.
        optimizers: the optimizers the default train step steps.
        amp_dtype: run the forward pass and loss under `torch.autocast` with this dtype.
        scaler: a `torch.amp.GradScaler` that scales the loss (with float16 autocast).
        clip_grad_norm: clip the gradients' total norm to this before each optimizer step.
        train_step: a custom training step `batch -> loss tensor or dict of scalars`.
        test_step: a custom evaluation step, the same.
        predict_step: a custom prediction step `batch -> output`.

    Example:

    ```python
    tracker = MetricTracker({})
    stepper = Stepper(model, torch.device("cpu"), tracker, loss=torch.nn.functional.mse_loss,
                      optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)])
    stepper.train((x, y))
    ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        tracker: MetricTracker | None = None,
        loss: Callable[..., Any] | None = None,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        amp_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        clip_grad_norm: float | None = None,
        train_step: StepFunction | None = None,
        test_step: StepFunction | None = None,
        predict_step: StepFunction | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.tracker = tracker
        self.loss = loss
        self.optimizers = list(optimizers)
        self.amp_dtype = amp_dtype
        self.scaler = scaler
        self.clip_grad_norm = clip_grad_norm
        self.custom_train = train_step
        self.custom_test = test_step
        self.custom_predict = predict_step
        self._params = [p for p in model.parameters() if p.requires_grad] if clip_grad_norm else []

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward(self, batch: Any, where: str) -> tuple[torch.Tensor, Any, Any, int]:
        x, y, sample_weight = unpack(batch, where)
        x, y = to_device(x, self.device), to_device(y, self.device)
        if sample_weight is not None:
            sample_weight = to_device(sample_weight, self.device)
        assert self.loss is not None
        if self.amp_dtype is None:
            y_pred = call_model(self.model, x)
            loss = compute_loss(self.loss, y_pred, y, sample_weight)
        else:
            with self._autocast():
                y_pred = call_model(self.model, x)
                loss = compute_loss(self.loss, y_pred, y, sample_weight)
        return loss, y_pred, y, batch_size(x)

    def train(self, batch: Any) -> None:
        """One training step on `batch`; its loss and metrics go to the tracker.

        Args:
            batch: `(x, y)` or `(x, y, sample_weight)` (any batch with a custom `train_step`).

        Example:

        ```python
        for x, y in loader:
            stepper.train((x, y))
        ```
        """
        tracker = self.tracker
        assert tracker is not None
        if self.custom_train is not None:
            batch = to_device(batch, self.device)
            tracker.update(_as_values(self.custom_train(batch), "train_step"), None, None, batch_size(batch))
            return
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss, y_pred, y, size = self._forward(batch, "fit")
        scaler = self.scaler
        if scaler is None:
            loss.backward()
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
            for optimizer in self.optimizers:
                optimizer.step()
        else:
            scaler.scale(loss).backward()
            if self.clip_grad_norm:
                for optimizer in self.optimizers:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
            for optimizer in self.optimizers:
                scaler.step(optimizer)
            scaler.update()
        tracker.update_loss(loss, size)
        tracker.update_metrics(y_pred, y, size)

    def test(self, batch: Any, where: str) -> None:
        """One evaluation step on `batch` (call it under `torch.no_grad()`); its loss and metrics go
        to the tracker.

        Args:
            batch: `(x, y)` or `(x, y, sample_weight)` (any batch with a custom `test_step`).
            where: the data's argument name, for error messages (e.g. `"validation_data"`).

        Example:

        ```python
        with torch.no_grad():
            stepper.test((x, y), "validation_data")
        ```
        """
        tracker = self.tracker
        assert tracker is not None
        if self.custom_test is not None:
            batch = to_device(batch, self.device)
            with self._autocast():
                result = self.custom_test(batch)
            tracker.update(_as_values(result, "test_step"), None, None, batch_size(batch))
            return
        loss, y_pred, y, size = self._forward(batch, where)
        tracker.update_loss(loss, size)
        tracker.update_metrics(y_pred, y, size)

    def predict(self, batch: Any) -> Any:
        """The model's output for one batch (`x`, or the `x` of `(x, y)`), or the custom
        `predict_step`'s result.

        Args:
            batch: a batch from the `predict` loader.

        Example:

        ```python
        with torch.no_grad():
            y_pred = stepper.predict((x,))
        ```
        """
        if self.custom_predict is not None:
            batch = to_device(batch, self.device)
            with self._autocast():
                return self.custom_predict(batch)
        x = to_device(unpack_x(batch), self.device)
        with self._autocast():
            return call_model(self.model, x)
