"""`save_checkpoint` / `load_checkpoint`: the whole training state in one call, for loops without callbacks.

Both are built on `LoopState`, the one owner of the training-state layout: the objects given (model,
optimizers, scaler, schedulers, callbacks) become a `LoopState` of their own, the schedulers its loop
parts `scheduler/<i>` (the names `BackupAndRestore(scheduler=...)` gives them), and the file is what
`LoopState.state_dict()` makes and `LoopState.load_state_dict()` checks and applies. So a file of
`save_checkpoint`, `BackupAndRestore` or a full-state `ModelCheckpoint` is read by any of them. They
live here, beside `LoopState`, because the checkpoint package below only writes and reads trees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.callback_list import CallbackList
from torchcallbacks.callbacks.loop_state import LoopState, is_sharded
from torchcallbacks.checkpoint.files import PathLike
from torchcallbacks.checkpoint.fsspec_storage import storage_for
from torchcallbacks.checkpoint.state_file import TrainingState, write_training_state
from torchcallbacks.checkpoint.training_state import read_state
from torchcallbacks.checkpoint.validate import check_counter
from torchcallbacks.checkpoint.writer import CheckpointWriter
from torchcallbacks.distributed import unwrap_model


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_model_first(model: Any, filepath: Any, where: str) -> None:
    if isinstance(filepath, torch.nn.Module) or isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{where}(model, filepath, ...): the model comes first, as in save_weights / load_weights")


class _WholeState:
    """A `callbacks` argument that is not a `CallbackList` (any object with `state_dict()` /
    `load_state_dict()`): its whole state is the `callbacks` field, given to it in one piece."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def state_dict(self) -> Any:
        return self.target.state_dict()

    def match_states(self, states: Mapping[str, Any], by_position: bool = False, source: str = "") -> list[tuple[str, Any, Any]]:
        return [("callbacks", self.target, dict(states))]

    def state_template(self, states: Mapping[str, Any]) -> Any:
        template = getattr(self.target, "state_template", None)
        return template(states) if callable(template) else {}


def _loop(
    where: str, model: torch.nn.Module | None, optimizer: Any, scaler: Any, scheduler: Any, callbacks: Any,
) -> tuple[LoopState, list[str]]:
    """The `LoopState` of the objects given, and the names of its scheduler parts."""
    optimizers = _as_list(optimizer)
    bad = [type(o).__name__ for o in optimizers if not isinstance(o, torch.optim.Optimizer)]
    if bad:
        raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer or a list of them, received {', '.join(bad)}")
    if callbacks is not None and not isinstance(callbacks, CallbackList):
        if not (callable(getattr(callbacks, "state_dict", None)) and callable(getattr(callbacks, "load_state_dict", None))):
            raise TypeError(f"{where}: callbacks must be a CallbackList or have state_dict() and load_state_dict(), "
                            f"received {type(callbacks).__name__}")
        callbacks = _WholeState(callbacks)
    loop = LoopState(model=unwrap_model(model) if model is not None else None, optimizers=optimizers, scaler=scaler)
    loop.callbacks = callbacks
    names = []
    for i, s in enumerate(_as_list(scheduler)):
        if not (callable(getattr(s, "state_dict", None)) and callable(getattr(s, "load_state_dict", None))):
            raise TypeError(f"{where}: scheduler must have state_dict() and load_state_dict(), received {type(s).__name__}")
        names.append(f"scheduler/{i}")
        loop.track(names[-1], s)
    return loop, names


