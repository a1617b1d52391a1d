"""`LoopState`: the loop's counters, and the one owner of the training state.

Everything a resumed run needs is one tree, gathered by `LoopState.state_dict()` and put back by
`LoopState.load_state_dict()`: the counters, the model, every optimizer, the GradScaler, each
callback's state under its `state_key`, the loop's own parts (fit's running means and data position,
or whatever a hand-written loop tracks) and the random states. The checkpoint package only writes
and reads that tree. Loading checks every part before it applies any, so a state that does not fit
changes nothing. Every writer and reader goes through it: `BackupAndRestore`, `ModelCheckpoint`, and
the functional `save_checkpoint` / `load_checkpoint` (checkpoint_functions.py), which make a
`LoopState` of the objects they are given; `load_state_dict` is the one place that makes the
`TrainingState` a reader returns.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torchcallbacks.checkpoint.encoding import from_json, to_json
from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.model_keys import check_keys
from torchcallbacks.checkpoint.rng import capture_rng_state, restore_rng_state
from torchcallbacks.checkpoint.state_file import TrainingState
from torchcallbacks.checkpoint.validate import (
    check_counter,
    check_list,
    check_optimizer_states,
    check_rng_state,
    check_state_fields,
    optimizer_type,
)
from torchcallbacks.distributed import (
    all_gather_json,
    get_rank,
    get_world_size,
    has_dtensors,
    is_distributed,
    unwrap_model,
)

if TYPE_CHECKING:
    from torchcallbacks.callbacks.callback_list import CallbackList

#: Errors a `load_state_dict` raises for a state that does not fit (turned into `CheckpointError`s).
_FIT_ERRORS = (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError)


def _snapshot(value: Any) -> Any:
    """A copy of a state that later changes to the live objects cannot reach (tensors cloned)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value) if type(value) in (list, tuple) else value
    return value


class _Resuming:
    """A loop part whose `load_state_dict` takes `source`, `epoch` and `strict` (EpochIterator: its
    data-order check names the file and the epoch), as `apply_states` sees it: loaded with them."""

    def __init__(self, part: Any, source: str, epoch: int, strict: bool) -> None:
        self.part, self.source, self.epoch, self.strict = part, source, epoch, strict

    def state_dict(self) -> Any:
        return self.part.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.part.load_state_dict(state, source=self.source, epoch=self.epoch, strict=self.strict)


def _takes_source(part: Any) -> bool:
    try:
        parameters = inspect.signature(part.load_state_dict).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return all(name in parameters for name in ("source", "epoch", "strict"))


def is_sharded(model: torch.nn.Module | None) -> bool:
    """True when the model has DTensor parameters (FSDP2's `fully_shard`): its state is then saved and
    loaded through `torch.distributed.checkpoint` (`checkpoint.sharded`), each process its own shards."""
    return model is not None and has_dtensors(unwrap_model(model).parameters())


def apply_states(where: str, items: list[tuple[str, Any, Any]]) -> None:
    """`obj.load_state_dict(state)` for each `(field, obj, state)`, all or nothing: when one raises,
    the objects already loaded get their former state back and a `CheckpointError` names the field.

    Args:
        where: the file (or other source), for the message.
        items: `(field, object, state)` triples, applied in order.

    Example:

    ```python
    apply_states("'backup.safetensors'", [("callbacks/EarlyStopping", early_stopping, saved)])
    ```
    """
    done: list[tuple[Any, Any]] = []
    for name, obj, state in items:
        before = _snapshot(obj.state_dict())
        try:
            obj.load_state_dict(state)
        except _FIT_ERRORS as exc:
            for previous, old in reversed([*done, (obj, before)]):
                try:
                    previous.load_state_dict(old)
                except _FIT_ERRORS as undo_error:  # pragma: no cover - a callback that cannot take its own state
                    warnings.warn(f"could not put back the state of {name}: {undo_error!r}", stacklevel=3)
            if isinstance(exc, CheckpointError) and where in str(exc):  # it names the file itself (strict_data)
                raise
            raise CheckpointError(f"{where}: field {name!r} does not fit: {exc!r}") from exc
        done.append((obj, before))


