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
from typing import Any

import torch
from safetensors import safe_open

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.writer import CheckpointWriter
from torchcallbacks.checks import check_local_path

FORMAT_VERSION = 3
KIND_KEY = "torchcallbacks.kind"
VERSION_KEY = "torchcallbacks.format_version"
ALIASES_KEY = "torchcallbacks.aliases"
STATE_KEY = "torchcallbacks.state"
WEIGHTS = "weights"
TRAINING_STATE = "training_state"
#: Names of non-model tensors in a training-state file start with this (module keys never do).
PREFIX = "@"

PathLike = str | os.PathLike[str]


# -- tensors that share memory ---------------------------------------------------------------------
def _view(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What makes two entries the same view of the same memory (tied weights); a DTensor's is its
    local shard's."""
    if hasattr(tensor, "to_local"):  # a DTensor: it has no data pointer of its own
        tensor = tensor.to_local()
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


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
        view = _view(tensor)
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
        FileNotFoundError: there is nothing at `path`.
        CheckpointError: `path` is not a regular file (a directory, a FIFO, a device), or not a
            complete safetensors file (truncated, foreign, damaged),
            its header is larger than `reader.MAX_HEADER_BYTES`, or its aliases entry is not strict JSON.

    Example:

    ```python
    tensors, metadata = read_file("model.safetensors")
    metadata["format"]  # "pt"
    ```
    """
    from torchcallbacks.checkpoint.reader import check_header_size

    path = os.fspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if not os.path.isfile(path):  # a directory, a FIFO, a link to a device or to nothing: never opened
        raise CheckpointError(f"{path!r} is not a regular file (a checkpoint file is one)")
    check_header_size(path)  # before anything parses the header
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors file (truncated, damaged or another format): {exc}"
        ) from exc
    restore_aliases(path, metadata, tensors)
    return tensors, metadata


def restore_aliases(path: str, metadata: Mapping[str, str], tensors: dict[str, Any]) -> None:
    """Add the tied names a file's `torchcallbacks.aliases` metadata lists (`alias -> kept`) to
    `tensors` (name -> tensor, or anything else that stands for one), each as its kept name's value.

    Args:
        path: the file, for messages.
        metadata: the file's header metadata.
        tensors: the file's tensors by name; completed in place.

    Raises:
        CheckpointError: the entry is not strict JSON naming tensors of the file.

    Example:

    ```python
    restore_aliases("model.safetensors", {"torchcallbacks.aliases": '{"b": "a"}'}, tensors)
    assert tensors["b"] is tensors["a"]
    ```
    """
    from torchcallbacks.checkpoint.reader import loads_strict

    aliases = loads_strict(metadata.get(ALIASES_KEY, "{}"), f"{path!r}: metadata {ALIASES_KEY!r}")
    if not isinstance(aliases, dict) or not all(isinstance(kept, str) for kept in aliases.values()):
        raise CheckpointError(f"{path!r}: metadata {ALIASES_KEY!r} is not a JSON object of tensor names")
    for alias, kept in aliases.items():
        if kept not in tensors:
            raise CheckpointError(f"{path!r}: tied tensor {alias!r} refers to {kept!r}, which the file does not have")
        tensors[alias] = tensors[kept]


def _model_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}


def _tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """`name -> the other names of the same tensor` among a model's state-dict entries: tied weights
    (one Parameter under two names, as GPT-2's `lm_head.weight` and `transformer.wte.weight`), found as
    entries that are the same view of the same memory."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        groups.setdefault(_view(tensor), []).append(name)
    return {name: [other for other in names if other != name] for names in groups.values() if len(names) > 1 for name in names}


def _check_keys(
    path: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], strict: bool,
    *, cast_dtypes: bool = False,
) -> None:
    """Fill in tied names, then compare keys, shapes and (unless `cast_dtypes`) dtypes with the model,
    raising a CheckpointError that names the keys that differ.

    A dtype that differs from the model's (a float32 weight stored as int32 with the same bytes, a
    float16 file for a float32 model) is refused by default: torch's `load_state_dict` would cast it
    silently, and a changed dtype in a file is a sign of damage; `cast_dtypes=True` lets it be cast.

    Tied names are filled from the way `safetensors.torch.save_model` records them (metadata
    `alias -> kept`), and from the model itself: a key missing from the file whose tensor is tied in
    the model to one the file has gets that one's value (a Hugging Face `save_pretrained` file stores a
    tied weight once, e.g. GPT-2's `lm_head.weight` is left out for `transformer.wte.weight`). Keys
    missing otherwise stay missing."""
    expected = model.state_dict(keep_vars=True)
    tied: dict[str, list[str]] | None = None
    for name in expected:
        if name in tensors:
            continue
        kept = metadata.get(name)
        if kept in tensors:
            tensors[name] = tensors[kept]
            continue
        if tied is None:
            tied = _tied_names(expected)
        present = [other for other in tied.get(name, ()) if other in tensors]
        if present:
            tensors[name] = tensors[present[0]]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    )
    dtypes = [] if cast_dtypes else sorted(
        f"{k}: file {tensors[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) == tuple(v.shape) and tensors[k].dtype != v.dtype
    )
    problems = []
    if shapes:
        problems.append("shapes differ for " + "; ".join(shapes))
    if dtypes:
        problems.append("dtypes differ for " + "; ".join(dtypes) + " (cast_dtypes=True casts them)")
    if strict and missing:
        problems.append("missing in the file: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("not in the model: " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(f"{path!r} does not fit {type(model).__name__}: " + "; ".join(problems))


def _load_model(
    path: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], strict: bool,
    cast_dtypes: bool = False,
) -> None:
    _check_keys(path, model, tensors, metadata, strict, cast_dtypes=cast_dtypes)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=strict)


