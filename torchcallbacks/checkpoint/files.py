"""Weights-only files and training-state files: `save_weights`, `load_weights`, `save_checkpoint`,
`load_checkpoint`. The layout is specified in docs/checkpoint-format.md.

Both kinds are plain safetensors files. Model tensors are stored under their `state_dict()` names, so
`safetensors.torch.load_file` / `load_model` read weights-only files as they are; everything else of a
training state is stored under names starting with `@` plus a JSON document in the header metadata.
Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from torchcallbacks.checkpoint.encoding import decode, encode
from torchcallbacks.checkpoint.rng import capture_rng_state, restore_rng_state
from torchcallbacks.checkpoint.writer import CheckpointWriter

FORMAT_VERSION = 1
KIND_KEY = "torchcallbacks.kind"
VERSION_KEY = "torchcallbacks.format_version"
ALIASES_KEY = "torchcallbacks.aliases"
STATE_KEY = "torchcallbacks.state"
WEIGHTS = "weights"
TRAINING_STATE = "training_state"
#: Names of non-model tensors in a training-state file start with this (module keys never do).
PREFIX = "@"

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit what it is loaded into.

    Example:

    ```python
    try:
        torchcallbacks.load_weights(model, "model.safetensors")
    except CheckpointError as error:
        print(f"cannot use the checkpoint: {error}")
    ```
    """


@dataclass
class TrainingState:
    """What `load_checkpoint` read besides the tensors it loaded in place.

    Attributes:
        path: the file.
        epoch: the epoch to continue at (0-based).
        batch: batches of `epoch` already trained (0 for a file saved at an epoch end).
        global_step: training batches completed in total.
        rng: named random states (`capture_rng_state()` layout), e.g. "current".
        callbacks: the callback states (`CallbackList.state_dict()` layout).
        extra: anything the saver added.
        library_version: the torchcallbacks version that wrote the file.

    Example:

    ```python
    state = torchcallbacks.load_checkpoint("state.safetensors", model, optimizer)
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


# -- tensors that share memory ---------------------------------------------------------------------
def _deduplicate(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can write, and `alias -> kept name` for tensors that are the same view of
    the same memory (tied weights). Other tensors sharing memory are copied; all become contiguous."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, ...]] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.numel() == 0:
            out[name] = tensor.clone()
            continue
        view = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage in storages or not tensor.is_contiguous():
            tensor = tensor.contiguous() if not tensor.is_contiguous() else tensor.clone()
        storages.add(storage)
        out[name] = tensor
    return out, aliases


def _write(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str],
    writer: CheckpointWriter | None,
    **write_kwargs: Any,
) -> None:
    stored, aliases = _deduplicate(tensors)
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases)
    (writer or CheckpointWriter()).write(path, stored, metadata, **write_kwargs)


def _header(kind: str) -> dict[str, str]:
    return {"format": "pt", KIND_KEY: kind, VERSION_KEY: str(FORMAT_VERSION)}


# -- reading -------------------------------------------------------------------------------------------
def read_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the header metadata of a safetensors file, tied names restored.

    Args:
        path: the file to read.

    Raises:
        FileNotFoundError: there is no file at `path`.
        CheckpointError: the file is not a complete safetensors file (truncated, foreign, damaged),
            its header is larger than `reader.MAX_HEADER_BYTES`, or its aliases entry is not strict JSON.

    Example:

    ```python
    tensors, metadata = read_file("model.safetensors")
    metadata["format"]  # "pt"
    ```
    """
    from torchcallbacks.checkpoint.reader import check_header_size, loads_strict

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    check_header_size(path)  # before anything parses the header
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors file (truncated, damaged or another format): {exc}"
        ) from exc
    aliases = loads_strict(metadata.get(ALIASES_KEY, "{}"), f"{path!r}: metadata {ALIASES_KEY!r}")
    if not isinstance(aliases, dict) or not all(isinstance(kept, str) for kept in aliases.values()):
        raise CheckpointError(f"{path!r}: metadata {ALIASES_KEY!r} is not a JSON object of tensor names")
    for alias, kept in aliases.items():
        if kept not in tensors:
            raise CheckpointError(f"{path!r}: tied tensor {alias!r} refers to {kept!r}, which the file does not have")
        tensors[alias] = tensors[kept]
    return tensors, metadata


def _model_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}


def _check_keys(path: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], strict: bool) -> None:
    """Fill in tied names the way `safetensors.torch.save_model` records them, then compare keys and
    shapes with the model, raising a CheckpointError that names the keys that differ."""
    expected = model.state_dict()
    for name in expected:
        kept = metadata.get(name)
        if name not in tensors and kept in tensors:
            tensors[name] = tensors[kept]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    )
    problems = []
    if shapes:
        problems.append("shapes differ for " + "; ".join(shapes))
    if strict and missing:
        problems.append("missing in the file: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("not in the model: " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(f"{path!r} does not fit {type(model).__name__}: " + "; ".join(problems))


def _load_model(path: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], strict: bool) -> None:
    _check_keys(path, model, tensors, metadata, strict)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=strict)


