"""`TrackerCallback`: what `MLflowLogger` and `WandbLogger` share.

A tracker callback is a logger like `CSVLogger`: it runs on the main process only, its batch hook is
idle when no batch is due (`update_freq="epoch"`), and its run id and the last step it logged are its
callback state, so that a job resumed by `BackupAndRestore` continues the same run and logs each
step once. The subclasses only say how to talk to their tracker (`_open`, `_write`, `_close`, ...).
"""

from __future__ import annotations

import importlib
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, TypeVar

import torch

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.callbacks.learning_rate import LEARNING_RATE, all_lrs
from torchcallbacks.checks import check_number, check_update_freq
from torchcallbacks.distributed import main_process_only
from torchcallbacks.logs import to_float, to_floats

_T = TypeVar("_T")

#: Prefix of the batch logs' names (as `TensorBoard` names its batch scalars).
BATCH_PREFIX = "batch_"
#: Prefix of a standalone `evaluate()`'s results (as `TensorBoard`'s `evaluation_<name>_vs_iterations`).
EVALUATION_PREFIX = "evaluation_"


def import_extra(module: str, extra: str, owner: str) -> Any:
    """Import an optional dependency, or raise an ImportError naming the extra that installs it.

    Args:
        module: the module to import, e.g. `"mlflow"`.
        extra: the torchcallbacks extra that installs it, e.g. `"mlflow"`.
        owner: the class that needs it, for the message.

    Example:

    ```python
    mlflow = import_extra("mlflow", "mlflow", "MLflowLogger")
    ```
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{owner} needs the {module!r} package, which is not installed: pip install torchcallbacks[{extra}]"
        ) from exc


def _check_log_models(log_models: Any, owner: str) -> str | bool:
    if log_models is False or log_models is None:
        return False
    if log_models is True:
        return "all"
    if log_models in ("best", "all"):
        return str(log_models)
    raise ValueError(f"{owner}: log_models must be 'best', 'all' or False, received {log_models!r}")


def _param_value(value: Any) -> Any:
    """A hyperparameter as a loggable value: numbers, strings and bools as they are, tensors as
    numbers, tuples and lists of those as lists, anything else as its `repr`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return to_float(value)
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_param_value(v) for v in value]
    return repr(value)


