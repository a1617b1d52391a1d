"""`MonitorCallback`: the one place that knows monitor, mode, min_delta and "is this better".

ModelCheckpoint, EarlyStopping and ReduceLROnPlateau derive from it, so they read the monitored value,
resolve `mode="auto"` and compare values by the same rules. LearningRateScheduler, which only reads a
value for torch's ReduceLROnPlateau, uses `monitored_value` alone.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Mapping

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.checks import check_number
from torchcallbacks.logs import to_float

#: Metric names (after removing a `val_` prefix) whose better values are higher. A name also matches
#: when it ends with one of them after an underscore, e.g. `top5_accuracy`, `macro_f1`, and with a
#: `_score` suffix (`f1_score`, `r2_score`).
HIGHER_IS_BETTER = ("accuracy", "acc", "auc", "f1", "precision", "recall", "iou", "dice", "r2")
#: Metric names whose better values are lower; `loss` and anything ending in `_loss` too.
LOWER_IS_BETTER = (
    "loss", "mse", "mae", "rmse", "msle", "mape", "error", "perplexity", "hinge", "crossentropy",
)

MODES = ("auto", "min", "max")


def _matches(name: str, names: tuple[str, ...]) -> bool:
    name = name.removesuffix("_score") or name
    return any(name == n or name.endswith("_" + n) for n in names)


def infer_mode(monitor: str, metric_directions: Mapping[str, str | None] | None = None) -> str:
    """'min' or 'max' for a monitored name under `mode="auto"`.

    A direction declared by the metric (see `fit`'s `metrics`) wins; then `loss`-like names mean
    min and accuracy-like names mean max. Anything else is a ValueError naming the monitor.
    """
    name = monitor[4:] if monitor.startswith("val_") else monitor
    declared = (metric_directions or {}).get(name)
    if declared in ("min", "max"):
        return str(declared)
    if _matches(name, LOWER_IS_BETTER):
        return "min"
    if _matches(name, HIGHER_IS_BETTER):
        return "max"
    raise ValueError(
        f"monitor={monitor!r}: cannot tell whether higher or lower is better. Pass mode='min' or "
        f"mode='max', or declare it on the metric (e.g. `metric.mode = 'max'`)."
    )


def monitored_value(callback: Callback, monitor: str, mode: str, logs: Logs | None, *, has_mode: bool = True) -> float | None:
    """The value `callback` monitors, as a float, or None when the logs do not have it.

    A missing value is an error with `mode="auto"` (as in Keras 3, where such a monitor stops the
    run): a ValueError naming the monitor and the available keys, raised at the first epoch (or
    batch) end whose logs lack it, which catches a misspelt name such as `"val_acc"` for
    `"val_accuracy"`. One case only warns: a `val_` monitor when the logs hold no `val_` value at
    all, i.e. validation did not run then (no validation data, `validation_freq > 1`, or batch
    logs). With an explicit `mode`, or in that case, a missing value warns once per run (the
    callback's `_warned_missing`, reset at train begin), listing the available keys, and None is
    returned: the caller skips this epoch.

    Args:
        callback: the callback that reads it (named in messages; remembers the warning).
        monitor: the logged name.
        mode: "auto", "min" or "max".
        logs: the epoch or batch logs.
        has_mode: whether the callback takes a `mode` argument (the error then suggests one).

    Example:

    ```python
    value = monitored_value(self, "val_loss", "auto", logs)
    ```
    """
    logs = logs or {}
    value = logs.get(monitor)
    if value is not None:
        return to_float(value)
    name = type(callback).__name__
    keys = ", ".join(sorted(logs)) or "(none)"
    validated = any(key.startswith("val_") for key in logs)
    if mode == "auto" and (validated or not monitor.startswith("val_")):
        hint = ", or pass mode='min' or mode='max' to warn and skip the epochs that lack it instead" if has_mode else ""
        raise ValueError(f"{name}: the monitored value {monitor!r} is not in the logs; available keys: {keys}. Monitor one of them{hint}.")
    if not getattr(callback, "_warned_missing", False):
        callback._warned_missing = True  # type: ignore[attr-defined]
        warnings.warn(f"{name}: the monitored value {monitor!r} is not in the logs; available keys: {keys}", stacklevel=4)
    return None


class MonitorCallback(Callback):
    """Base class for callbacks that watch one logged value.

    Args:
        monitor: the logged name to watch, e.g. "val_loss".
        mode: "min", "max" or "auto" (inferred from the name or the metric's declared direction).
            An unknown mode warns and becomes "auto", as in Keras.
        baseline: the starting value of `best`, if any.
        min_delta: the smallest change that counts as an improvement.

    Attributes:
        best: the best value seen so far (or the baseline).
        monitor_op: `monitor_op(a, b)` is True when `a` is strictly better than `b`.

    Example:

    ```python
    class SaveWhenBetter(MonitorCallback):
        def on_epoch_end(self, epoch, logs=None):
            current = self.get_monitor_value(logs)
            if current is not None and self._is_improvement(current, self.best):
                self.best = current
                torchcallbacks.save_weights(self.model, "best.safetensors")
    ```
    """

    def __init__(
        self, monitor: str = "val_loss", mode: str = "auto", baseline: float | None = None, min_delta: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor: expected the name of a logged value, received {monitor!r}")
        if mode not in MODES:
            warnings.warn(
                f"{type(self).__name__} mode {mode!r} is unknown, falling back to 'auto'", stacklevel=2
            )
            mode = "auto"
        self.monitor = monitor
        self.mode = mode
        self.baseline = None if baseline is None else check_number(baseline, "baseline")
        self.best: float | None = self.baseline
        self.min_delta = abs(check_number(min_delta, "min_delta"))
        self._resolved_mode: str | None = None
        self._warned_missing = False

    @property
    def resolved_mode(self) -> str:
        """'min' or 'max', resolving 'auto' (raises ValueError when it cannot be resolved)."""
        if self._resolved_mode is None:
            mode = self.mode
            self._resolved_mode = infer_mode(self.monitor, self.params.get("metric_directions")) if mode == "auto" else mode
        return self._resolved_mode

    @property
    def monitor_op(self) -> Callable[[float, float], bool]:
        """`monitor_op(a, b)` is True when `a` is strictly better than `b` (`<` for min, `>` for max)."""
        return operator.lt if self.resolved_mode == "min" else operator.gt

    def _is_improvement(self, monitor_value: float, reference_value: float | None) -> bool:
        """`monitor_value` beats `reference_value` by more than `min_delta` (min: `value + min_delta <
        reference`, max: `value - min_delta > reference`); anything beats None."""
        if reference_value is None:
            self.resolved_mode  # noqa: B018 (an unresolvable mode fails here, at the first value)
            return True
        delta = self.min_delta if self.resolved_mode == "min" else -self.min_delta
        return self.monitor_op(monitor_value + delta, reference_value)

    def reset_monitor(self) -> None:
        """Forget the warning state of an earlier run; call from `on_train_begin`."""
        self._warned_missing = False

    def get_monitor_value(self, logs: Logs | None) -> float | None:
        """The monitored value as a float, or None when the logs do not have it (see
        `monitored_value`: with `mode="auto"` a missing value is a ValueError, else it warns once)."""
        return monitored_value(self, self.monitor, self.mode, logs)

    def identity(self) -> dict[str, str]:
        """`monitor` (and `mode` unless "auto"): two monitors of one class keep separate states."""
        return {"monitor": self.monitor} if self.mode == "auto" else {"monitor": self.monitor, "mode": self.mode}

    # The "warned once" flag is per run.
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.reset_monitor()
