"""Safetensors files of ours: the header metadata of the format (docs/checkpoint-format.md), tied
tensors stored once and restored on reading, and reading a whole file. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.reader import check_header_size, loads_strict
from torchcallbacks.checkpoint.writer import CheckpointWriter

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
def tensor_view(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What makes two entries the same view of the same memory (tied weights); a DTensor's is its
    local shard's.

    Args:
        tensor: a tensor or DTensor.

    Example:

    ```python
    tensor_view(model.lm_head.weight) == tensor_view(model.embed.weight)  # True when tied
    ```
    """
    if hasattr(tensor, "to_local"):  # a DTensor: it has no data pointer of its own
        tensor = tensor.to_local()
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def deduplicate(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can write, and `alias -> kept name` for tensors that are the same view of
    the same memory (tied weights). Other tensors sharing memory are copied; all become contiguous.

    Args:
        tensors: name -> tensor (e.g. a state dict).

    Example:

    ```python
    stored, aliases = deduplicate({"a": w, "b": w})  # ({"a": w}, {"b": "a"})
    ```
    """
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, ...]] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.numel() == 0:
            out[name] = tensor.clone()
            continue
        view = tensor_view(tensor)
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


def write_tensors(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str],
    writer: CheckpointWriter | None,
    **write_kwargs: Any,
) -> None:
    """Write `tensors` as one safetensors file through `writer` (default: now), tied tensors stored
    once and listed in the `torchcallbacks.aliases` entry of `metadata`.

    Args:
        path: the file.
        tensors: name -> tensor.
        metadata: the header metadata (completed in place with the aliases).
        writer: a `CheckpointWriter`, or None to write now.
        write_kwargs: `CheckpointWriter.write`'s `keep_previous_as` / `delete_after`.

    Example:

    ```python
    write_tensors("model.safetensors", model.state_dict(), header(WEIGHTS), None)
    ```
    """
    stored, aliases = deduplicate(tensors)
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases)
    (writer or CheckpointWriter()).write(path, stored, metadata, **write_kwargs)


def header(kind: str) -> dict[str, str]:
    """The header metadata every file of ours starts with, for `kind` (`WEIGHTS`, `TRAINING_STATE`).

    Args:
        kind: the file's kind.

    Example:

    ```python
    header(WEIGHTS)  # {'format': 'pt', 'torchcallbacks.kind': 'weights', 'torchcallbacks.format_version': '3'}
    ```
    """
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
    aliases = loads_strict(metadata.get(ALIASES_KEY, "{}"), f"{path!r}: metadata {ALIASES_KEY!r}")
    if not isinstance(aliases, dict) or not all(isinstance(kept, str) for kept in aliases.values()):
        raise CheckpointError(f"{path!r}: metadata {ALIASES_KEY!r} is not a JSON object of tensor names")
    for alias, kept in aliases.items():
        if kept not in tensors:
            raise CheckpointError(f"{path!r}: tied tensor {alias!r} refers to {kept!r}, which the file does not have")
        tensors[alias] = tensors[kept]


def model_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors of a file: those whose names do not start with `PREFIX`.

    Args:
        tensors: a file's tensors by name.

    Example:

    ```python
    model.load_state_dict(model_tensors(read_file("state.safetensors")[0]))
    ```
    """
    return {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
