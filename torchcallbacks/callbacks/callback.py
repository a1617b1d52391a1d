"""The `Callback` base class and the loop state every callback can read."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torchcallbacks.distributed import unwrap_model

if TYPE_CHECKING:
    from torchcallbacks.callbacks.callback_list import CallbackList

Logs = MutableMapping[str, Any]

#: Every hook a callback may override, in the order a `fit` run can call them.
HOOKS = (
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_begin",
    "on_predict_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
)

#: `on_batch_begin` / `on_batch_end` are aliases that the base `on_train_batch_*` hooks call.
HOOK_ALIASES = {"on_train_batch_begin": "on_batch_begin", "on_train_batch_end": "on_batch_end"}


@dataclass
class LoopState:
    """Counters and handles of the running loop, shared by a `CallbackList` and all its callbacks.

    The `CallbackList` keeps the counters up to date from the hooks it dispatches, so they are right in
    `fit` and in a hand-written loop alike.

    Attributes:
        epoch: the current epoch, 0-based (set by `on_epoch_begin`).
        batch: index of the current training batch within the epoch; -1 before the first one.
        global_step: training batches completed since training started (restored on resume).
        initial_epoch: the epoch training starts at. A callback may move it in `on_train_begin`
            (`BackupAndRestore` does, to resume); `fit` reads it after `on_train_begin`.
        initial_batch: batches of `initial_epoch` already trained before a resume; `fit` skips them.
        resume_hook: called by `fit` once those batches are skipped, right before the next batch is
            fetched (`BackupAndRestore` restores the random state there, so that the data loader's
            per-batch draws match the interrupted run). Reset to None at every `fit` call.
        exception: the exception that ended training, or None. Set before `on_train_end` runs, so
            callbacks can tell a normal finish from a crash.
        scaler: the `torch.amp.GradScaler` in use, if any.
        metrics_state: returns `fit`'s running means of the epoch in progress as JSON-able data
            (kept in mid-epoch backups); None outside `fit`. A function, not the tracker itself, so
            that `copy.deepcopy(model)` (which reaches this state through `model.history`) never
            copies the loss tensors it holds.
        load_metrics_state: puts back what `metrics_state` returned; None outside `fit`.
        callbacks: the `CallbackList` that owns this state.
    """

    epoch: int = 0
    batch: int = -1
    global_step: int = 0
    initial_epoch: int = 0
    initial_batch: int = 0
    resume_hook: Callable[[], None] | None = None
    exception: BaseException | None = None
    scaler: Any = None
    metrics_state: Callable[[], dict[str, Any]] | None = None
    load_metrics_state: Callable[[dict[str, Any]], None] | None = None
    callbacks: CallbackList | None = field(default=None, repr=False)


class Callback:
    """Base class for callbacks; every hook does nothing until a subclass overrides it.

    A callback sees a small surface of the loop: `self.model` (the plain `nn.Module`, unwrapped from
    DistributedDataParallel), `self.optimizer`, `self.params` (`verbose`, `epochs`, `steps`, ...) and
    `self.loop` (a `LoopState` with the epoch, batch and global-step counters). Nothing else of the
    loop, which is why the same object works in `fit` and in a hand-written loop driven through a
    `CallbackList`. Hooks that a subclass does not override are never called, so they cost nothing.

    To stop training, set `self.model.stop_training = True` (the Keras idiom). Under
    `torch.distributed` the flag is combined over processes ("stop if any process says stop") at the
    end of every epoch; a callback that may stop in a training-batch hook makes the `CallbackList`
    combine it after every batch too, unless it sets `stops_in_sync = True` (see below).

    Stateful callbacks override `state_dict()` / `load_state_dict()` with JSON-able content, so that
    a resumed run continues with the same state.

    Example:

    ```python
    class PrintLoss(torchcallbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            print(f"epoch {epoch}: loss={logs['loss']:.4f}")

    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, callbacks=[PrintLoss()])
    ```
    """

    #: True when this callback never sets `stop_training` in a training-batch hook, or only on a
    #: decision that is already identical on every process (e.g. taken with
    #: `torchcallbacks.distributed.any_process`, as `TerminateOnNaN` does). Under `torch.distributed`
    #: a `CallbackList` holding a callback that overrides a training-batch hook without this mark
    #: all-reduces the stop flag after every training batch (a small collective per batch); the
    #: built-in callbacks carry the mark, so the default configuration has no per-batch collective.
    #: Set it on a class or an instance (e.g. a `LambdaCallback` that only prints).
    stops_in_sync: bool = False

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self._model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.loop: LoopState = LoopState()

    # -- wiring ---------------------------------------------------------------------------------
    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def set_model(self, model: torch.nn.Module | None) -> None:
        self._model = unwrap_model(model) if model is not None else None

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer

    def set_loop(self, loop: LoopState) -> None:
        self.loop = loop

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            raise AttributeError(
                f"{type(self).__name__}.model is not set: pass the model to fit() or to CallbackList(model=...)"
            )
        return self._model

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state that a resumed run needs. Empty for stateless callbacks."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned."""

    # -- hooks ----------------------------------------------------------------------------------
    def on_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Alias of `on_train_batch_begin`, kept for Keras compatibility."""

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Alias of `on_train_batch_end`, kept for Keras compatibility."""

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        """Called at the start of an epoch (training only)."""

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        """Called at the end of an epoch; `logs` hold the epoch means and the `val_` results."""

    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before a training batch. Calls `on_batch_begin` unless overridden."""
        self.on_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after a training batch; `logs` hold running means over the epoch so far.

        Values may be 0-d tensors that are computed only when read: reading one is a device sync.
        """
        self.on_batch_end(batch, logs)

    def on_test_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before a batch in `evaluate` (and in validation inside `fit`)."""

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after a batch in `evaluate` (and in validation inside `fit`)."""

    def on_predict_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before a batch in `predict`."""

    def on_predict_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after a batch in `predict`; `logs["outputs"]` holds the batch's outputs."""

    def on_train_begin(self, logs: Logs | None = None) -> None:
        """Called once when training starts."""

    def on_train_end(self, logs: Logs | None = None) -> None:
        """Called once when training ends, also when it ends by an exception (`self.loop.exception`)."""

    def on_test_begin(self, logs: Logs | None = None) -> None:
        """Called when evaluation (or validation inside `fit`) starts."""

    def on_test_end(self, logs: Logs | None = None) -> None:
        """Called when evaluation (or validation inside `fit`) ends, with the results (no `val_` prefix)."""

    def on_predict_begin(self, logs: Logs | None = None) -> None:
        """Called when prediction starts."""

    def on_predict_end(self, logs: Logs | None = None) -> None:
        """Called when prediction ends."""


def overrides(callback: Callback, hook: str) -> bool:
    """Whether `callback` does something in `hook`: a subclass override, an instance attribute
    (as `LambdaCallback` sets), or an override of the hook's Keras alias."""
    if hook in vars(callback) or getattr(type(callback), hook) is not getattr(Callback, hook):
        return True
    alias = HOOK_ALIASES.get(hook)
    return alias is not None and overrides(callback, alias)
