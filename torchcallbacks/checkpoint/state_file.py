"""Training-state files: the whole state of a run in one safetensors file (docs/checkpoint-format.md).

`write_training_state` / `read_training_state` store and read a state tree (what
`LoopState.state_dict()` returns: counters, model, optimizers, scaler, callback states, the loop's own
parts, random states) and know nothing of what the parts mean; `save_checkpoint` / `load_checkpoint`
are the functional API on top of them for users who drive a loop without callbacks. Files of format 1
are read and upgraded to the current layout; files of format 2 differ only in holding numpy's and
Python's random-state words as lists of ints, which `check_rng_state` and `restore_rng_state` take as
they are. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchcallbacks.checkpoint.encoding import decode, encode
from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.files import (
    FORMAT_VERSION,
    KIND_KEY,
    PREFIX,
    STATE_KEY,
    TRAINING_STATE,
    PathLike,
    _check_keys,
    _header,
    _model_tensors,
    _write,
    read_file,
)
from torchcallbacks.checkpoint.reader import loads_strict
from torchcallbacks.checkpoint.rng import capture_rng_state, restore_rng_state
from torchcallbacks.checkpoint.validate import (
    check_counter,
    check_list,
    check_optimizer_states,
    check_rng_state,
    optimizer_type,
)
from torchcallbacks.checkpoint.writer import CheckpointWriter

#: Document entries that describe the file rather than the state.
_FILE_FIELDS = ("format", "format_version", "library_version", "torch_version")


@dataclass
class TrainingState:
    """What `load_checkpoint` read besides the tensors it loaded in place.

    Attributes:
        path: the file.
        epoch: the epoch to continue at (0-based).
        batch: batches of `epoch` already trained (0 for a file saved at an epoch end).
        global_step: training batches completed in total.
        rng: named random states (`capture_rng_state()` layout), e.g. "current".
        callbacks: the callback states, by state key (`CallbackList.state_dict()` layout).
        extra: anything the saver added.
        library_version: the torchcallbacks version that wrote the file.

    Example:

    ```python
    state = torchcallbacks.load_checkpoint(model, "state.safetensors", optimizer)
    print(state.epoch, state.batch, state.global_step)
    ```
    """

    path: str
    epoch: int
    batch: int
    global_step: int
    rng: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    library_version: str = ""


# -- writing -----------------------------------------------------------------------------------------
def write_training_state(
    path: PathLike,
    state: Mapping[str, Any],
    *,
    writer: CheckpointWriter | None = None,
    keep_previous_as: PathLike | None = None,
    delete_after: Sequence[str] = (),
) -> None:
    """Write a state tree as one training-state file, atomically.

    The tree's `"model"` entry (a `state_dict()`) is stored under its own tensor names, so that
    `load_weights` and safetensors' loaders read the model part; every other entry goes into the
    JSON document, its tensors stored as tensors named after their path (`@optimizers/0/...`).

    Args:
        path: the file to create or replace.
        state: the tree, e.g. `LoopState.state_dict()`.
        writer: a `CheckpointWriter` (asynchronous or not); default: write now.
        keep_previous_as: move the file being replaced to this path (a fallback copy).
        delete_after: files to delete once the new file is written.

    Example:

    ```python
    write_training_state("backup/latest.safetensors", callbacks.loop.state_dict())
    ```
    """
    from torchcallbacks import __version__

    model = dict(state.get("model") or {})
    bad = [k for k in model if k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"model: state_dict keys starting with {PREFIX!r} are reserved by the format: {bad}")
    tensors: dict[str, torch.Tensor] = dict(model)
    document: dict[str, Any] = {
        "format": "torchcallbacks.training_state",
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
    }
    for key, value in state.items():
        if key != "model":
            document[key] = encode(value, f"{PREFIX}{key}", tensors)
    header = _header(TRAINING_STATE)
    header[STATE_KEY] = json.dumps(document, allow_nan=False)
    _write(path, tensors, header, writer, keep_previous_as=keep_previous_as, delete_after=delete_after)


# -- reading -----------------------------------------------------------------------------------------
def read_training_state(path: PathLike) -> dict[str, Any]:
    """The state tree of a training-state file (format 1 files are upgraded to the current layout).

    Nothing is validated beyond the file itself: the parts are checked by whoever applies them
    (`LoopState.load_state_dict`, `load_checkpoint`), before anything is applied.

    Args:
        path: the file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a complete safetensors file, not a training state, metadata that is not
            strict JSON, a newer format, or references to tensors the file lacks.

    Example:

    ```python
    state = read_training_state("backup/latest.safetensors")
    state["epoch"], state["batch"], sorted(state["callbacks"])
    ```
    """
    where = repr(os.fspath(path))
    tensors, metadata = read_file(path)
    if metadata.get(KIND_KEY) != TRAINING_STATE or STATE_KEY not in metadata:
        kind = metadata.get(KIND_KEY)
        raise CheckpointError(
            f"{where} is not a torchcallbacks training state "
            f"({'a ' + kind + ' file' if kind else 'no ' + KIND_KEY + ' metadata'}); use load_weights for weights"
        )
    document = loads_strict(metadata[STATE_KEY], f"{where}: the training-state metadata")
    if not isinstance(document, dict):
        raise CheckpointError(f"{where}: the training-state metadata is not a JSON object")
    version = document.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: field 'format_version' must be an integer >= 1, found {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where} has format version {version}; this torchcallbacks reads up to {FORMAT_VERSION}")
    try:
        state: dict[str, Any] = {k: decode(v, tensors) for k, v in document.items() if k not in _FILE_FIELDS}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the training-state metadata is damaged: {exc}") from exc
    state["model"] = _model_tensors(tensors)
    state["library_version"] = document.get("library_version", "")
    for name in ("epoch", "batch", "global_step"):
        check_counter(state.get(name), where, name)
    return _upgrade_format_1(state) if version == 1 else state


def _upgrade_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> the current layout: callback states keyed by position (`"{i}:{Class}"`), the
    epoch-start random state and the running means of a mid-epoch backup in `rng` / `extra`."""
    rng = dict(state.get("rng") or {})
    extra = dict(state.get("extra") or {})
    metrics = extra.pop("metrics", None) or []
    batch = state["batch"]

    def loop_part(rank_rng: Mapping[str, Any], means: Any) -> dict[str, Any]:
        part: dict[str, Any] = {}
        if batch > 0 and means is not None:
            part["metrics"] = {"means": means, "stateful": {}}
        if batch > 0 and rank_rng.get("epoch_begin") is not None:
            part["data"] = {
                "pass_rng": {"global": rank_rng["epoch_begin"], "generators": []},
                "consumed": batch, "epoch_batch": batch,
                "rng": {"global": rank_rng["current"], "generators": []},
            }
        return part

    ranks = rng.pop("ranks", None)
    state["loop"] = loop_part(rng, metrics[0] if metrics else None)
    if ranks:
        state["ranks"] = [
            {"rng": {"current": r["current"]}, "loop": loop_part(r, metrics[i] if len(metrics) == len(ranks) else None)}
            for i, r in enumerate(ranks)
        ]
    state["rng"] = {"current": rng["current"]} if "current" in rng else {}
    state["extra"] = extra
    state["callbacks_by_position"] = True
    return state