# -- weights only ------------------------------------------------------------------------------------
def save_weights(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    filepath: PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    writer: CheckpointWriter | None = None,
    delete_after: Sequence[str] = (),
    max_shard_size: int | None = None,
) -> None:
    """Save a model's weights (its `state_dict()`) as a plain safetensors file, atomically.

    `safetensors.torch.load_file` and `safetensors.torch.load_model` read the file; tied weights are
    stored once (the other names are listed in the `torchcallbacks.aliases` metadata entry).

    An FSDP2-sharded model (DTensor parameters, `fully_shard`) is saved in full, under the plain
    `state_dict()` keys: then every process must call `save_weights` at the same point; the tensors
    are gathered one at a time and rank 0 streams each into the file (memory: about the largest
    tensor, not the model); every name is written (tied ones too); the write is synchronous (`writer`
    is only flushed first: the gather cannot run on a background thread); files in `delete_after` are
    deleted by rank 0; an error on rank 0 is raised on every process.

    With `max_shard_size`, weights of more bytes are split, in state-dict order, into files of at most
    that many bytes of tensors: for `filepath` `X.safetensors`, `X-00001-of-0000N.safetensors` ... and
    the index `X.safetensors.index.json` (Hugging Face's layout for `model.safetensors`); weights that
    fit are one file at `filepath`. `load_weights(model, "X.safetensors")` reads either. These files
    are written synchronously too. Without `max_shard_size` a model that is not sharded is written as
    before: one file, through `writer`.

    Args:
        model: a `torch.nn.Module` (DDP-wrapped or FSDP2-sharded is fine) or a state dict.
        filepath: where to write; the directory is created if needed.
        metadata: extra string -> string entries for the file's header.
        writer: a `CheckpointWriter` (e.g. an asynchronous one); default: write now.
        delete_after: files to delete once the new file is written (with their split files and index).
        max_shard_size: the most bytes of tensors in one file (a larger tensor gets a file of its own),
            or None (default) for one file.

    Raises:
        ValueError: `max_shard_size` is not None or a positive integer.

    Example:

    ```python
    torchcallbacks.save_weights(model, "model.safetensors")
    torchcallbacks.load_weights(model, "model.safetensors")
    torchcallbacks.save_weights(fsdp_model, "big.safetensors", max_shard_size=2**30)  # on every process
    ```
    """
    from torchcallbacks.distributed import has_dtensors, unwrap_model

    filepath = check_local_path(filepath, "save_weights: filepath")
    state = unwrap_model(model).state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    header = {**{str(k): str(v) for k, v in (metadata or {}).items()}, **_header(WEIGHTS)}
    if max_shard_size is not None or has_dtensors(state.values()):
        from torchcallbacks.checkpoint.full_weights import write_weights

        if writer is not None:
            writer.flush()
        write_weights(state, filepath, header, max_shard_size=max_shard_size, delete_after=delete_after)
        return
    _write(filepath, state, header, writer, delete_after=delete_after)


