"""One training, evaluation or prediction step: forward, loss, backward, optimizer, AMP, clipping."""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import torch

from torchcallbacks.structures import iter_tensors
from torchcallbacks.training.batches import batch_size, call_model, to_device, unpack, unpack_x
from torchcallbacks.training.metrics import MetricTracker

StepFunction = Callable[[Any], Any]
_Tensor = torch.Tensor


def compute_loss(
    loss_fn: Callable[..., Any], y_pred: Any, y: Any, sample_weight: Any,
    weights_from: str = "the batch has sample_weight",
) -> torch.Tensor:
    """`loss_fn(y_pred, y)`, checked to be a scalar; with `sample_weight`, per-sample losses weighted
    and averaged over the batch as Keras does (sum of weighted losses / number of elements).

    A loss that cannot take two positional arguments (e.g. `lambda y_pred: ...`) is a `TypeError`
    naming `loss`; one that raises for another reason raises as it is (unless it works with the
    arguments swapped: a `TypeError` says so). These are looked at only once the loss has raised.
    With sample weights, a loss that has a `per_sample(y_pred, y)` method (Keras' losses by name,
    `KerasLoss`) is called through it.

    Args:
        loss_fn: `(y_pred, y) -> tensor`: a scalar, or per-sample losses when there are sample weights.
        y_pred: the model's output.
        y: the targets.
        sample_weight: one weight per sample, or None.
        weights_from: where the sample weights come from, for the message when the loss returns a
            scalar although there are sample weights (e.g. "class_weight was given").

    Example:

    ```python
    per_sample = functools.partial(torch.nn.functional.mse_loss, reduction="none")
    loss = compute_loss(per_sample, y_pred, y, sample_weight=torch.tensor([1.0, 0.0]))
    ```
    """
    if sample_weight is not None:
        loss_fn = getattr(loss_fn, "per_sample", loss_fn)
    try:
        value = loss_fn(y_pred, y)
    except Exception as exc:
        if isinstance(exc, TypeError) and _takes_two_arguments(loss_fn) is False:
            raise TypeError(
                f"loss: must take two arguments, (y_pred, y), and return a tensor; the loss given takes "
                f"{_signature(loss_fn)} ({exc})"
            ) from exc
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
            f"loss: {weights_from}, so loss(y_pred, y) must return one value per sample "
            "(e.g. functools.partial(F.cross_entropy, reduction='none')); it returned a scalar"
        )
    weight = torch.as_tensor(sample_weight, device=value.device, dtype=value.dtype)
    while weight.ndim < value.ndim:
        weight = weight.unsqueeze(-1)
    return (value * weight).mean()


def _loss_signature(loss_fn: Callable[..., Any]) -> inspect.Signature | None:
    """The signature the loss is called with (a module's `forward`), or None where Python has none."""
    target = loss_fn.forward if isinstance(loss_fn, torch.nn.Module) else loss_fn
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def _takes_two_arguments(loss_fn: Callable[..., Any]) -> bool | None:
    """Whether `loss_fn(y_pred, y)` binds to the loss's signature; None when it cannot be told."""
    signature = _loss_signature(loss_fn)
    if signature is None:
        return None
    try:
        signature.bind(None, None)
    except TypeError:
        return False
    return True


def _signature(loss_fn: Callable[..., Any]) -> str:
    signature = _loss_signature(loss_fn)
    return "an unknown signature" if signature is None else str(signature)


def _works_swapped(loss_fn: Callable[..., Any], y_pred: Any, y: Any) -> bool:
    """Whether `loss_fn(y, y_pred)` returns a tensor (tried only after `loss_fn(y_pred, y)` raised)."""
    try:
        with torch.no_grad():
            return isinstance(loss_fn(y, y_pred), torch.Tensor)
    except Exception:
        return False


_DTYPE_ERROR = re.compile(r"dtype|scalar type|type \(\w+\) and|same type", re.IGNORECASE)