# -- the functional API ------------------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_model_first(model: Any, filepath: Any, where: str) -> None:
    if isinstance(filepath, torch.nn.Module) or isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{where}(model, filepath, ...): the model comes first, as in save_weights / load_weights")


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
) -> None:
    """Save the whole training state to one safetensors file, atomically.

    Inside `fit` or a `CallbackList`, `BackupAndRestore` and `ModelCheckpoint` write the loop's own
    state (`LoopState.state_dict()`); this function is for loops that use no callbacks.

    Args:
        model: the model (DDP-wrapped is fine); its tensors keep their `state_dict()` names.
        filepath: where to write; the directory is created if needed.
        optimizer: an optimizer or a list of them.
        scaler: a `torch.amp.GradScaler`, if any.
        scheduler: an LR scheduler (anything with `state_dict()`), or a list of them.
        callbacks: a `CallbackList` (or any object with `state_dict()`) whose state to keep.
        epoch: the epoch to continue at when resuming (0-based).
        batch: batches of `epoch` already trained (0 at an epoch end).
        global_step: training batches completed in total.
        rng: named random states (from `capture_rng_state()`); default: `{"current": <now>}`.
        extra: more JSON-able (or tensor) data to keep.

    Example:

    ```python
    torchcallbacks.save_checkpoint(model, "state.safetensors", optimizer, epoch=3)
    state = torchcallbacks.load_checkpoint(model, "state.safetensors", optimizer)
    state.epoch  # 3
    ```
    """
    from torchcallbacks.distributed import unwrap_model

    _check_model_first(model, filepath, "save_checkpoint")
    optimizers = _as_list(optimizer)
    state = {
        "epoch": check_counter(epoch, "save_checkpoint", "epoch"),
        "batch": check_counter(batch, "save_checkpoint", "batch"),
        "global_step": check_counter(global_step, "save_checkpoint", "global_step"),
        "model": unwrap_model(model).state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "optimizer_types": [optimizer_type(o) for o in optimizers],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "schedulers": [s.state_dict() for s in _as_list(scheduler)],
        "callbacks": callbacks.state_dict() if callbacks is not None else {},
        "rng": dict(rng) if rng is not None else {"current": capture_rng_state()},
        "extra": dict(extra or {}),
    }
    write_training_state(filepath, state)