def save_checkpoint(
    model: torch.nn.Module,
    filepath: PathLike,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    scaler: Any = None,
    scheduler: Any = None,
    callbacks: Any = None,
    epoch: int = 0,
    batch: int = 0,
    global_step: int = 0,
    rng: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Save the whole training state to one safetensors file, atomically.

    The file is the one layout of every training state (`LoopState.state_dict()`, see
    docs/checkpoint-format.md): `load_checkpoint`, `BackupAndRestore` (as its `latest.safetensors`)
    and `LoopState.load_state_dict` read it. Inside `fit` or a `CallbackList`, `BackupAndRestore` and
    `ModelCheckpoint` write the loop's own state; this function is for loops that use no callbacks.
    It is called by one process (nothing is gathered: under `torch.distributed` the file holds the
    random states of the process that wrote it).

    Args:
        model: the model (DDP-wrapped is fine); its tensors keep their `state_dict()` names.
        filepath: where to write; the directory is created if needed.
        optimizer: an optimizer or a list of them.
        scaler: a `torch.amp.GradScaler`, if any.
        scheduler: an LR scheduler (anything with `state_dict()`), or a list of them; stored as the
            loop parts `scheduler/<i>`.
        callbacks: a `CallbackList` (or any object with `state_dict()`) whose state to keep.
        epoch: the epoch to continue at when resuming (0-based).
        batch: batches of `epoch` already trained (0 at an epoch end).
        global_step: training batches completed in total.
        rng: named random states (from `capture_rng_state()`); default: `{"current": <now>}`.
        extra: more JSON-able (or tensor) data to keep.
        storage_options: for a URL `filepath` (`s3://...`, `memory://...`), fsspec's options (see
            `save_weights`); the file is uploaded and committed by its manifest.

    Raises:
        ImportError: the URL's fsspec backend is not installed (the message names the extra).
        TypeError: an argument of the wrong type (the model after the path, an optimizer that is not
            one).
        ValueError: an FSDP2-sharded model (its training state is a directory of shards, written by
            `ModelCheckpoint` or `BackupAndRestore` on every process).
        CheckpointError: a counter that is not an integer >= 0.

    Example:

    ```python
    torchcallbacks.save_checkpoint(model, "state.safetensors", optimizer, epoch=3)
    state = torchcallbacks.load_checkpoint(model, "state.safetensors", optimizer)
    state.epoch  # 3
    ```
    """
    _check_model_first(model, filepath, "save_checkpoint")
    filepath, storage = storage_for(filepath, storage_options, "save_checkpoint: filepath")
    if is_sharded(model):
        raise ValueError(
            "save_checkpoint: model is FSDP2-sharded (DTensor parameters): its training state is a directory of "
            "shards, written on every process by a full-state ModelCheckpoint or by BackupAndRestore; "
            "save_weights writes its full weights"
        )
    loop, _ = _loop("save_checkpoint", model, optimizer, scaler, scheduler, callbacks)
    loop.position = (check_counter(epoch, "save_checkpoint", "epoch"), check_counter(batch, "save_checkpoint", "batch"))
    loop.global_step = check_counter(global_step, "save_checkpoint", "global_step")
    loop.extra = dict(extra or {})
    state = loop.state_dict(gather=False)
    if rng is not None:
        state["rng"] = dict(rng)
    write_training_state(filepath, state, writer=CheckpointWriter(storage=storage) if storage.remote else None)


def _asked(state: Mapping[str, Any], optimizers: bool) -> dict[str, Any]:
    """The state with the optimizer part left out when no optimizer was given (it is not read)."""
    view = dict(state)
    if not optimizers:
        view["optimizers"], view["optimizer_types"] = [], []
    return view


def load_checkpoint(
    model: torch.nn.Module | None,
    filepath: PathLike,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    scaler: Any = None,
    scheduler: Any = None,
    callbacks: Any = None,
    restore_rng: bool = True,
    cast_dtypes: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> TrainingState:
    """Load a training state into the given objects (those given as None are left alone) and return
    the rest (epoch, counters, random states).

    Any training state is read: a file of `save_checkpoint`, a `BackupAndRestore` backup, a full-state
    `ModelCheckpoint` file, files of older formats. Every part is checked before any is applied
    (`LoopState.load_state_dict`): a file that does not fit (other keys or shapes, another optimizer
    type or other parameter groups, bad counters or random states, a scheduler asked for that the file
    lacks) raises a `CheckpointError` naming the file and the field, and nothing is changed.

    A directory is a sharded training state (a full-state `ModelCheckpoint` or a backup of an FSDP2
    model, see `checkpoint.sharded`). Into a sharded model every process must call this at the same
    point, with its sharded model and optimizers; each reads the shards it holds (another number of
    processes than the one that saved is fine). Into a plain model it works in one process without a
    process group: each tensor is put together from its saved chunks. The model is required; the
    parts not given (optimizers, callbacks) are not read (the returned callback states have None in
    place of their sharded tensors). Keys, counters, optimizer count and types are checked before any
    tensor is read, shapes and dtypes by the reader before it reads.

    Args:
        model: the model to load the weights into (keys and shapes must match exactly), or None.
        filepath: the file (or sharded checkpoint directory).
        optimizer: the optimizer(s), as many as were saved.
        scaler: the `GradScaler` to restore.
        scheduler: the scheduler(s) to restore (the file must hold as many).
        callbacks: a `CallbackList` (or any object with `load_state_dict`) to restore.
        restore_rng: set the random generators to the state saved as "current".
        cast_dtypes: cast model tensors (and optimizer state tensors) stored in another dtype than the
            model's, as torch's `load_state_dict` does; by default they are refused, naming the key
            and both dtypes (a dtype that changed in a file is a sign of damage).
        storage_options: for a URL `filepath`, fsspec's options (see `save_weights`); the file must
            be committed (have its manifest), and is checked against it before it is loaded.

    Returns:
        A `TrainingState` with epoch, batch, global_step, the random states and the callback states.

    Raises:
        ImportError: the URL's fsspec backend is not installed (the message names the extra).
        FileNotFoundError: no such file.
        CheckpointError: the file is unreadable or does not fit (the message names file and field).

    Example:

    ```python
    torchcallbacks.save_checkpoint(model, "state.safetensors", optimizer, epoch=3)
    state = torchcallbacks.load_checkpoint(model, "state.safetensors", optimizer)
    torchcallbacks.fit(model, loader, optimizer=optimizer, loss=loss_fn, epochs=10,
                       initial_epoch=state.epoch)
    ```
    """
    _check_model_first(model, filepath, "load_checkpoint")
    path, storage = storage_for(filepath, storage_options, "load_checkpoint: filepath")
    loop, schedulers = _loop("load_checkpoint", model, optimizer, scaler, scheduler, callbacks)
    given = bool(loop.optimizers)
    # a sharded directory (collective) is read into the template of what was saved, after its checks
    template = None if model is None else (lambda saved: loop.sharded_template(_asked(saved, given), path))
    with loop.keeping_fresh_optimizers():
        state = read_state(path, template, partial=True, cast_dtypes=cast_dtypes, storage=storage)
        return loop.load_state_dict(_asked(state, given), path, restore_rng=restore_rng, required=schedulers,
                                    cast_dtypes=cast_dtypes)