def dtype_error(model: torch.nn.Module, x: Any, where: str, error: Exception) -> TypeError | None:
    """A `TypeError` naming the data and both dtypes when the model's forward raised `error` because
    the batch's floating inputs have a dtype the model's parameters do not; else None.

    Looked at only once the forward has raised (nothing per step); a loader's batches are not cast
    (array data is, to the model's dtype, when its loader is built).

    Args:
        model: the model whose forward raised.
        x: the batch's inputs.
        where: the data's argument (`"x"`, `"validation_data"`), or `"fit"` for fit's training data.
        error: what the forward raised.

    Example:

    ```python
    try:
        y_pred = model(x)
    except RuntimeError as exc:
        error = dtype_error(model, x, "x", exc)
        if error is None:
            raise
        raise error from exc
    ```
    """
    if not _DTYPE_ERROR.search(str(error)):
        return None
    model_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    data_dtypes = {t.dtype for t in iter_tensors(x) if t.is_floating_point()}
    if not model_dtypes or data_dtypes <= model_dtypes:
        return None
    name = "x" if where == "fit" else where
    theirs = ", ".join(sorted(str(d) for d in data_dtypes - model_dtypes))
    ours = ", ".join(sorted(str(d) for d in model_dtypes))
    return TypeError(
        f"{name}: the batches' inputs are {theirs} but the model's parameters are {ours}; give the data the "
        f"model's dtype (e.g. TensorDataset(x.to({ours.split(',')[0]}), y), or cast in the loader's collate_fn) "
        f"or the model the data's (model.to({theirs.split(',')[0]})). Arrays given to fit itself are cast for you"
    )


def _raise_forward_error(model: torch.nn.Module, x: Any, where: str, error: RuntimeError) -> NoReturn:
    """Re-raise what the model's forward raised, as `dtype_error`'s TypeError when that explains it."""
    explained = dtype_error(model, x, where, error)
    if explained is None:
        raise error
    raise explained from error


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
        gradient_accumulation_steps: step the optimizers once every this many batches (`accumulate`).
        weights_from: where sample weights come from, for the message of a loss that returns a scalar
            although there are sample weights (`fit` says "class_weight was given" when it was).

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
        gradient_accumulation_steps: int = 1,
        weights_from: str = "the batch has sample_weight",
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
        self.weights_from = weights_from
        self._params = [p for p in model.parameters() if p.requires_grad] if clip_grad_norm else []
        self._plain_cpu = device.type == "cpu" and amp_dtype is None  # the step _forward has a fast path for
        #: With gradient accumulation (k > 1) the group's state; fit then calls `accumulate`, not `train`.
        self.accumulator: GradientAccumulator | None = None
        if gradient_accumulation_steps > 1:
            self.accumulator = GradientAccumulator(model, gradient_accumulation_steps)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward(self, batch: Any, where: str) -> tuple[torch.Tensor, Any, Any, int]:
        cls = type(batch)
        if self._plain_cpu and (cls is tuple or cls is list) and len(batch) == 2:
            # The usual batch, a pair of CPU tensors trained on the CPU: what unpack, to_device,
            # call_model and batch_size would do, without their calls (this runs every step).
            x, y = batch
            if type(x) is _Tensor and type(y) is _Tensor and x.is_cpu and y.is_cpu:
                assert self.loss is not None
                try:
                    y_pred = self.model(x)
                except RuntimeError as exc:  # a try costs nothing until something raises
                    _raise_forward_error(self.model, x, where, exc)
                shape = x.shape
                return compute_loss(self.loss, y_pred, y, None), y_pred, y, shape[0] if shape else 1
        x, y, sample_weight = unpack(batch, where)
        x, y = to_device(x, self.device), to_device(y, self.device)
        if sample_weight is not None:
            sample_weight = to_device(sample_weight, self.device)
        assert self.loss is not None
        if self.amp_dtype is None:
            try:
                y_pred = call_model(self.model, x)
            except RuntimeError as exc:
                _raise_forward_error(self.model, x, where, exc)
            loss = compute_loss(self.loss, y_pred, y, sample_weight, self.weights_from)
        else:
            with self._autocast():
                try:
                    y_pred = call_model(self.model, x)
                except RuntimeError as exc:
                    _raise_forward_error(self.model, x, where, exc)
                loss = compute_loss(self.loss, y_pred, y, sample_weight, self.weights_from)
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
        optimizers = self.optimizers
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss, y_pred, y, size = self._forward(batch, "fit")
        scaler = self.scaler
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
        if scaler is None and not self.clip_grad_norm:  # the usual step, without a call more
            for optimizer in optimizers:
                optimizer.step()
        else:
            self._step_optimizers(scaler)
        tracker.update_loss(loss, size)
        if tracker.metrics:
            tracker.update_metrics(y_pred, y, size)

    def _step_optimizers(self, scaler: torch.amp.GradScaler | None) -> None:
        """Clip the gradients when asked (after unscaling them, with a GradScaler) and step every
        optimizer (through the scaler, then update it)."""
        if scaler is None:
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
            for optimizer in self.optimizers:
                optimizer.step()
            return
        if self.clip_grad_norm:
            for optimizer in self.optimizers:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
        for optimizer in self.optimizers:
            scaler.step(optimizer)
        scaler.update()

    def accumulate(self, batch: Any) -> None:
        """One training batch with gradient accumulation: the loss scaled by 1/k is backpropagated
        into the gradients of the group's earlier batches; on every k-th batch (counted by the
        `accumulator`, whose count is part of the training state) the gradients are unscaled and
        clipped when asked and the optimizers step, once. The gradients are zeroed before a group's
        first batch. A DistributedDataParallel model runs the other batches under `no_sync()`, so
        that gradients are all-reduced once per optimizer step. The unscaled loss is logged.

        Args:
            batch: `(x, y)` or `(x, y, sample_weight)`.

        Example:

        ```python
        stepper = Stepper(model, torch.device("cpu"), MetricTracker({}), loss=F.mse_loss,
                          optimizers=[opt], gradient_accumulation_steps=4)
        for batch in loader:
            stepper.accumulate(batch)  # opt.step() on every 4th batch
        ```
        """
        tracker, accumulator = self.tracker, self.accumulator
        assert tracker is not None and accumulator is not None
        steps = accumulator.steps
        if accumulator.pending == 0:
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
        stepping = accumulator.pending + 1 == steps
        no_sync = accumulator.no_sync
        context = no_sync() if no_sync is not None and not stepping else contextlib.nullcontext()
        scaler = self.scaler
        with context:
            loss, y_pred, y, size = self._forward(batch, "fit")
            scaled = loss / steps
            if scaler is None:
                scaled.backward()
            else:
                scaler.scale(scaled).backward()
        if stepping:
            self._step_optimizers(scaler)
            accumulator.pending = 0
        else:
            accumulator.pending += 1
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
        try:
            with self._autocast():
                return call_model(self.model, x)
        except RuntimeError as exc:
            _raise_forward_error(self.model, x, "x", exc)