def load_checkpoint(
    model: torch.nn.Module | None,
    filepath: PathLike,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    scaler: Any = None,
    scheduler: Any = None,
    callbacks: Any = None,
    restore_rng: bool = True,
) -> TrainingState:
    """Load a training state into the given objects (those given as None are left alone) and return
    the rest (epoch, counters, random states).

    Every part is checked before any is applied: a file that does not fit (other keys or shapes,
    another optimizer type or other parameter groups, bad counters or random states) raises a
    `CheckpointError` naming the file and the field, and the model and optimizers are untouched.

    A directory is a sharded training state (a full-state `ModelCheckpoint` of an FSDP2 model, see
    `checkpoint.sharded`): every process must call this at the same point, with its sharded model
    and optimizers; each reads the shards it holds (another number of processes than the one that
    saved is fine). The model is required; the parts not given (optimizers, callbacks) are not read
    (the returned callback states have None in place of their sharded tensors). Keys, counters,
    optimizer count and types are checked before any tensor is read, shapes and dtypes by the
    reader before it reads; the model's shards are read in place.

    Args:
        model: the model to load the weights into (keys and shapes must match exactly), or None.
        filepath: the file (or sharded checkpoint directory).
        optimizer: the optimizer(s), as many as were saved.
        scaler: the `GradScaler` to restore.
        scheduler: the scheduler(s) to restore.
        callbacks: a `CallbackList` (or any object with `load_state_dict`) to restore.
        restore_rng: set the random generators to the state saved as "current".

    Returns:
        A `TrainingState` with epoch, batch, global_step, the random states and the callback states.

    Raises:
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
    from torchcallbacks.distributed import unwrap_model

    _check_model_first(model, filepath, "load_checkpoint")
    path = os.fspath(filepath)
    where = repr(path)
    if os.path.isdir(path):
        return _load_sharded_checkpoint(model, path, _as_list(optimizer), callbacks, restore_rng)
    state = read_training_state(path)
    optimizers, schedulers = _as_list(optimizer), _as_list(scheduler)
    module = unwrap_model(model) if model is not None else None
    if module is not None:
        _check_keys(path, module, state["model"], {}, strict=True)
    if optimizers:
        check_optimizer_states(optimizers, state, where)
    if schedulers:
        check_list(state.get("schedulers"), where, "schedulers", len(schedulers))
    rng = state.get("rng") or {}
    if restore_rng and "current" in rng:
        check_rng_state(rng["current"], where, "rng/current")
    if callbacks is not None:
        try:
            callbacks.load_state_dict(state["callbacks"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: field 'callbacks' does not fit the callbacks: {exc}") from exc
    if module is not None:
        model_tensors = state["model"]
        module.load_state_dict({k: v for k, v in model_tensors.items() if k in module.state_dict()})
    for opt, opt_state in zip(optimizers, state.get("optimizers") or [], strict=False):
        opt.load_state_dict(opt_state)
    for sched, sched_state in zip(schedulers, state.get("schedulers") or [], strict=True):
        sched.load_state_dict(sched_state)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if restore_rng and "current" in rng:
        restore_rng_state(rng["current"])
    return TrainingState(
        path=path, epoch=state["epoch"], batch=state["batch"], global_step=state["global_step"], rng=rng,
        callbacks=state.get("callbacks") or {}, extra=state.get("extra") or {},
        library_version=state["library_version"],
    )


def _load_sharded_checkpoint(
    model: torch.nn.Module | None, path: str, optimizers: list[torch.optim.Optimizer], callbacks: Any, restore_rng: bool,
) -> TrainingState:
    """`load_checkpoint` of a sharded directory (collective); `load_checkpoint` describes it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from torchcallbacks.checkpoint.sharded import load_sharded, sharded_states
    from torchcallbacks.distributed import unwrap_model

    where = repr(path)
    if model is None:
        raise CheckpointError(f"{where} is a sharded training state: pass the model it is read into")
    module = unwrap_model(model)

    def template(saved: dict[str, Any]) -> dict[str, Any]:
        # Checks of what was saved, before anything is read (the tensors are None here).
        for name in ("epoch", "batch", "global_step"):
            check_counter(saved.get(name), where, name)
        expected = module.state_dict()
        # Key names only here (every tensor of the right shape): the reader checks the shapes.
        _check_keys(path, module, {k: expected.get(k, torch.empty(0)) for k in saved.get("model") or {}}, {}, strict=True)
        if optimizers:
            check_optimizer_states(optimizers, saved, where, types_only=True)
        rng = (saved.get("rng") or {}).get("current")
        if restore_rng and rng is not None and not isinstance(rng, Mapping):
            raise CheckpointError(f"{where}: field 'rng/current' must be a random state, found {rng!r}")
        parts = sharded_states(module, optimizers)
        if callable(getattr(callbacks, "state_template", None)) and isinstance(saved.get("callbacks"), dict):
            parts["callbacks"] = callbacks.state_template(saved["callbacks"])
        return parts

    state, _ = load_sharded(path, template, partial=True)
    rng = (state.get("rng") or {}).get("current")
    if restore_rng and rng is not None:
        check_rng_state(rng, where, "rng/current")
    if callbacks is not None:
        try:
            callbacks.load_state_dict(state.get("callbacks") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: field 'callbacks' does not fit the callbacks: {exc}") from exc
    set_model_state_dict(module, state["model"])
    for opt, opt_state in zip(optimizers, state.get("optimizers") or [], strict=False):
        set_optimizer_state_dict(module, opt, opt_state)
    if restore_rng and rng is not None:
        restore_rng_state(rng)
    return TrainingState(
        path=path, epoch=state["epoch"], batch=state["batch"], global_step=state["global_step"],
        rng=state.get("rng") or {}, callbacks=state.get("callbacks") or {}, extra=state.get("extra") or {},
    )