@dataclass(eq=False)
class LoopState:
    """Counters and handles of the running loop, shared by a `CallbackList` and all its callbacks, and
    the owner of the training state.

    The `CallbackList` keeps the counters up to date from the hooks it dispatches, so they are right in
    `fit` and in a hand-written loop alike.

    Attributes:
        epoch: the current epoch, 0-based (set by `on_epoch_begin`).
        batch: index of the current training batch within the epoch; -1 before the first one.
        global_step: training batches completed since training started (restored on resume).
        initial_epoch: the epoch training starts at; a restored state moves it (`fit` and a
            hand-written loop read it after `on_train_begin`).
        initial_batch: batches of `initial_epoch` already trained before a resume.
        position: `(epoch, batch)` a state saved now resumes at: `(e, k + 1)` after training batch `k`
            of epoch `e`, `(e + 1, 0)` from the end of epoch `e` on.
        resumed: True when the restore phase of this run's `on_train_begin` loaded a state.
        exception: the exception that ended the run, or None. Set before the end hook runs, so
            callbacks can tell a normal finish from a crash.
        scaler: the `torch.amp.GradScaler` in use, if any (part of the state).
        model: the plain model (part of the state).
        optimizers: every optimizer (part of the state).
        parts: the loop's own stateful parts, by name (see `track`): in `fit`, `"metrics"` (the
            running means and stateful metric objects of the epoch in progress) and `"data"` (the
            position in the data and the random state its order was drawn from).
        callbacks: the `CallbackList` that owns this state.
        extra: more JSON-able (or tensor) data kept with the state, under `"extra"` when not empty
            (`save_checkpoint(extra=...)`); a restored state sets it.

    Example:

    ```python
    callbacks = CallbackList([BackupAndRestore("backup/")], model=model, optimizer=opt, epochs=10)
    batches = torchcallbacks.EpochIterator(loader)
    callbacks.loop.track("data", batches)      # the data position is part of every backup
    callbacks.on_train_begin()                 # restore phase: everything is loaded here
    for epoch in range(callbacks.loop.initial_epoch, 10):
        callbacks.on_epoch_begin(epoch)
        for i, (x, y) in batches.epoch():      # a resumed epoch starts after its trained batches
            ...
    ```
    """

    epoch: int = 0
    batch: int = -1
    global_step: int = 0
    initial_epoch: int = 0
    initial_batch: int = 0
    position: tuple[int, int] = (0, 0)
    resumed: bool = False
    exception: BaseException | None = None
    scaler: Any = None
    model: torch.nn.Module | None = field(default=None, repr=False)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list, repr=False)
    parts: dict[str, Any] = field(default_factory=dict, repr=False)
    callbacks: CallbackList | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def start_run(self, initial_epoch: int = 0, scaler: Any = None) -> None:
        """Set what a new run starts from, before its `on_train_begin` (whose restore phase may move
        it): `initial_epoch`, no batch of it trained yet, no step taken, and the `GradScaler` in use.

        Args:
            initial_epoch: the epoch the run starts at (Keras' `initial_epoch`).
            scaler: the `torch.amp.GradScaler`, if any (part of the training state).

        Example:

        ```python
        callbacks.loop.start_run(initial_epoch=0, scaler=torch.amp.GradScaler("cuda"))
        callbacks.on_train_begin()
        ```
        """
        self.initial_epoch, self.initial_batch, self.global_step = initial_epoch, 0, 0
        self.scaler = scaler

    def at_every(self, frequency: int | str | bool | None) -> bool:
        """Whether the training batch just ended is a save / log step for `frequency` batches: an
        integer n (every n-th batch, counted over the run by `global_step`); "epoch", False or None
        (never: those act at epoch ends).

        Args:
            frequency: a callback's `save_freq`, `update_freq` or `check_every`.

        Example:

        ```python
        if self.loop.at_every(self.save_freq):
            self._save()
        ```
        """
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            return False
        return self.global_step % frequency == 0

    # -- the loop's own parts ---------------------------------------------------------------------
    def track(self, name: str, part: Any) -> None:
        """Make `part` (anything with `state_dict()` / `load_state_dict()`) part of the training state.

        Args:
            name: its key in the state; `fit` uses `"metrics"` and `"data"`.
            part: the object, e.g. an `EpochIterator` or a torchmetrics metric.

        Example:

        ```python
        callbacks.loop.track("data", torchcallbacks.EpochIterator(loader))
        ```
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name: expected a non-empty string, received {name!r}")
        if not (callable(getattr(part, "state_dict", None)) and callable(getattr(part, "load_state_dict", None))):
            raise TypeError(f"part: expected an object with state_dict() and load_state_dict(), received {type(part).__name__}")
        self.parts[name] = part

    # -- the state --------------------------------------------------------------------------------
    def state_dict(self, *, gather: bool = True) -> dict[str, Any]:
        """The whole training state as one tree (tensors are the live ones: write or copy it now).

        Under `torch.distributed` every process must call it at the same point: each process's random
        states and loop parts are gathered under `"ranks"` (one all-gather). With `gather=False` (what
        `save_checkpoint` does, called by one process) nothing is gathered and the tree holds this
        process's own parts only (an FSDP2 model's parts are collective either way).

        Args:
            gather: gather every process's own parts under `torch.distributed`.

        Example:

        ```python
        write_training_state("backup.safetensors", callbacks.loop.state_dict())
        ```
        """
        epoch, batch = self.position
        if is_sharded(self.model):  # DTensors: written by `checkpoint.sharded.save_sharded`
            parts = self._sharded_parts()
        else:
            model = unwrap_model(self.model).state_dict() if self.model is not None else {}
            parts = {"model": model, "optimizers": [o.state_dict() for o in self.optimizers]}
        return self._rest(epoch, batch, parts, gather)

    # -- FSDP2: model and optimizers as DTensor state dicts (keyed by parameter names) ------------------
    def _sharded_parts(self) -> dict[str, Any]:
        from torchcallbacks.checkpoint.sharded import sharded_states

        return sharded_states(unwrap_model(self.model), self.optimizers)  # type: ignore[arg-type]

    def _rest(self, epoch: int, batch: int, parts: dict[str, Any], gather: bool) -> dict[str, Any]:
        own = {"rng": {"current": capture_rng_state()}, "loop": {n: p.state_dict() for n, p in self.parts.items()}}
        state: dict[str, Any] = {
            "epoch": epoch,
            "batch": batch,
            "global_step": self.global_step,
            "world_size": get_world_size(),
            **parts,
            "optimizer_types": [optimizer_type(o) for o in self.optimizers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "callbacks": self.callbacks.state_dict() if self.callbacks is not None else {},
            **own,
        }
        if self.extra:
            state["extra"] = dict(self.extra)
        if gather and is_distributed():
            state["ranks"] = [from_json(part) for part in all_gather_json(to_json(own))]
        return state

    def sharded_template(self, saved: Mapping[str, Any] | None = None, source: str = "the state") -> dict[str, Any]:
        """What `checkpoint.sharded.load_sharded` loads a sharded state into (collective): copies of the
        model's and optimizers' state dicts as `get_model_state_dict` / `get_optimizer_state_dict` give them
        (DTensors for an FSDP2 model, full tensors for a plain one; the optimizer state is initialised
        if it is empty; copies, so that a state refused after its shards were read leaves the model and
        optimizers as they were) and, given the saved tree, the templates of the saved callback states
        (`Callback.state_template`: e.g. EarlyStopping's snapshot of the best weights, SwapEMAWeights'
        average).

        Given the saved tree, what can be checked before a tensor is read is checked first (counters,
        model keys, optimizer count and types, the random state's shape): a directory that does not fit
        is refused naming `source` and the field before anything is read.

        Args:
            saved: the saved tree, its tensors not read yet (what `load_sharded` passes a callable
                template), or None for the model and optimizers only.
            source: the directory, for messages.

        Example:

        ```python
        state, _ = load_sharded("backup/latest", callbacks.loop.sharded_template)
        callbacks.loop.load_state_dict(state, "backup/latest")
        ```
        """
        if saved is not None:
            self._check(saved, repr(source), source, tensors_read=False)
        # Copies, not the live state dicts: what is read must be checked (and may be refused) before
        # anything reaches the model and optimizers (`load_state_dict` applies it afterwards).
        template = _snapshot(self._sharded_parts())
        states = saved.get("callbacks") if saved is not None else None
        if self.callbacks is not None and isinstance(states, dict):
            template["callbacks"] = self.callbacks.state_template(states)
        return template

    @contextlib.contextmanager
    def keeping_fresh_optimizers(self) -> Iterator[None]:
        """Optimizers that have no state yet have none again if what runs inside raises: the
        template of a sharded load initialises their state (DCP's `get_optimizer_state_dict` takes
        a step with zero gradients and learning rate, so Adam's `step` becomes 1), which a refused
        load must not leave behind.

        Example:

        ```python
        with callbacks.loop.keeping_fresh_optimizers():
            state, _ = load_sharded("backup/latest", callbacks.loop.sharded_template)
            callbacks.loop.load_state_dict(state, "backup/latest")
        ```
        """
        fresh = [optimizer for optimizer in self.optimizers if not optimizer.state]
        try:
            yield
        except BaseException:
            for optimizer in fresh:
                optimizer.state.clear()
            raise

    def _own_part(self, state: Mapping[str, Any], where: str) -> Mapping[str, Any]:
        ranks = state.get("ranks")
        if ranks is not None:
            check_list(ranks, where, "ranks")
        # A file that does not record its world (format 1, save_checkpoint before format 3 did) is taken
        # as written by as many processes as this run has.
        saved_world = len(ranks) if ranks else state.get("world_size")
        world = get_world_size()
        if saved_world is None or saved_world == world:
            own: Mapping[str, Any] = ranks[get_rank()] if ranks else {"rng": state.get("rng") or {}, "loop": state.get("loop") or {}}
            return own
        if state.get("batch"):
            # Its batches to skip count each process's batches of the old run: another number of
            # processes would train samples twice or never.
            raise CheckpointError(
                f"{where} was written in the middle of an epoch by {saved_world} processes and this run has "
                f"{world}: resume it with {saved_world} processes, or from a backup taken at an epoch end"
            )
        warnings.warn(
            f"{where} was written by {saved_world} processes and this run has {world}: every process restores "
            "the random states of process 0, so random draws differ from an uninterrupted run",
            stacklevel=4,
        )
        return {"rng": state.get("rng") or {}, "loop": {k: v for k, v in (state.get("loop") or {}).items() if k != "data"}}

    def _check_reachable(self, epoch: int, batch: int, where: str) -> None:
        """Counters this run can reach: a batch within an epoch's length (a saved position beyond
        it would skip the rest of the epoch); an epoch beyond `epochs` leaves nothing to train,
        which a warning says."""
        params = getattr(self.callbacks, "params", None) or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        if isinstance(steps, int) and batch > steps:
            raise CheckpointError(
                f"{where}: field 'batch' is {batch}, beyond the {steps} batches of an epoch of this run "
                "(was the data shortened, or steps_per_epoch changed?)"
            )
        if isinstance(epochs, int) and epoch > epochs:
            warnings.warn(
                f"{where} was saved at epoch {epoch}, beyond this run's epochs={epochs}: nothing is left to train",
                stacklevel=5,
            )

    def _check(
        self, state: Mapping[str, Any], where: str, source: str, *, tensors_read: bool = True,
        restore_rng: bool = True, required: Sequence[str] = (), cast_dtypes: bool = False,
    ) -> dict[str, Any]:
        """Every check of `state` that needs no callback (those are checked by applying), before
        anything is applied; returns what `load_state_dict` applies. With `tensors_read=False` (a
        sharded state whose tensors are None yet) only what the JSON tells: key names, counts, types,
        the optimizers' groups and hyper-parameters."""
        check_state_fields(state, where)
        counters = [check_counter(state.get(name), where, name) for name in ("epoch", "batch", "global_step")]
        self._check_reachable(counters[0], counters[1], where)
        own = self._own_part(state, where) if tensors_read else {"rng": state.get("rng") or {}, "loop": state.get("loop") or {}}
        model = unwrap_model(self.model) if self.model is not None else None
        tensors = dict(state.get("model") or {})
        if model is not None:
            if tensors_read:
                check_keys(source, model, tensors, {}, strict=True, cast_dtypes=cast_dtypes)  # DTensors: global shapes
            else:  # key names only (every tensor of the right shape): the reader checks the shapes
                expected = model.state_dict()
                check_keys(source, model, {k: expected.get(k, torch.empty(0)) for k in tensors}, {}, strict=True)
        sharded = is_sharded(model)
        # A sharded one's tensors were checked when they were read
        saved = check_optimizer_states(self.optimizers, state, where, tensors=tensors_read and not sharded,
                                       cast_dtypes=cast_dtypes)
        scaler_state = state.get("scaler")
        if scaler_state is not None and not isinstance(scaler_state, Mapping):
            raise CheckpointError(f"{where}: field 'scaler' must be a GradScaler state (a dict), found {scaler_state!r}")
        rng = (own.get("rng") or {}).get("current") if restore_rng else None
        if rng is not None and tensors_read:
            check_rng_state(rng, where, "rng/current")
        elif rng is not None and not isinstance(rng, Mapping):
            raise CheckpointError(f"{where}: field 'rng/current' must be a random state, found {rng!r}")
        parts = own.get("loop") or {}
        if not isinstance(parts, Mapping):
            raise CheckpointError(f"{where}: field 'loop' must be a dict of the loop's parts, found {parts!r}")
        absent = [name for name in required if name not in parts]
        if absent:
            held = ", ".join(sorted(parts)) or "none"
            raise CheckpointError(f"{where}: field 'loop/{absent[0]}' is missing (the loop parts it holds: {held})")
        extra = state.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise CheckpointError(f"{where}: field 'extra' must be a dict, found {extra!r}")
        return {"counters": counters, "own": own, "model": model, "tensors": tensors, "optimizers": saved,
                "scaler": scaler_state, "rng": rng, "parts": parts, "extra": dict(extra)}

    def load_state_dict(
        self, state: Mapping[str, Any], source: str = "the state", *, restore_rng: bool = True,
        required: Sequence[str] = (), cast_dtypes: bool = False, strict_data: bool = False,
    ) -> TrainingState:
        """Check every part of `state`, then apply all of them: callbacks, the loop's parts, model,
        optimizers, scaler, counters and random states.

        A part that does not fit (keys, shapes or dtypes of the model, another optimizer type or other
        parameter groups, hyper-parameters or optimizer state of the wrong kind, shape or dtype, a
        stored tensor named twice, counters that are not integers >= 0, random states of the wrong type
        or size, a callback or loop part that rejects its state) raises a `CheckpointError` naming
        `source` and the field, and nothing is changed. Saved callback states that no callback takes, and stateful
        callbacks that get no state, are named in one warning. A sharded directory's states (keyed by
        parameter names, `get_optimizer_state_dict`) are applied to a plain model's optimizers as well,
        which map the names to their parameters in order.

        Args:
            state: a tree from `state_dict()` (e.g. read back with `read_training_state`).
            source: where it comes from (a file name), for messages.
            restore_rng: set the random generators to the state saved as "current".
            required: names of loop parts (see `track`) that must be in `state` (e.g. `"scheduler/0"`).
            cast_dtypes: accept model and optimizer tensors of another dtype than the model's (cast as
                they are loaded); refused by default, naming the key and both dtypes.
            strict_data: a loop part that compares the saved data order with its data (the
                `EpochIterator`'s fingerprint: a `DataOrderWarning` by default) refuses a difference
                instead, with a `CheckpointError` naming `source`. A loop part whose `load_state_dict`
                takes the keyword arguments `source`, `epoch` and `strict` is given them.

        Returns:
            What was read besides what was applied in place: a `TrainingState` (counters, random and
            callback states, `extra`).

        Example:

        ```python
        callbacks.loop.load_state_dict(read_training_state("backup.safetensors"), "backup.safetensors")
        ```
        """
        where = repr(source)
        checked = self._check(state, where, source, restore_rng=restore_rng, required=required, cast_dtypes=cast_dtypes)
        model, tensors, saved, rng = checked["model"], checked["tensors"], checked["optimizers"], checked["rng"]
        items: list[tuple[str, Any, Any]] = []
        if self.callbacks is not None:
            items += self.callbacks.match_states(state.get("callbacks") or {}, bool(state.get("callbacks_by_position")), source)
        parts = checked["parts"]
        epoch = checked["counters"][0]
        items += [
            (f"loop/{name}", _Resuming(self.parts[name], source, epoch, strict_data) if _takes_source(self.parts[name])
             else self.parts[name], parts[name])
            for name in parts if name in self.parts
        ]
        apply_states(where, items)  # all or nothing; the model and optimizers are untouched if it raises

        if model is not None:
            if is_sharded(model):
                from torch.distributed.checkpoint.state_dict import set_model_state_dict

                set_model_state_dict(model, tensors)
            else:
                model.load_state_dict(tensors)
        for optimizer, optimizer_state in zip(self.optimizers, saved, strict=True):
            if is_sharded(model):
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                set_optimizer_state_dict(model, optimizer, optimizer_state)
            else:
                optimizer.load_state_dict(optimizer_state)
        if self.scaler is not None and checked["scaler"]:
            self.scaler.load_state_dict(checked["scaler"])
        if rng is not None:
            restore_rng_state(rng)
        epoch, batch, global_step = checked["counters"]
        self.initial_epoch, self.initial_batch, self.global_step = epoch, batch, global_step
        self.position = (epoch, batch)
        self.extra = checked["extra"]
        self.resumed = True
        return TrainingState(
            path=source, epoch=epoch, batch=batch, global_step=global_step, rng=dict(state.get("rng") or {}),
            callbacks=dict(state.get("callbacks") or {}), extra=checked["extra"],
            library_version=state.get("library_version", ""),
        )