class GradientAccumulator:
    """Where a gradient-accumulation group stands: how many of its `steps` batches have been
    backpropagated since the last optimizer step (`pending`), and, as state, the gradients they left.

    `fit` tracks it as the loop part `"gradients"`, so a backup taken between optimizer steps holds
    the accumulated gradients (each parameter's `.grad`, in `model.parameters()` order, None where
    there is none) and a resumed run continues the group exactly. Between groups (`pending == 0`) the
    state holds no tensors.

    Args:
        model: the model whose parameters' gradients accumulate (a DistributedDataParallel model's
            batches that do not step run under its `no_sync()`).
        steps: batches per optimizer step, >= 2.

    Example:

    ```python
    accumulator = GradientAccumulator(model, steps=4)
    callbacks.loop.track("gradients", accumulator)
    ```
    """

    def __init__(self, model: torch.nn.Module, steps: int) -> None:
        self.model = model
        self.steps = steps
        self.pending = 0
        self.no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = (
            model.no_sync if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        )

    def state_dict(self) -> dict[str, Any]:
        """`{"steps", "pending", "gradients"}`; the gradients only while a group is under way.

        Example:

        ```python
        accumulator.state_dict()["pending"]  # batches of the current group already backpropagated
        ```
        """
        gradients = None
        if self.pending:
            gradients = [None if p.grad is None else p.grad.detach().clone() for p in self.model.parameters()]
        return {"steps": self.steps, "pending": self.pending, "gradients": gradients}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check a state from `state_dict()` and put its gradients into the parameters' `.grad`.

        Example:

        ```python
        accumulator.load_state_dict(saved)
        ```
        """
        steps, pending, gradients = state["steps"], state["pending"], state["gradients"]
        if steps != self.steps:
            raise ValueError(
                f"the state was saved with gradient_accumulation_steps={steps}; this run has {self.steps}"
            )
        if isinstance(pending, bool) or not isinstance(pending, int) or not 0 <= pending < steps:
            raise ValueError(f"pending: expected an integer in [0, {steps}), found {pending!r}")
        parameters = list(self.model.parameters())
        if pending == 0:
            self.pending = 0
            return
        if not isinstance(gradients, list) or len(gradients) != len(parameters):
            count = len(gradients) if isinstance(gradients, list) else gradients
            raise ValueError(f"gradients: expected one entry per parameter ({len(parameters)}), found {count!r}")
        for i, (parameter, gradient) in enumerate(zip(parameters, gradients, strict=True)):
            if gradient is not None and (not isinstance(gradient, torch.Tensor) or gradient.shape != parameter.shape):
                found = tuple(gradient.shape) if isinstance(gradient, torch.Tensor) else type(gradient).__name__
                raise ValueError(f"gradients/{i}: expected shape {tuple(parameter.shape)}, found {found}")
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = None if gradient is None else gradient.to(parameter.device, parameter.dtype).clone()
        self.pending = pending