# -- weights only ------------------------------------------------------------------------------------
def save_weights(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    filepath: PathLike,
    metadata: Mapping[str, str] | None = None,
    writer: CheckpointWriter | None = None,
    delete_after: Sequence[str] = (),
) -> None:
    """Save a model's weights (its `state_dict()`) as a plain safetensors file, atomically.

    `safetensors.torch.load_file` and `safetensors.torch.load_model` read the file; tied weights are
    stored once (the other names are listed in the `torchcallbacks.aliases` metadata entry).

    Args:
        model: a `torch.nn.Module` (DDP-wrapped is fine) or a state dict.
        filepath: where to write; the directory is created if needed.
        metadata: extra string -> string entries for the file's header.
        writer: a `CheckpointWriter` (e.g. an asynchronous one); default: write now.
        delete_after: files to delete once the new file is written.

    Example:

    ```python
    torchcallbacks.save_weights(model, "model.safetensors")
    torchcallbacks.load_weights(model, "model.safetensors")
    ```
    """
    from torchcallbacks.distributed import unwrap_model

    state = unwrap_model(model).state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    header = {**{str(k): str(v) for k, v in (metadata or {}).items()}, **_header(WEIGHTS)}
    _write(filepath, state, header, writer, delete_after=delete_after)


def load_weights(model: torch.nn.Module, filepath: PathLike, strict: bool = True) -> None:
    """Load weights into `model` from a weights file or from the model part of a training-state file
    (any safetensors file whose tensor names are the model's `state_dict()` keys works).

    Args:
        model: the module to load into (DDP-wrapped is fine).
        filepath: the file.
        strict: require exactly the model's keys. Shapes must match either way.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a complete safetensors file, or its keys or shapes differ
            from the model's (the message names them).

    Example:

    ```python
    checkpoint = torchcallbacks.ModelCheckpoint("best.safetensors", save_best_only=True)
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, validation_data=val_loader,
                       epochs=10, callbacks=[checkpoint])
    torchcallbacks.load_weights(model, checkpoint.best_path)
    ```
    """
    from torchcallbacks.distributed import unwrap_model

    path = os.fspath(filepath)
    tensors, metadata = read_file(path)
    _load_model(path, unwrap_model(model), _model_tensors(tensors), metadata, strict)


# -- full training state -----------------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def save_checkpoint(
    filepath: PathLike,
    model: torch.nn.Module,
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
    writer: CheckpointWriter | None = None,
    keep_previous_as: PathLike | None = None,
    delete_after: Sequence[str] = (),
) -> None:
    """Save the whole training state to one safetensors file, atomically.

    Args:
        filepath: where to write; the directory is created if needed.
        model: the model (DDP-wrapped is fine); its tensors keep their `state_dict()` names.
        optimizer: an optimizer or a list of them.
        scaler: a `torch.amp.GradScaler`, if any.
        scheduler: an LR scheduler (anything with `state_dict()`), or a list of them.
        callbacks: a `CallbackList` (or any object with `state_dict()`) whose state to keep.
        epoch: the epoch to continue at when resuming (0-based).
        batch: batches of `epoch` already trained (0 at an epoch end).
        global_step: training batches completed in total.
        rng: named random states (from `capture_rng_state()`); default: `{"current": <now>}`.
        extra: more JSON-able (or tensor) data to keep.
        writer: a `CheckpointWriter` (asynchronous or not); default: write now.
        keep_previous_as: move the file being replaced to this path (a fallback copy).
        delete_after: files to delete once the new file is written.

    Example:

    ```python
    torchcallbacks.save_checkpoint("state.safetensors", model, optimizer, epoch=3)
    state = torchcallbacks.load_checkpoint("state.safetensors", model, optimizer)
    state.epoch  # 3
    ```
    """
    from torchcallbacks import __version__
    from torchcallbacks.distributed import unwrap_model

    state_dict = unwrap_model(model).state_dict()
    bad = [k for k in state_dict if k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"model: state_dict keys starting with {PREFIX!r} are reserved by the format: {bad}")
    tensors: dict[str, torch.Tensor] = dict(state_dict)
    document = {
        "format": "torchcallbacks.training_state",
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "epoch": int(epoch),
        "batch": int(batch),
        "global_step": int(global_step),
        "optimizers": [encode(o.state_dict(), f"{PREFIX}optimizer/{i}", tensors) for i, o in enumerate(_as_list(optimizer))],
        "scaler": encode(scaler.state_dict(), f"{PREFIX}scaler", tensors) if scaler is not None else None,
        "schedulers": [encode(s.state_dict(), f"{PREFIX}scheduler/{i}", tensors) for i, s in enumerate(_as_list(scheduler))],
        "callbacks": encode(callbacks.state_dict() if callbacks is not None else {}, f"{PREFIX}callbacks", tensors),
        "rng": encode(dict(rng) if rng is not None else {"current": capture_rng_state()}, f"{PREFIX}rng", tensors),
        "extra": encode(dict(extra or {}), f"{PREFIX}extra", tensors),
    }
    header = _header(TRAINING_STATE)
    header[STATE_KEY] = json.dumps(document, allow_nan=False)
    _write(filepath, tensors, header, writer, keep_previous_as=keep_previous_as, delete_after=delete_after)