class TrackerCallback(Callback):
    """Base of the experiment-tracker callbacks (`MLflowLogger`, `WandbLogger`).

    Subclasses implement `_open(run_id)` (start or continue a run, return its id), `_held()` (the
    steps the run already holds), `_write(rows)`, `_write_params(params)`, `_write_file(path, name)`
    and `_close(status)`. Every call to the tracker goes through `_call`: an error becomes one warning
    and the logger stops logging (training goes on), unless `strict=True`.

    Args:
        update_freq: "epoch" to log epoch logs only; "batch" or an integer n to also log the batch
            logs every n training batches (at the global step, 1-based).
        log_params: log the run's parameters when a run starts.
        log_models: "best" logs `ModelCheckpoint`'s best file, "all" every file it saves, False none.
        strict: raise the tracker's errors instead of warning once and going on without it.
        flush_secs: epoch logs wait in a buffer until this many seconds passed since the last write
            (the first epoch's are written at once; 0: every epoch's at its end). A write costs a tracker's client milliseconds (MLflow's
            SQL store: about 4 ms, 10 million instructions), more than a short epoch; the buffer is
            also written by every backup of the training state, at train end and after an error, so
            a resumed run never misses a step.

    Example:

    ```python
    class PrintTracker(TrackerCallback):  # what a backend implements
        def _open(self, run_id): return run_id or "run-1"
        def _held(self): return {}, -1
        def _write(self, rows): print(rows)
        def _write_params(self, params): print(params)
        def _write_file(self, path, name): print(path)
        def _close(self, status): print(status)
    ```
    """

    #: The extra that installs the tracker's package and the class's name, for messages.
    extra = ""
    #: MLflow steps epoch logs by epoch (a key has one history); W&B has one step for all (the global step).
    epoch_steps_by_epoch = True

    def __init__(
        self,
        update_freq: str | int = "epoch",
        log_params: bool = True,
        log_models: str | bool = False,
        strict: bool = False,
        flush_secs: float = 5.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.flush_secs = check_number(flush_secs, f"{name}: flush_secs")
        if self.flush_secs < 0:
            raise ValueError(f"{name}: flush_secs must be >= 0, received {flush_secs!r}")
        self._flushed_at = -math.inf  # time.monotonic() of the last write
        self.update_freq = check_update_freq(update_freq, name)
        self.log_params = bool(log_params)
        self.log_models = _check_log_models(log_models, name)
        self.strict = bool(strict)
        self.run_id: str | None = None  # the run being logged to (or last logged to)
        self._saved: dict[str, Any] | None = None  # the state a restore phase gave
        self._open_run = False
        self._broken = False
        self._training = False
        self._trained_steps = 0
        self._last_step = -1  # the last global step logged (batch rows, and epoch rows of W&B)
        self._last_epoch = -1  # the last epoch whose logs were logged
        self._floor_step = -1  # a resumed run holds every step up to here already
        self._floor_epoch = -1
        self._held_keys: dict[str, int] = {}  # key -> the last step the tracker holds (resumed runs)
        self._pending: list[tuple[int, dict[str, float], int | None]] = []  # (step, values, epoch)
        self._epoch_lr: dict[str, Any] | None = None
        self._models_logged: dict[str, list[int]] = {}  # path -> [mtime_ns, size] when logged

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run id and the last step and epoch logged. Pending batch rows are sent first, so a
        backup never says a step was logged that the tracker does not hold."""
        self._flush()
        return {"run_id": self.run_id, "step": self._last_step, "epoch": self._last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        run_id = state_dict.get("run_id")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise TypeError(f"{type(self).__name__} state 'run_id': expected None or a non-empty string, received {run_id!r}")
        for key in ("step", "epoch"):
            value = state_dict.get(key, -1)
            if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                raise ValueError(f"{type(self).__name__} state {key!r}: expected an integer >= -1, received {value!r}")
        self._saved = {"run_id": run_id, "step": state_dict.get("step", -1), "epoch": state_dict.get("epoch", -1)}

    # -- the tracker, guarded -------------------------------------------------------------------
    def _call(self, what: str, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
        """`function(*args, **kwargs)`; a failure warns once and turns the logger off (or raises with
        `strict=True`)."""
        if self._broken:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            if self.strict:
                raise
            self._broken = True
            self._pending = []
            warnings.warn(
                f"{type(self).__name__}: {what} failed ({type(exc).__name__}: {exc}); training goes on without "
                f"logging to the tracker (pass strict=True to raise instead)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    # -- what a backend implements --------------------------------------------------------------
    def _open(self, run_id: str | None) -> str:  # pragma: no cover - abstract
        """Start a run (`run_id` None) or continue the run `run_id`; return the run's id."""
        raise NotImplementedError

    def _held(self) -> tuple[dict[str, int], int]:  # pragma: no cover - abstract
        """What a continued run already holds: the last step of each key, and the last global step."""
        raise NotImplementedError

    def _write(self, rows: list[tuple[int, dict[str, float], int | None]]) -> None:  # pragma: no cover
        """Log rows of `(step, values, epoch or None)`; `step` is the global step for batch rows and
        W&B's epoch rows, the epoch for MLflow's."""
        raise NotImplementedError

    def _write_params(self, params: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write_file(self, path: str, best: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close(self, status: str) -> None:  # pragma: no cover - abstract
        """End the run: `status` is "FINISHED", "FAILED" or "KILLED"."""
        raise NotImplementedError

    # -- run parameters -------------------------------------------------------------------------
    def run_params(self) -> dict[str, Any]:
        """The parameters logged when a run starts: fit's `epochs`, `steps` (per epoch) and `loss`
        (its name: `params["loss"]`), the training loader's `batch_size`, `gradient_accumulation_steps` when set, each optimizer's class
        and hyperparameters (`optimizer/lr`, ... of its first parameter group; `optimizer/group_<j>/...`
        of the others; `optimizer_<i>` for the i-th optimizer) and `callbacks`, the `state_key` of
        every callback in the list (its class and identifying arguments)."""
        params: dict[str, Any] = {}
        for key in ("epochs", "steps", "gradient_accumulation_steps", "loss"):
            if self.params.get(key) is not None:
                params[key] = self.params[key]
        data = getattr(self.loop.parts.get("data"), "data", None)
        batch_size = getattr(data, "batch_size", None)
        if isinstance(batch_size, int):
            params["batch_size"] = batch_size
        for i, optimizer in enumerate(self.optimizers):
            prefix = "optimizer" if i == 0 else f"optimizer_{i}"
            params[prefix] = type(optimizer).__name__
            for j, group in enumerate(getattr(optimizer, "param_groups", [])):
                where = prefix if j == 0 else f"{prefix}/group_{j}"
                params.update({f"{where}/{k}": _param_value(v) for k, v in group.items() if k != "params"})
        if self.loop.callbacks is not None:
            params["callbacks"] = [c.state_key for c in self.loop.callbacks if c is not self] + [self.state_key]
        return params

    # -- starting and ending --------------------------------------------------------------------
    def _start(self, resumed_state: Mapping[str, Any] | None, user_id: str | None) -> None:
        """Open a run: the user's id wins, else a resumed state's, else a new run."""
        saved_id = resumed_state.get("run_id") if resumed_state else None
        run_id = user_id or saved_id
        self._floor_step, self._floor_epoch, self._held_keys = -1, -1, {}
        if resumed_state is not None and run_id == saved_id:
            self._floor_step, self._floor_epoch = resumed_state["step"], resumed_state["epoch"]
        opened = self._call("starting the run", self._open, run_id)
        if opened is None:
            return
        self.run_id, self._open_run = opened, True
        self._last_step, self._last_epoch = self._floor_step, self._floor_epoch
        if run_id is not None:  # a continued run: ask it what it holds, so no step is logged twice
            held = self._call("reading the run's history", self._held)
            if held is not None:
                self._held_keys, last = held
                self._floor_step = max(self._floor_step, last)
        elif self.log_params:
            self._call("logging the run's parameters", self._write_params, self.run_params())

    @main_process_only
    def on_train_begin(self, logs: Logs | None = None) -> None:
        saved, self._saved = self._saved, None
        self._training = True
        self._epoch_lr = None
        self._start(saved if self.loop.resumed else None, self._user_id())

    def _user_id(self) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _status(self) -> str:
        error = self.loop.exception
        if error is None:
            return "FINISHED"
        return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"

    def _end(self) -> None:
        if not self._open_run:
            return
        self._flush()
        self._log_models(final=True)
        self._open_run = False
        self._call("ending the run", self._close, self._status())

    @main_process_only
    def on_train_end(self, logs: Logs | None = None) -> None:
        try:
            self._end()
        finally:
            self._trained_steps = self.loop.global_step
            self._training = False

    # -- logging --------------------------------------------------------------------------------
    def _due(self, key: str, step: int, floor: int) -> bool:
        return step > floor and step > self._held_keys.get(key, -1)

    def _queue(self, step: int, values: Mapping[str, Any], epoch: int | None) -> None:
        """Add a row (numbers only), leaving out what a resumed run already holds."""
        floor = self._floor_epoch if (epoch is not None and self.epoch_steps_by_epoch) else self._floor_step
        if epoch is not None and epoch <= self._floor_epoch:
            return
        row = {k: float(v) for k, v in values.items() if isinstance(v, Real) and not isinstance(v, bool) and self._due(k, step, floor)}
        if row:
            self._pending.append((step, row, epoch))

    def _flush(self) -> None:
        if not self._pending or not self._open_run:
            self._pending = []
            return
        rows, self._pending = self._pending, []
        self._flushed_at = time.monotonic()
        if self._call("logging metrics", self._write, rows) is None and self._broken:
            return
        for step, _, epoch in rows:
            if epoch is None or not self.epoch_steps_by_epoch:
                self._last_step = max(self._last_step, step)
            if epoch is not None:
                self._last_epoch = max(self._last_epoch, epoch)

    def idle_hooks(self) -> frozenset[str]:
        """The batch hook when no batch is logged (`update_freq="epoch"`) or the tracker failed."""
        if self._broken:
            return frozenset({"on_train_batch_end", "on_epoch_begin", "on_epoch_end", "on_test_begin", "on_test_end"})
        return frozenset({"on_train_batch_end"}) if self.update_freq == "epoch" else frozenset()

    @main_process_only
    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        # The rates the epoch trains with, read after the schedules' epoch begin (as TensorBoard).
        rates = all_lrs([o for o in self.optimizers if isinstance(o, torch.optim.Optimizer)])
        self._epoch_lr = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in rates.items()}

    @main_process_only
    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self.loop.at_every(self.update_freq) and self._open_run:
            step = self.loop.global_step
            values = to_floats(logs)  # the only read of the lazy logs: on logged batches only
            self._queue(step, {BATCH_PREFIX + k: v for k, v in values.items()}, None)
            if len(self._pending) >= 1000:
                self._flush()

    @main_process_only
    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if not self._open_run:
            return
        values = to_floats(logs)
        if LEARNING_RATE not in values and self._epoch_lr is not None:
            values.update({k: to_float(v) for k, v in self._epoch_lr.items()})
        step = epoch if self.epoch_steps_by_epoch else self.loop.global_step
        self._queue(step, values, epoch)
        if time.monotonic() - self._flushed_at >= self.flush_secs:
            self._flush()
        self._log_models(final=False)

    # -- evaluate -------------------------------------------------------------------------------
    @main_process_only
    def on_test_end(self, logs: Logs | None = None) -> None:
        if self._training:
            return  # validation inside fit: its results are the epoch's val_ logs
        values = {EVALUATION_PREFIX + k: v for k, v in to_floats(logs).items()}
        self._start(None, self._user_id() or self.run_id)
        if not self._open_run:
            return
        self._floor_step, self._floor_epoch, self._held_keys = -1, -1, {}  # an evaluation is logged as it is
        self._pending.append((self._trained_steps, {k: float(v) for k, v in values.items() if isinstance(v, Real)}, None))
        self._flush()
        self._open_run = False
        self._call("ending the run", self._close, "FINISHED")

    # -- models ---------------------------------------------------------------------------------
    def _log_models(self, final: bool) -> None:
        """Log the files `ModelCheckpoint` committed since the last call ("all"), or its best file
        when it changed ("best")."""
        if not self.log_models or self.loop.callbacks is None:
            return
        from torchcallbacks.callbacks.model_checkpoint import ModelCheckpoint

        for checkpoint in self.loop.callbacks:
            if not isinstance(checkpoint, ModelCheckpoint):
                continue
            paths = checkpoint.committed_paths()
            if self.log_models == "best":
                paths = [p for p in paths if p == checkpoint.best_path]
            for path in paths:
                stat = os.stat(path)
                seen = [stat.st_mtime_ns, stat.st_size]
                if self._models_logged.get(path) == seen:
                    continue
                if self._call(f"logging the model file {path!r}", self._write_file, path, self.log_models == "best") is None and self._broken:
                    return
                self._models_logged[path] = seen