def load_weights(model: torch.nn.Module, filepath: PathLike, strict: bool = True, *, cast_dtypes: bool = False) -> None:
    """Load weights into `model` from a weights file or from the model part of a training-state file
    (any safetensors file whose tensor names are the model's `state_dict()` keys works).

    The weights may also be split files: `filepath` an index (`*.index.json`), a path `X.safetensors`
    saved with `max_shard_size` (its `X.safetensors.index.json` is read), or a directory of a Hugging
    Face export (`model.safetensors`, or `model.safetensors.index.json` and its files), or a sharded
    training-state directory (a full-state `ModelCheckpoint` or a backup of an FSDP2 model): its model
    part, put together from the saved chunks, in one process without a process group for a plain model
    (`checkpoint.sharded_model`).

    Into an FSDP2-sharded model, every process calls it: each reads the full tensors from the file
    itself, one at a time, and keeps its own shard (no communication; memory: about the largest
    tensor).

    Args:
        model: the module to load into (DDP-wrapped or FSDP2-sharded is fine).
        filepath: the file, index or directory.
        strict: require exactly the model's keys. Shapes must match either way.
        cast_dtypes: copy tensors stored in another dtype than the model's into it, cast (what torch's
            `load_state_dict` does silently). By default such a tensor is refused, naming the key and
            both dtypes: a dtype that changed in a file (a float32 weight whose header says int32) is
            a sign of damage. Pass True to load, e.g., a float16 file into a float32 model.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a complete safetensors file, or its keys, shapes or dtypes
            differ from the model's (the message names them).

    Example:

    ```python
    checkpoint = torchcallbacks.ModelCheckpoint("best.safetensors", save_best_only=True)
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, validation_data=val_loader,
                       epochs=10, callbacks=[checkpoint])
    torchcallbacks.load_weights(model, checkpoint.best_path)
    torchcallbacks.load_weights(model.float(), "half.safetensors", cast_dtypes=True)  # a float16 file
    ```
    """
    from torchcallbacks.distributed import has_dtensors, unwrap_model

    path = check_local_path(filepath, "load_weights: filepath")
    module = unwrap_model(model)
    if os.path.isdir(path):
        from torchcallbacks.checkpoint.sharded_model import is_sharded_state, load_state_weights

        if is_sharded_state(path):  # a sharded training state: its model part
            load_state_weights(module, path, strict, cast_dtypes=cast_dtypes)
            return
    if has_dtensors(module.parameters()):
        from torchcallbacks.checkpoint.full_weights import load_sharded_weights

        load_sharded_weights(module, path, strict, cast_dtypes=cast_dtypes)
        return
    if not os.path.isfile(path) or path.endswith(".index.json"):
        from torchcallbacks.checkpoint.full_weights import read_weights

        where, tensors, metadata = read_weights(path)
        _load_model(where, module, _model_tensors(tensors), metadata, strict, cast_dtypes)
        return
    tensors, metadata = read_file(path)
    _load_model(path, module, _model_tensors(tensors), metadata, strict, cast_dtypes)