def _load_into(path: str, what: str, objects: list[Any], states: list[Any]) -> None:
    if len(objects) != len(states) and objects:
        raise CheckpointError(f"{path!r} holds {len(states)} {what} state(s), but {len(objects)} were given to load into")
    for i, (obj, state) in enumerate(zip(objects, states, strict=False)):
        try:
            obj.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path!r}: {what} {i} does not fit the saved state: {exc}") from exc


def load_checkpoint(
    filepath: PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    scaler: Any = None,
    scheduler: Any = None,
    callbacks: Any = None,
    restore_rng: bool = True,
) -> TrainingState:
    """Load a training state saved by `save_checkpoint` into the given objects (those given as None
    are left alone) and return the rest (epoch, counters, random states).

    Args:
        filepath: the file.
        model: the model to load the weights into (keys and shapes must match exactly).
        optimizer: the optimizer(s), as many as were saved.
        scaler: the `GradScaler` to restore.
        scheduler: the scheduler(s) to restore.
        callbacks: a `CallbackList` (or any object with `load_state_dict`) to restore.
        restore_rng: set the random generators to the state saved as "current".

    Returns:
        A `TrainingState` with epoch, batch, global_step, the random states and the callback states.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a complete safetensors file, not a training state, or it does not fit
            the model / optimizers (the message names the file and the keys).

    Example:

    ```python
    torchcallbacks.save_checkpoint("state.safetensors", model, optimizer, epoch=3)
    state = torchcallbacks.load_checkpoint("state.safetensors", model, optimizer)
    torchcallbacks.fit(model, loader, optimizer=optimizer, loss=loss_fn, epochs=10,
                       initial_epoch=state.epoch)
    ```
    """
    path = os.fspath(filepath)
    tensors, metadata = read_file(path)
    if metadata.get(KIND_KEY) != TRAINING_STATE or STATE_KEY not in metadata:
        kind = metadata.get(KIND_KEY)
        raise CheckpointError(
            f"{path!r} is not a torchcallbacks training state "
            f"({'a ' + kind + ' file' if kind else 'no ' + KIND_KEY + ' metadata'}); use load_weights for weights"
        )
    try:
        document = decode(json.loads(metadata[STATE_KEY]), tensors)
        version = int(document["format_version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path!r}: the training-state metadata is damaged: {exc}") from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} has format version {version}; this torchcallbacks reads up to {FORMAT_VERSION}"
        )
    if model is not None:
        from torchcallbacks.distributed import unwrap_model

        _load_model(path, unwrap_model(model), _model_tensors(tensors), metadata, strict=True)
    _load_into(path, "optimizer", _as_list(optimizer), document["optimizers"])
    _load_into(path, "scheduler", _as_list(scheduler), document["schedulers"])
    if scaler is not None and document["scaler"]:
        scaler.load_state_dict(document["scaler"])
    if callbacks is not None:
        callbacks.load_state_dict(document["callbacks"])
    state = TrainingState(
        path=path,
        epoch=document["epoch"],
        batch=document["batch"],
        global_step=document["global_step"],
        rng=document["rng"],
        callbacks=document["callbacks"],
        extra=document["extra"],
        library_version=document["library_version"],
    )
    if restore_rng and "current" in state.rng:
        restore_rng_state(state.rng["current"])
    return state


def save_loop_state(
    callback: Any,
    filepath: PathLike,
    *,
    epoch: int,
    batch: int,
    rng: Mapping[str, Any] | None = None,
    scheduler: Any = None,
    writer: CheckpointWriter | None = None,
    keep_previous_as: PathLike | None = None,
    delete_after: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> None:
    """`save_checkpoint` of what a callback sees: `callback.model`, `callback.optimizer` (one or a
    list), the loop's GradScaler, callback states and global step.

    Args:
        callback: a callback attached to a loop (it has `model`, `optimizer` and `loop`).
        filepath: where to write.
        epoch: the epoch to continue at when resuming (0-based).
        batch: batches of `epoch` already trained (0 at an epoch end).
        rng: named random states; default: `{"current": <now>}`.
        scheduler: an LR scheduler (or a list of them) whose state to keep.
        writer: a `CheckpointWriter` (asynchronous or not); default: write now.
        keep_previous_as: move the file being replaced to this path.
        delete_after: files to delete once the new file is written.
        extra: more JSON-able (or tensor) data to keep.

    Example:

    ```python
    class SaveEachEpoch(Callback):
        def on_epoch_end(self, epoch, logs=None):
            save_loop_state(self, f"epoch{epoch}.safetensors", epoch=epoch + 1, batch=0)
    ```
    """
    loop = callback.loop
    save_checkpoint(
        filepath, callback.model, callback.optimizer, scaler=loop.scaler, scheduler=scheduler,
        callbacks=loop.callbacks, epoch=epoch, batch=batch, global_step=loop.global_step, rng=rng,
        writer=writer, keep_previous_as=keep_previous_as, delete_after=delete_after, extra=extra,
    )
