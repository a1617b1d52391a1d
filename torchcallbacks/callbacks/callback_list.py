"""`CallbackList`: one object that dispatches every hook to a list of callbacks."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.callback import HOOKS, Callback, Logs, overrides
from torchcallbacks.callbacks.history import History
from torchcallbacks.callbacks.loop_state import LoopState, apply_states
from torchcallbacks.callbacks.progbar_logger import ProgbarLogger
from torchcallbacks.distributed import (
    any_process,
    dispatched_hook,
    is_distributed,
    is_main_process,
    unwrap_model,
)


def _flatten(callbacks: Any) -> Iterator[Any]:
    for item in callbacks:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


class CallbackList(Callback):
    """Container that dispatches each hook to its callbacks, in order.

    It is what `fit` uses, and what a hand-written loop uses to drive the same callbacks. Hooks that
    no callback overrides are skipped at dispatch, so they cost nothing. The list keeps the loop
    counters in `self.loop` (epoch, batch, global step) up to date from the hooks it dispatches.

    Under `torch.distributed` (torchrun) `stop_training` is the same on every process at the points a
    loop checks it: `on_train_begin` and `on_epoch_end` end with one all-reduce of the flag ("stop if
    any process says stop"); `on_epoch_begin` and `on_train_batch_end` do the same only when a
    callback that overrides that hook (a training-batch hook, for the latter) is not marked
    `stops_in_sync` (no built-in callback needs it, so by default the batch loop has no collective). Every process must therefore call these hooks at the same points, as a
    hand-written loop that checks `callbacks.stop_training` right after them does. Epoch logs
    should be the same on every process too (`fit` reduces them; a hand-written loop can use
    `torchcallbacks.distributed.reduce_logs`), so that decisions on them agree.

    Args:
        callbacks: callbacks, possibly in nested lists (they are flattened).
        add_history: append a `History` unless one is already in the list.
        add_progbar: append a `ProgbarLogger` unless one is already in the list.
        model: the model the callbacks act on (a DDP-wrapped model is unwrapped for them).
        optimizer: the optimizer the callbacks may read or adjust (e.g. its learning rate), or a list
            of them (callbacks see all as `self.optimizers`, the first as `self.optimizer`).
        **params: the run's parameters, e.g. `epochs`, `steps`, `verbose`.

    Example:

    ```python
    callbacks = CallbackList([EarlyStopping(patience=3)], model=model, optimizer=optimizer,
                             epochs=20, steps=len(loader))
    callbacks.on_train_begin()
    for epoch in range(20):
        callbacks.on_epoch_begin(epoch)
        for i, (x, y) in enumerate(loader):
            callbacks.on_train_batch_begin(i)
            loss = train_step(x, y)
            callbacks.on_train_batch_end(i, {"loss": loss})
        callbacks.on_epoch_end(epoch, {"loss": epoch_loss})
        if callbacks.stop_training:
            break
    callbacks.on_train_end()
    ```
    """

    def __init__(
        self,
        callbacks: Iterable[Callback] | None = None,
        add_history: bool = False,
        add_progbar: bool = False,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        self.callbacks: list[Callback] = []
        self.loop = LoopState(callbacks=self)
        self._stop_training = False
        self._dispatch: dict[str, list[Any]] = {}
        self._dispatch_main = True
        self._idle_changes = False  # some callback has idle hooks, read again after every epoch begin
        self._overridden: list[tuple[Callback, list[str]]] = []
        self._batch_stop_sync = False
        self._history: History | None = None
        self._progbar: ProgbarLogger | None = None
        self.params = dict(params)
        self._model = unwrap_model(model) if model is not None else None
        self.loop.model = self._model
        self.set_optimizer(optimizer)
        for callback in _flatten(callbacks or []):
            self._add(callback)
        self.add_defaults(add_history, add_progbar)

    def add_defaults(self, add_history: bool, add_progbar: bool) -> None:
        """Append a `History` / a `ProgbarLogger` unless the list has one (what `fit` asks for).

        Args:
            add_history: add a `History` when there is none.
            add_progbar: add a `ProgbarLogger` when there is none.

        Example:

        ```python
        callbacks = CallbackList([EarlyStopping()])
        callbacks.add_defaults(add_history=True, add_progbar=False)
        callbacks.history  # the History that was added
        ```
        """
        if add_history:
            self._history = next((c for c in self.callbacks if isinstance(c, History)), None)
            if self._history is None:
                self._history = History()
                self._add(self._history)
        if add_progbar:
            self._progbar = next((c for c in self.callbacks if isinstance(c, ProgbarLogger)), None)
            if self._progbar is None:
                self._progbar = ProgbarLogger()
                self._add(self._progbar)
        self._rebuild_dispatch()

    # -- membership -----------------------------------------------------------------------------
    def _add(self, callback: Any) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks: expected torchcallbacks.Callback instances, received {type(callback).__name__} "
                f"({callback!r})"
            )
        callback.set_loop(self.loop)
        callback.set_params(self.params)
        callback.set_model(self._model)
        callback.set_optimizer(self.optimizers)
        self.callbacks.append(callback)

    def _rebuild_dispatch(self) -> None:
        # Lower `dispatch_order` first, list order within one value (sorted() is stable). A hook is
        # listed for a callback that overrides it and does not call it idle (`Callback.idle_hooks`);
        # hooks marked `main_process_only` are listed undecorated on the main process, not elsewhere.
        ordered = sorted(self.callbacks, key=lambda c: c.dispatch_order)
        self._overridden = [(c, [hook for hook in (*HOOKS, "restore") if overrides(c, hook)]) for c in ordered]
        self._dispatch_main = is_main_process()
        self._idle_changes = any(type(c).idle_hooks is not Callback.idle_hooks for c in self.callbacks)
        self._update_dispatch()

    def _update_dispatch(self) -> None:
        """The dispatch table from the hooks each callback overrides (`_rebuild_dispatch`) and its
        idle hooks now."""
        main = self._dispatch_main
        active = [(c, hooks, c.idle_hooks()) for c, hooks in self._overridden]
        dispatch: dict[str, list[Any]] = {hook: [] for hook in (*HOOKS, "restore")}
        for callback, hooks, idle in active:
            for hook in hooks:
                if hook not in idle:
                    method = dispatched_hook(getattr(callback, hook), main)
                    if method is not None:
                        dispatch[hook].append(method)
        self._dispatch = dispatch
        # A callback that may stop in a training-batch hook on one process only needs the flag
        # combined after every batch under torch.distributed (see the class docstring).
        self._batch_stop_sync = any(
            not c.stops_in_sync and any(h in ("on_train_batch_begin", "on_train_batch_end") and h not in idle for h in hooks)
            for c, hooks, idle in active
        )
        # The same for a stop asked in on_epoch_begin: the loop reads the flag after the next batch.
        self._epoch_begin_stop_sync = any(
            not c.stops_in_sync and "on_epoch_begin" in hooks and "on_epoch_begin" not in idle for c, hooks, idle in active
        )

    def _check_rank(self) -> None:
        """Rebuild the dispatch table when the process's rank changed since it was built (a list made
        before `init_process_group`): its `main_process_only` hooks depend on it."""
        if is_main_process() != self._dispatch_main:
            self._rebuild_dispatch()

    def append(self, callback: Callback) -> None:
        """Add a callback at the end of the list."""
        self._add(callback)
        self._rebuild_dispatch()

    def has_hook(self, hook: str) -> bool:
        """Whether any callback in the list does something in `hook` (so its logs are worth building)."""
        return bool(self._dispatch[hook])

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    @property
    def history(self) -> History | None:
        """The `History` in the list, if one was requested with `add_history`."""
        return self._history

    # -- wiring forwarded to every callback -------------------------------------------------------
    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params
        for callback in self.callbacks:
            callback.set_params(params)

    def set_model(self, model: torch.nn.Module | None) -> None:
        super().set_model(model)
        self.loop.model = self._model
        for callback in self.callbacks:
            callback.set_model(model)

    def set_optimizer(self, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None) -> None:
        super().set_optimizer(optimizer)
        self.loop.optimizers = self.optimizers
        for callback in self.callbacks:
            callback.set_optimizer(self.optimizers)

    def set_loop(self, loop: LoopState) -> None:
        loop.callbacks = self
        loop.model, loop.optimizers = self._model, self.optimizers
        self.loop = loop
        for callback in self.callbacks:
            callback.set_loop(loop)

    # -- stopping -------------------------------------------------------------------------------
    @property
    def stop_training(self) -> bool:
        """True once a callback asked to stop (`model.stop_training = True`) or it was set here."""
        model = self._model
        return self._stop_training or bool(model is not None and getattr(model, "stop_training", False))

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self._stop_training = bool(value)
        if self._model is not None:
            setattr(self._model, "stop_training", bool(value))  # noqa: B010

    def sync_stop_training(self) -> bool:
        """Combine `stop_training` over processes (True if any process set it) and return it.

        Every process must call it at the same point; outside a process group it only reads the flag.
        `on_train_begin` and `on_epoch_end` (always), `on_epoch_begin` and `on_train_batch_end` (when
        needed) call it, so loops rarely must.
        """
        stop = self.stop_training
        if is_distributed():
            agreed = any_process(stop)
            if agreed != stop:
                self.stop_training = agreed
            stop = agreed
        return stop

    def end_after_error(self, hook: str, error: BaseException, logs: Logs | None = None) -> None:
        """Run an end hook (`"on_train_end"`, `"on_test_end"`, `"on_predict_end"`) after the loop
        raised `error`, with `loop.exception` set to it, so that callbacks undo and close what they
        began (restore swapped weights, close files). An error raised by the hook itself becomes a
        warning: the loop's `error` is the one the caller re-raises.
        """
        self.loop.exception = error
        try:
            getattr(self, hook)(logs)
        except BaseException as end_error:
            warnings.warn(f"{hook} raised {end_error!r} while ending after {error!r}", stacklevel=3)

    # -- state ----------------------------------------------------------------------------------
    def _stateful(self) -> dict[str, Callback]:
        """Every callback that overrides `state_dict`, by its unique state key (`#2`, `#3` appended
        to keys that repeat, in list order)."""
        keyed: dict[str, Callback] = {}
        for callback in self.callbacks:
            if type(callback).state_dict is Callback.state_dict:
                continue
            key, n = callback.state_key, 1
            while key in keyed:
                n += 1
                key = f"{callback.state_key}#{n}"
            keyed[key] = callback
        return keyed

    def state_dict(self) -> dict[str, Any]:
        """The state of every stateful callback, by its `state_key`."""
        return {key: callback.state_dict() for key, callback in self._stateful().items()}

    def match_states(
        self, states: Mapping[str, Any], by_position: bool = False, source: str = "the state"
    ) -> list[tuple[str, Callback, Any]]:
        """Pair saved callback states with the callbacks that take them, by state key, and warn once,
        naming every saved state that nothing takes and every stateful callback that gets nothing.

        Args:
            states: what `state_dict()` returned (e.g. read back from a file).
            by_position: the keys are `"{index}:{ClassName}"` (files of format 1).
            source: where the states come from, for the warning.

        Returns:
            `(field, callback, state)` for each callback that gets a state.

        Example:

        ```python
        for field, callback, state in callbacks.match_states(saved):
            callback.load_state_dict(state)
        ```
        """
        if by_position:
            keyed = {f"{i}:{type(c).__name__}": c for i, c in enumerate(self.callbacks)}
            keyed = {k: c for k, c in keyed.items() if k in states or type(c).state_dict is not Callback.state_dict}
        else:
            keyed = self._stateful()
        pairs = [(f"callbacks/{key}", callback, states[key]) for key, callback in keyed.items() if key in states]
        unused = [key for key in states if key not in keyed]
        # Files of format 1 kept no empty states (and History kept none): no gap to report there.
        missing = [] if by_position else [key for key in keyed if key not in states]
        if unused or missing:
            parts = []
            if unused:
                parts.append(f"saved states that no callback takes: {', '.join(unused)}")
            if missing:
                parts.append(f"callbacks that get no saved state (they start afresh): {', '.join(missing)}")
            warnings.warn(f"{source}: " + "; ".join(parts), stacklevel=4)
        return pairs

    def state_template(self, states: Mapping[str, Any]) -> dict[str, Any]:
        """The tensors to read the `DTensor`s of saved callback states into (sharded checkpoints): each
        callback's `state_template()` of its saved state, by state key (see `Callback.state_template`).

        Args:
            states: the saved callback states (`state_dict()` layout), their tensors not read yet.

        Example:

        ```python
        load_sharded("ckpt/state-03", lambda saved: {"callbacks": callbacks.state_template(saved["callbacks"])})
        ```
        """
        stateful = self._stateful()
        return {key: stateful[key].state_template(state) for key, state in states.items()
                if key in stateful and isinstance(state, dict)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Give each callback its saved state (matched by `state_key`; see `match_states`), all or
        nothing: when one callback rejects its state, the others keep theirs."""
        apply_states("the callback states", self.match_states(state_dict))

    # -- dispatch -------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        """Resets `stop_training` (as `fit` does before it), runs the restore phase (each callback's
        `restore()`: `BackupAndRestore` loads the training state there), then calls every callback's
        `on_train_begin`. So every state is in place before any callback starts, wherever it is in the
        list."""
        self._rebuild_dispatch()  # the rank and the idle hooks as this run begins
        loop = self.loop
        loop.exception = None
        loop.resumed = False
        loop.position = (loop.initial_epoch, loop.initial_batch)
        # A hand-written loop has no fit to reset a flag left by an earlier run on the same model.
        self.stop_training = False
        for restore in self._dispatch["restore"]:
            restore()
        for hook in self._dispatch["on_train_begin"]:
            hook(logs)
        if is_distributed():
            self.sync_stop_training()  # a stop asked at train begin on one process holds for all (once per run)

    def on_train_end(self, logs: Logs | None = None) -> None:
        """Calls every callback's `on_train_end`, even when one of them raises; re-raises the first
        error after all have run, so that every callback gets the chance to close its files."""
        error: BaseException | None = None
        for hook in self._dispatch["on_train_end"]:
            try:
                hook(logs)
            except BaseException as exc:
                if error is None:
                    error = exc
        if error is not None:
            raise error

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        loop = self.loop
        loop.epoch = epoch
        loop.batch = -1
        if loop.position[0] != epoch:  # a resumed epoch keeps its position until its next batch
            loop.position = (epoch, 0)
        for hook in self._dispatch["on_epoch_begin"]:
            hook(epoch, logs)
        if self._idle_changes:
            self._update_dispatch()  # e.g. a graph written in the first epoch: its batch hook goes idle
        if self._epoch_begin_stop_sync and is_distributed():
            self.sync_stop_training()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self.loop.position = (epoch + 1, 0)
        for hook in self._dispatch["on_epoch_end"]:
            hook(epoch, logs)
        if is_distributed():
            self.sync_stop_training()

    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        self.loop.batch = batch
        for hook in self._dispatch["on_train_batch_begin"]:
            hook(batch, logs)

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        loop = self.loop
        loop.global_step += 1
        loop.position = (loop.epoch, batch + 1)
        for hook in self._dispatch["on_train_batch_end"]:
            hook(batch, logs)
        if self._batch_stop_sync and is_distributed():
            self.sync_stop_training()

    def on_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        self.on_train_batch_begin(batch, logs)

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self.on_train_batch_end(batch, logs)

    def on_test_begin(self, logs: Logs | None = None) -> None:
        self._check_rank()
        for hook in self._dispatch["on_test_begin"]:
            hook(logs)

    def on_test_end(self, logs: Logs | None = None) -> None:
        for hook in self._dispatch["on_test_end"]:
            hook(logs)

    def on_test_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        for hook in self._dispatch["on_test_batch_begin"]:
            hook(batch, logs)

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        for hook in self._dispatch["on_test_batch_end"]:
            hook(batch, logs)

    def on_predict_begin(self, logs: Logs | None = None) -> None:
        self._check_rank()
        for hook in self._dispatch["on_predict_begin"]:
            hook(logs)

    def on_predict_end(self, logs: Logs | None = None) -> None:
        for hook in self._dispatch["on_predict_end"]:
            hook(logs)

    def on_predict_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        for hook in self._dispatch["on_predict_batch_begin"]:
            hook(batch, logs)

    def on_predict_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        for hook in self._dispatch["on_predict_batch_end"]:
            hook(batch, logs)
