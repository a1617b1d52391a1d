"""The `Callback` base class and the loop state every callback can read."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.loop_state import LoopState
from torchcallbacks.distributed import unwrap_model

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

    Stateful callbacks override `state_dict()` / `load_state_dict()`, so that a resumed run continues
    with the same state. A state holds numbers, strings, lists, dicts and tensors (tensors are stored
    as tensors in training-state files). It is saved under `state_key` and loaded in the restore
    phase, before any callback's `on_train_begin`: `load_state_dict` must only keep the state (the
    model is loaded after it), and `on_train_begin` starts afresh unless `self.loop.resumed`. Under
    FSDP2 a state may hold `DTensor`s (local shards, e.g. a snapshot of the weights); such a callback
    also overrides `state_template()`, which gives the tensors a sharded checkpoint is read into.

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

    #: Where the callback's hooks run among the others: lower first, list order within one value.
    #: `SwapEMAWeights` (-1) swaps weights before anyone reads them; `ModelCheckpoint` (1) and
    #: `BackupAndRestore` (2) save after every other callback's update, so no list order matters.
    dispatch_order: int = 0

    #: Public attributes that are not state: worked out again by every run (e.g. from the files on
    #: disk), so they may differ between a resumed run and an uninterrupted one. `verify_resume`'s
    #: check of callback attributes leaves them out; every other public attribute of plain data that
    #: differs after a resume is reported as state that `state_dict` does not return.
    transient_attributes: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self._model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.loop: LoopState = LoopState()
        self._state_key: str | None = None

    # -- wiring ---------------------------------------------------------------------------------
    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def set_model(self, model: torch.nn.Module | None) -> None:
        self._model = unwrap_model(model) if model is not None else None

    def set_optimizer(self, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None) -> None:
        """Set `self.optimizers` (every optimizer) and `self.optimizer` (the first, or None)."""
        self.optimizers = optimizer_list(optimizer)
        self.optimizer = self.optimizers[0] if self.optimizers else None

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
    @property
    def state_key(self) -> str:
        """The key this callback's state is saved under: the class name and the arguments that tell
        two instances apart (`identity()`), e.g. `"EarlyStopping[monitor=val_loss]"`. Assign a string to
        choose another (a `CallbackList` adds `#2`, `#3` to keys that repeat)."""
        if self._state_key is not None:
            return self._state_key
        args = ",".join(f"{k}={v}" for k, v in self.identity().items())
        return f"{type(self).__name__}[{args}]" if args else type(self).__name__

    @state_key.setter
    def state_key(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise TypeError(f"state_key: expected a non-empty string, received {value!r}")
        self._state_key = value

    def identity(self) -> dict[str, Any]:
        """The arguments that tell this callback apart from another of its class (for `state_key`)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs (numbers, strings, lists, dicts, tensors). Empty for
        stateless callbacks."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep what `state_dict()` returned (called in the restore phase, before the model is loaded)."""

    def state_template(self, saved: dict[str, Any]) -> dict[str, Any]:
        """For a sharded (FSDP2) checkpoint: the tensors to read this callback's saved `DTensor`s into.

        A sharded checkpoint (`checkpoint.sharded`) stores a `DTensor` as the shards of every
        process, and each process can only read its own shards into a `DTensor` it already has, of the
        saved global shape and dtype and of the placements it needs here. This returns those: a tree of
        the saved state's structure (`saved`, read from the checkpoint before any tensor: every tensor
        is None there) holding a new `DTensor` at each place where the state saved one, e.g. copies of
        the model's shards for a snapshot of the weights. Plain tensors need no template (they are
        read as new tensors), nor do other values. What is read into the template is then given to
        `load_state_dict` as usual. Never return the live model parameters: the checkpoint is read
        into the template before anything is checked. The default, `{}`, is right for a state
        without `DTensor`s.

        Args:
            saved: this callback's saved state, its tensors not read yet (None).

        Example:

        ```python
        def state_template(self, saved):
            if saved.get("average") is None:
                return {}
            return {"average": {k: t.detach().clone() for k, t in self.model.state_dict().items()}}
        ```
        """
        return {}

    def idle_hooks(self) -> frozenset[str]:
        """Hooks this callback overrides but has nothing to do in, as it is configured now; a
        `CallbackList` does not call them (as Keras 2's `_implements_train_batch_hooks()` tells its
        list), so that, e.g., a per-epoch schedule costs nothing per batch. The list reads it when it
        builds its dispatch table: when it is made or appended to, at train begin, and after every
        `on_epoch_begin` (so a callback done with its batch work, say a graph written at the first
        batch, goes idle from the next epoch). The default, none, is right for most callbacks.

        Example:

        ```python
        def idle_hooks(self):
            return frozenset() if self.per_batch else frozenset({"on_train_batch_begin"})
        ```
        """
        return frozenset()

    def restore(self) -> None:
        """The restore phase: called by `CallbackList.on_train_begin` before any callback's
        `on_train_begin`. A callback that resumes runs (`BackupAndRestore`) loads the training state here
        with `self.loop.load_state_dict(...)`."""

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


def optimizer_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    """`None`, one optimizer or a sequence of them, as a list.

    Args:
        optimizer: what `fit(optimizer=...)` or `CallbackList(optimizer=...)` was given.

    Example:

    ```python
    optimizer_list(torch.optim.SGD(model.parameters(), lr=0.1))  # a list of one
    ```
    """
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
