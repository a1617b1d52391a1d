"""Running means of the loss and the metrics, kept on the device without synchronising per batch."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.distributed import is_distributed, reduce_weighted_means
from torchcallbacks.logs import LazyLogs, float_dtype
from torchcallbacks.training.shortcuts import resolve_metric

MetricLike = Any  # a callable (y_pred, y) -> tensor, or an object with update/compute/reset

# Values are folded into one sum every _FOLD_EVERY values: often enough to bound memory, rarely enough
# to cost next to nothing per step.
_FOLD_EVERY = 32


def is_stateful_metric(metric: Any) -> bool:
    """Objects with `update` / `compute` / `reset` (torchmetrics style) keep their own state.

    Args:
        metric: a metric as passed in `metrics`.

    Example:

    ```python
    is_stateful_metric(torchmetrics.Accuracy(task="binary"))  # True
    is_stateful_metric(torch.nn.functional.l1_loss)  # False
    ```
    """
    return all(callable(getattr(metric, name, None)) for name in ("update", "compute", "reset"))


def metric_name(metric: Any) -> str:
    """A function's `__name__`, else the lower-cased class name.

    Args:
        metric: a metric as passed in `metrics`.

    Example:

    ```python
    metric_name(torch.nn.functional.l1_loss)  # "l1_loss"
    metric_name(torch.nn.L1Loss())  # "l1loss"
    ```
    """
    name = getattr(metric, "__name__", None)
    return str(name) if name else type(metric).__name__.lower()


def normalize_metrics(metrics: Mapping[str, MetricLike] | Sequence[MetricLike] | None) -> dict[str, MetricLike]:
    """Metrics as a name -> metric dict; a list is named after each function (or class).

    A string is one of Keras' metric names (`"accuracy"`, `"mae"`, `"auc"`, ... see
    `shortcuts.resolve_metric`), logged under that string in a list (as Keras logs it) and under its
    key in a dict.

    Two metrics of one name, the reserved name `"loss"`, a name that is not a string or a metric
    that is neither callable nor stateful are errors that name the metric.

    Args:
        metrics: a dict of name -> metric, a list of metrics, or None (no metrics).

    Example:

    ```python
    normalize_metrics([torch.nn.functional.l1_loss])  # {"l1_loss": torch.nn.functional.l1_loss}
    normalize_metrics(["accuracy", "mae"])  # {"accuracy": KerasMetric('accuracy'), "mae": KerasMetric('mae')}
    ```
    """
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        named = {name: resolve_metric(m) if isinstance(m, str) else m for name, m in metrics.items()}
    elif isinstance(metrics, (list, tuple)):
        named = {}
        for metric in metrics:
            name = metric if isinstance(metric, str) else metric_name(metric)
            if name in named:
                raise ValueError(f"metrics: two metrics are named {name!r}; pass a dict to name them")
            named[name] = resolve_metric(metric) if isinstance(metric, str) else metric
    else:
        hint = f" (a name goes in a list: metrics=[{metrics!r}])" if isinstance(metrics, str) else ""
        raise TypeError(
            f"metrics: expected a dict or a list of metrics, received {type(metrics).__name__}{hint}"
        )
    for name, metric in named.items():
        if not isinstance(name, str):
            raise TypeError(f"metrics: names must be strings, received {name!r}")
        if name == "loss":
            raise ValueError("metrics: 'loss' is reserved for the loss; give the metric another name")
        if not (callable(metric) or is_stateful_metric(metric)):
            raise TypeError(
                f"metrics[{name!r}]: expected a callable (y_pred, y) -> tensor or an object with "
                f"update/compute/reset, received {type(metric).__name__}"
            )
    return named


def metric_direction(metric: Any) -> str | None:
    """'max' or 'min' when a metric declares its direction (`mode = "max"` or torchmetrics'
    `higher_is_better`), else None.

    Args:
        metric: a metric as passed in `metrics`.

    Example:

    ```python
    def accuracy(y_pred, y):
        return (y_pred.argmax(1) == y).float().mean()
    accuracy.mode = "max"
    metric_direction(accuracy)  # "max"
    ```
    """
    mode = getattr(metric, "mode", None)
    if mode in ("min", "max"):
        return str(mode)
    higher = getattr(metric, "higher_is_better", None)
    if isinstance(higher, bool):
        return "max" if higher else "min"
    return None


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None), torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items())


def metric_state(metric: Any) -> dict[str, Any] | None:
    """A stateful metric's state for a checkpoint: torchmetrics' `metric_state` (its accumulated
    tensors, whatever their persistence), else the metric's own `state_dict()`, else its attributes
    when all are numbers, strings, None, tensors or lists / dicts of them (a plain
    update/compute/reset object). None, with a warning, for a metric whose state cannot be saved
    (it then restarts at a mid-epoch resume).

    Args:
        metric: an object with `update` / `compute` / `reset`.

    Example:

    ```python
    class Mean:
        def reset(self): self.total, self.count = 0.0, 0
        def update(self, y_pred, y): self.total += float(y_pred.sum()); self.count += y_pred.numel()
        def compute(self): return self.total / max(self.count, 1)
    metric_state(Mean())  # after reset(): {"attributes": {"total": 0.0, "count": 0}}
    ```
    """
    if isinstance(getattr(metric, "metric_state", None), dict):
        return {"metric_state": dict(metric.metric_state)}
    if callable(getattr(metric, "state_dict", None)) and callable(getattr(metric, "load_state_dict", None)):
        return {"state_dict": metric.state_dict()}
    attributes = vars(metric) if hasattr(metric, "__dict__") else {}
    bad = sorted(k for k, v in attributes.items() if not _plain(v))
    if bad:
        warnings.warn(
            f"the state of metric {type(metric).__name__} is not saved (a mid-epoch resume restarts it): give it "
            f"state_dict() / load_state_dict(), or keep only numbers and tensors in its attributes (found "
            f"{', '.join(bad)})",
            stacklevel=4,
        )
        return None
    return {"attributes": {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in attributes.items()}}


def syncs_itself(metric: Any) -> bool:
    """Whether a stateful metric synchronises its state across processes in `compute()` itself: its
    `syncs_across_processes` attribute when it has one, else True for torchmetrics metrics (they
    have `sync()` and `dist_sync_on_step`).

    Args:
        metric: an object with `update` / `compute` / `reset`.

    Example:

    ```python
    syncs_itself(torchmetrics.MeanAbsoluteError())  # True
    ```
    """
    declared = getattr(metric, "syncs_across_processes", None)
    if isinstance(declared, bool):
        return declared
    return callable(getattr(metric, "sync", None)) and hasattr(metric, "dist_sync_on_step")


def load_metric_state(metric: Any, state: Mapping[str, Any]) -> None:
    """Put back what `metric_state` returned.

    Args:
        metric: the metric object to restore.
        state: from `metric_state`.

    Example:

    ```python
    load_metric_state(metric, metric_state(metric))
    ```
    """
    if "metric_state" in state:
        for name, value in state["metric_state"].items():
            current = getattr(metric, name)
            if isinstance(value, Mapping) and isinstance(getattr(current, "metric_state", None), dict):
                load_metric_state(current, {"metric_state": value})  # a MetricCollection's member
                continue
            if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
                value = value.to(current.device)
            setattr(metric, name, value)
    elif "state_dict" in state:
        metric.load_state_dict(state["state_dict"])
    elif "attributes" in state:
        for name, value in state["attributes"].items():
            setattr(metric, name, value)
    else:
        raise KeyError(f"metric state: expected 'metric_state', 'state_dict' or 'attributes', received {sorted(state)}")


def flatten_metric_value(name: str, value: Any) -> Any:
    """A metric's value as logs: `{name: value}` for a scalar, and for a mapping (torchmetrics'
    `MetricCollection`, or any metric returning a dict of scalars) each entry under its own key, as
    Keras does with metrics whose result is a dict (a `MetricCollection`'s `prefix=` / `postfix=`
    namespace them). Validation logs get the `val_` prefix on those keys like on any other name.

    Args:
        name: the metric's name in `metrics`.
        value: what the metric returned (a number, a one-element tensor or a mapping of them).

    Example:

    ```python
    flatten_metric_value("mae", torch.tensor(0.5))  # {"mae": tensor(0.5)}
    flatten_metric_value("scores", {"precision": torch.tensor(0.5), "recall": torch.tensor(1.0)})
    # {"precision": tensor(0.5), "recall": tensor(1.)}
    ```
    """
    if not isinstance(value, Mapping):
        return {name: value}
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"metric {name!r} returned a dict whose key {key!r} is not a string")
        if isinstance(item, Mapping):
            raise TypeError(f"metric {name!r} returned a nested dict under {key!r}; expected a dict of scalars")
        out[key] = item
    return out


def metric_directions(metrics: Mapping[str, MetricLike]) -> dict[str, str | None]:
    """Each logged name's declared direction (see `metric_direction`), for `params["metric_directions"]`.

    A `MetricCollection`'s entries are logged under their own keys: each gets its member metric's
    `higher_is_better`. Keys of a callable returning a dict are known only once it runs; the
    callable's own `mode` (if any) is listed under its name.

    Args:
        metrics: name -> metric, as `normalize_metrics` returns.

    Example:

    ```python
    metric_directions({"scores": torchmetrics.MetricCollection({"acc": torchmetrics.Accuracy(task="binary")})})
    # {"scores": None, "acc": "max"}
    ```
    """
    out: dict[str, str | None] = {}
    for name, metric in metrics.items():
        out[name] = metric_direction(metric)
        items = getattr(metric, "items", None)
        if is_stateful_metric(metric) and callable(items):
            try:
                members = list(items(keep_base=False, copy_state=False))  # torchmetrics' MetricCollection
            except TypeError:
                members = list(items())
            for key, member in members:
                if isinstance(key, str):
                    out[key] = metric_direction(member)
    return out


class RunningMean:
    """A weighted mean of 0-d tensors that stays on the device.

    `add` only appends to Python lists; the device work (a stack and a sum, without autograd) happens
    when the mean is read, and every `_FOLD_EVERY` values to bound memory. A `snapshot()` taken after a batch gives
    that batch's running mean later, even after more values were added.

    Example:

    ```python
    mean = RunningMean()
    mean.add(torch.tensor(1.0), weight=3)
    snapshot = mean.snapshot()
    mean.add(torch.tensor(3.0), weight=1)
    RunningMean.mean_of(snapshot)  # tensor(1., dtype=torch.float64)
    mean.result()  # tensor(1.5000, dtype=torch.float64)
    ```
    """

    __slots__ = ("_sum", "_values", "_weight", "_weights")

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._weight = 0.0
        self._values: list[torch.Tensor] = []
        self._weights: list[float] = []

    def add(self, value: torch.Tensor, weight: float) -> None:
        """Add one value (no device work, except a fold every `_FOLD_EVERY` values).

        Args:
            value: a 0-d tensor, e.g. a batch's loss.
            weight: its weight, e.g. the batch size.

        Example:

        ```python
        mean.add(loss.detach(), weight=len(x))
        ```
        """
        self._values.append(value)
        self._weights.append(weight)
        if len(self._values) >= _FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        # New lists instead of clearing: snapshots keep referring to the old ones.
        self._sum, self._weight = self._total(self._sum, self._weight, self._values, self._weights, len(self._values))
        self._values, self._weights = [], []

    @staticmethod
    def _total(
        base: torch.Tensor | None, base_weight: float, values: list[torch.Tensor], weights: list[float], n: int
    ) -> tuple[torch.Tensor | None, float]:
        if n == 0:
            return base, base_weight
        first = values[0]
        dtype = float_dtype(first.device)
        ws = weights[:n]
        with torch.no_grad():
            stacked = torch.stack(values[:n])
            if ws.count(ws[0]) == n:
                total = stacked.sum(dtype=dtype).mul_(ws[0])
            else:
                total = torch.dot(stacked.to(dtype), torch.tensor(ws, dtype=dtype).to(first.device, non_blocking=True))
            if base is not None:
                total = base + total
        return total, base_weight + sum(ws)

    def snapshot(self) -> tuple[Any, ...]:
        """The mean as of now, to read later with `mean_of` (cheap: no device work).

        Example:

        ```python
        snapshot = mean.snapshot()
        mean.add(torch.tensor(2.0), weight=1)
        RunningMean.mean_of(snapshot)  # the mean without the value added after the snapshot
        ```
        """
        return (self._sum, self._weight, self._values, self._weights, len(self._values))

    @classmethod
    def mean_of(cls, snapshot: tuple[Any, ...]) -> torch.Tensor | None:
        """The weighted mean at the time of `snapshot` (a 0-d tensor), or None if nothing (or only
        weight 0) had been added.

        Args:
            snapshot: from `snapshot()`.

        Example:

        ```python
        RunningMean.mean_of(mean.snapshot())  # the same as mean.result()
        ```
        """
        total, weight = cls._total(*snapshot)
        return None if total is None or weight == 0 else total / weight

    def sum_and_weight(self) -> tuple[torch.Tensor | None, float]:
        """The weighted sum (a device tensor) and the total weight, e.g. for a cross-process reduction.

        The sum is None when nothing was added.

        Example:

        ```python
        means = reduce_weighted_means({"loss": mean.sum_and_weight()})
        ```
        """
        self._fold()
        return self._sum, self._weight

    def result(self) -> torch.Tensor | None:
        """The weighted mean of every value added (a 0-d tensor), or None if there is none.

        Example:

        ```python
        mean = RunningMean()
        mean.add(torch.tensor(2.0), weight=1)
        mean.result()  # tensor(2., dtype=torch.float64)
        ```
        """
        return self.mean_of(self.snapshot())


class MetricTracker:
    """Running means of the loss and every metric over one epoch (or one evaluation).

    Callable metrics are evaluated per batch on detached outputs and averaged weighted by batch size;
    stateful metrics (update/compute/reset) keep their own state. Extra values returned by a custom
    step are averaged like callable metrics. A metric that returns a dict of scalars (a callable, or a
    stateful metric's `compute()` such as torchmetrics' `MetricCollection`) is logged as one value per
    key, under the key itself (see `flatten_metric_value`); two metrics logging one name are an error.

    Args:
        metrics: name -> metric, as `normalize_metrics` returns.
        device: the training device, where restored running sums go (default: the CPU).

    Example:

    ```python
    tracker = MetricTracker({"mae": torch.nn.functional.l1_loss})
    tracker.update({"loss": loss}, y_pred, y, weight=len(y))
    logs = to_floats(tracker.result())  # {"loss": ..., "mae": ...}
    ```
    """

    def __init__(self, metrics: Mapping[str, MetricLike], device: torch.device | None = None) -> None:
        #: Where restored running sums go (the training device).
        self.device = device if device is not None else torch.device("cpu")
        self.metrics = dict(metrics)
        self._stateful = {n: m for n, m in self.metrics.items() if is_stateful_metric(m)}
        self._functions: dict[str, Callable[..., Any]] = {
            n: m for n, m in self.metrics.items() if n not in self._stateful
        }
        self._means: dict[str, RunningMean] = {}
        self._owners: dict[str, str] = {}  # logged name -> the metric (or step value) that logs it
        self.reset()

    def reset(self) -> None:
        """Forget every running mean and reset the stateful metrics (at the start of an epoch).

        Example:

        ```python
        tracker.reset()
        tracker.result()  # {} when there are no stateful metrics
        ```
        """
        self._means = {}
        self._stateful_seen = 0.0  # samples fed to the stateful metrics this epoch (their weight across processes)
        self._owners = {}
        for metric in self._stateful.values():
            metric.reset()

    def _add(self, name: str, value: Any, weight: float) -> None:
        if isinstance(value, Mapping):  # a metric returning a dict: each entry is a running mean of its own
            for key, item in flatten_metric_value(name, value).items():
                self._claim(key, name)
                self._add_one(key, item, weight, name)
            return
        self._add_one(name, value, weight, name)

    def _claim(self, key: str, owner: str) -> None:
        """Record that `owner` logs `key`; two metrics logging one name is an error naming both."""
        other = self._owners.setdefault(key, owner)
        if other == owner and key != owner and (key == "loss" or key in self.metrics):
            other = key  # the loss or another metric's own name (also after a resume, which claims nothing)
        if other != owner:
            raise ValueError(
                f"metrics {other!r} and {owner!r} both log {key!r}; rename one (a MetricCollection takes "
                "prefix= / postfix=)"
            )

    def _add_one(self, name: str, value: Any, weight: float, owner: str) -> None:
        mean = self._means.get(name)
        if mean is None:
            self._claim(name, owner)
            mean = self._means[name] = RunningMean()
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(float(value))
        elif value.numel() != 1:
            raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        elif value.ndim:
            value = value.reshape(())
        mean.add(value.detach(), weight)

    def update_loss(self, loss: torch.Tensor, weight: float) -> None:
        """The fast path of the default step: one scalar loss, already checked, after its backward.

        The loss is kept as it is, not detached: after `backward()` its graph has released every
        saved tensor, so what stays alive until the next fold is a few small graph nodes, and a
        `detach()` per step measurably costs more (a new tensor object per step kept alive).

        Args:
            loss: the batch's scalar loss, after `loss.backward()`.
            weight: the batch size.

        Example:

        ```python
        loss.backward()
        tracker.update_loss(loss, weight=len(x))
        ```
        """
        mean = self._means.get("loss")
        if mean is None:
            self._owners["loss"] = "loss"
            mean = self._means["loss"] = RunningMean()
        mean.add(loss, weight)

    def update(self, values: Mapping[str, Any], y_pred: Any, y: Any, weight: float) -> None:
        """Add one batch: `values` (the loss or a custom step's results) and the metrics on (y_pred, y).

        Args:
            values: name -> scalar (a number or a one-element tensor) of this batch.
            y_pred: the model's output, or None to skip the metrics.
            y: the targets.
            weight: the batch size.

        Example:

        ```python
        tracker.update({"loss": loss}, y_pred, y, weight=len(y))
        ```
        """
        for name, value in values.items():
            self._add(name, value, weight)
        self.update_metrics(y_pred, y, weight)

    def update_metrics(self, y_pred: Any, y: Any, weight: float) -> None:
        """Evaluate the metrics on one batch's outputs (detached, without autograd).

        Args:
            y_pred: the model's output (nothing is evaluated when it is None).
            y: the targets.
            weight: the batch size, the weight of the callable metrics' values.

        Example:

        ```python
        tracker.update_metrics(y_pred, y, weight=len(y))
        ```
        """
        if self.metrics and y_pred is not None:
            with torch.no_grad():
                y_pred = y_pred.detach() if isinstance(y_pred, torch.Tensor) else y_pred
                for name, function in self._functions.items():
                    self._add(name, function(y_pred, y), weight)
                for metric in self._stateful.values():
                    metric.update(y_pred, y)
                if self._stateful:
                    self._stateful_seen += weight

    def _compute(self, snapshots: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, snapshot in snapshots.items():
            mean = RunningMean.mean_of(snapshot)
            if mean is not None:
                out[name] = mean
        self._add_stateful(out)
        return out

    def _add_stateful(self, out: dict[str, Any], sources: dict[str, Any] | None = None) -> None:
        """Each stateful metric's `compute()`, flattened when it is a dict (`MetricCollection`); with
        `sources`, which metric each key came from."""
        for name, metric in self._stateful.items():
            for key, value in flatten_metric_value(name, metric.compute()).items():
                if key in out or key == "loss" or (key != name and key in self.metrics):
                    owner = self._owners.get(key, key)
                    raise ValueError(
                        f"metrics {owner!r} and {name!r} both log {key!r}; rename one (a MetricCollection "
                        "takes prefix= / postfix=)"
                    )
                out[key] = value
                if sources is not None:
                    sources[key] = metric

    def batch_logs(self) -> LazyLogs:
        """The running means as of now, computed only if a callback reads them.

        Example:

        ```python
        callbacks.on_train_batch_end(index, tracker.batch_logs())
        ```
        """
        snapshots = {name: mean.snapshot() for name, mean in self._means.items()}
        return LazyLogs(lambda: self._compute(snapshots))

    def result(self) -> dict[str, Any]:
        """The current means as 0-d tensors (no synchronisation).

        Example:

        ```python
        logs = to_floats(tracker.result())
        ```
        """
        return self._compute({name: mean.snapshot() for name, mean in self._means.items()})

    def state_dict(self) -> dict[str, Any]:
        """The state of the epoch in progress: the running means as `{name: [weighted sum, total
        weight]}` (one device sync) and each stateful metric's own state (see `metric_state`), so that
        a run resumed in the middle of an epoch logs the values of all of that epoch's batches.

        Example:

        ```python
        state = tracker.state_dict()  # e.g. {"means": {"loss": [12.5, 50.0]}, "stateful": {}}
        other = MetricTracker({})
        other.load_state_dict(state)
        ```
        """
        means = {}
        for name, mean in self._means.items():
            total, weight = mean.sum_and_weight()
            if total is not None:
                means[name] = [float(total), float(weight)]
        states = {name: metric_state(m) for name, m in self._stateful.items()}
        return {"means": means, "stateful": {name: s for name, s in states.items() if s is not None},
                "stateful_seen": self._stateful_seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict()` returned; the sums go to `self.device` (the training device).

        Args:
            state: from `state_dict()`.

        Example:

        ```python
        tracker.load_state_dict({"means": {"loss": [12.5, 50.0]}, "stateful": {}})
        tracker.result()["loss"]  # tensor(0.2500, dtype=torch.float64)
        ```
        """
        means, stateful = state["means"], state.get("stateful") or {}
        unknown = sorted(set(stateful) - set(self._stateful))
        if unknown:
            raise KeyError(f"the state has stateful metrics this run does not have: {', '.join(unknown)}")
        parsed = {}
        for name, pair in means.items():
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
                raise TypeError(f"running mean {name!r}: expected [weighted sum, total weight], received {pair!r}")
            parsed[name] = (float(pair[0]), float(pair[1]))
        device = self.device
        dtype = float_dtype(device)
        self._means = {}
        for name, (total, weight) in parsed.items():
            mean = self._means[name] = RunningMean()
            mean._sum = torch.tensor(total, dtype=dtype, device=device)
            mean._weight = weight
        for name, saved in stateful.items():
            load_metric_state(self._stateful[name], saved)
        self._stateful_seen = float(state.get("stateful_seen", 0.0))

    def reduced_result(self) -> dict[str, Any]:
        """The means over every process's samples (`result()` outside a process group).

        Under `torch.distributed` the weighted sums and weights of all running means are added up
        across processes in one all-reduce (a mean over all samples, not a mean of per-process
        means). Stateful metrics are computed by their own `compute()`. One that synchronises its
        state across processes itself (see `syncs_itself`: torchmetrics' do at `compute`) reports
        that value; for any other, the processes' values are averaged weighted by the samples each
        process fed it (in the same all-reduce), so that every decision on it is the same on every
        process: exact for means (accuracy, MAE), an approximation for others (e.g. AUC: give such a
        metric its own sync). Every process must call it at the same point.

        Example:

        ```python
        epoch_logs = to_floats(tracker.reduced_result())  # the same on every process
        ```
        """
        if not is_distributed():
            return self.result()
        values: dict[str, Any] = dict.fromkeys(self._means)  # the names taken, for the clash check
        sources: dict[str, Any] = {}
        self._add_stateful(values, sources)
        pairs: dict[str, tuple[Any, float]] = {name: mean.sum_and_weight() for name, mean in self._means.items()}
        weight = self._stateful_seen
        for key, metric in sources.items():
            value = values[key]
            scalar = isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
            if scalar and not syncs_itself(metric):
                pairs[key] = (torch.as_tensor(value).detach().reshape(()).double() * weight, weight)
        # One all-reduce; sorted so that every process packs the values in the same order.
        reduced = reduce_weighted_means({name: pairs[name] for name in sorted(pairs)})
        out: dict[str, Any] = {name: reduced[name] for name in self._means if name in reduced}
        for key in sources:
            if key in pairs:
                if key in reduced:
                    out[key] = reduced[key]
            else:
                out[key] = values[key]
        return out
