"""Weights-only files and training-state files: `save_weights`, `load_weights`, `save_checkpoint`,
`load_checkpoint`. The layout is specified in docs/checkpoint-format.md.

Both kinds are plain safetensors files. Model tensors are stored under their `state_dict()` names, so
`safetensors.torch.load_file` / `load_model` read weights-only files as they are; everything else of a
training state is stored under names starting with `@` plus a JSON document in the header metadata.
Nothing here ever unpickles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.checkpoint.fsspec_storage import storage_for
from torchcallbacks.checkpoint.full_weights import load_sharded_weights, read_weights, write_weights
from torchcallbacks.checkpoint.model_keys import load_model_tensors
from torchcallbacks.checkpoint.sharded_files import is_sharded_state
from torchcallbacks.checkpoint.tensor_files import (  # the format's names, also read from here
    ALIASES_KEY,
    FORMAT_VERSION,
    KIND_KEY,
    PREFIX,
    STATE_KEY,
    TRAINING_STATE,
    VERSION_KEY,
    WEIGHTS,
    PathLike,
    header,
    model_tensors,
    read_file,
    restore_aliases,
    write_tensors,
)
from torchcallbacks.checkpoint.writer import CheckpointWriter
from torchcallbacks.distributed import has_dtensors, unwrap_model

__all__ = [
    "ALIASES_KEY",
    "FORMAT_VERSION",
    "KIND_KEY",
    "PREFIX",
    "STATE_KEY",
    "TRAINING_STATE",
    "VERSION_KEY",
    "WEIGHTS",
    "PathLike",
    "load_weights",
    "read_file",
    "restore_aliases",
    "save_weights",
]


# -- weights only ------------------------------------------------------------------------------------
def save_weights(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    filepath: PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    writer: CheckpointWriter | None = None,
    delete_after: Sequence[str] = (),
    max_shard_size: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
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

    `filepath` may be a URL (`s3://bucket/run/model.safetensors`, `memory://...`): the file is then
    uploaded through fsspec and committed by its manifest `X.safetensors.manifest.json`
    (`checkpoint.fsspec_storage`; `pip install torchcallbacks[s3]` for S3). Split (`max_shard_size`)
    and FSDP2-sharded weights are local only for now (a ValueError for a URL).

    Args:
        model: a `torch.nn.Module` (DDP-wrapped or FSDP2-sharded is fine) or a state dict.
        filepath: where to write; the directory is created if needed.
        metadata: extra string -> string entries for the file's header.
        writer: a `CheckpointWriter` (e.g. an asynchronous one); default: write now.
        delete_after: files to delete once the new file is written (with their split files and index).
        max_shard_size: the most bytes of tensors in one file (a larger tensor gets a file of its own),
            or None (default) for one file.
        storage_options: for a URL, fsspec's options (`{"client_kwargs": {"endpoint_url": ...},
            "key": ..., "secret": ...}` for s3fs); fsspec's own configuration applies too.

    Raises:
        ValueError: `max_shard_size` is not None or a positive integer; split or sharded weights to a URL.
        ImportError: the URL's fsspec backend is not installed (the message names the extra).

    Example:

    ```python
    torchcallbacks.save_weights(model, "model.safetensors")
    torchcallbacks.load_weights(model, "model.safetensors")
    torchcallbacks.save_weights(fsdp_model, "big.safetensors", max_shard_size=2**30)  # on every process
    ```
    """
    filepath, storage = storage_for(filepath, storage_options, "save_weights: filepath")
    state = unwrap_model(model).state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    file_header = {**{str(k): str(v) for k, v in (metadata or {}).items()}, **header(WEIGHTS)}
    if storage.remote:
        if max_shard_size is not None or has_dtensors(state.values()):
            raise ValueError(
                f"save_weights: filepath {filepath!r} is a URL; split (max_shard_size) and FSDP2-sharded weights "
                "are written to local paths only (sharded remote states are not supported yet)"
            )
        if writer is None:
            writer = CheckpointWriter(storage=storage)
        elif not getattr(writer.storage, "remote", False):
            raise ValueError(f"save_weights: filepath {filepath!r} is a URL, but writer writes to the local disk")
        write_tensors(filepath, state, file_header, writer, delete_after=delete_after)
        return
    if max_shard_size is not None or has_dtensors(state.values()):
        if writer is not None:
            writer.flush()
        write_weights(state, filepath, file_header, max_shard_size=max_shard_size, delete_after=delete_after)
        return
    write_tensors(filepath, state, file_header, writer, delete_after=delete_after)


def load_weights(
    model: torch.nn.Module, filepath: PathLike, strict: bool = True, *, cast_dtypes: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
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

    `filepath` may be a URL (`s3://...`, `memory://...`) of a file committed by its manifest
    (`save_weights` to a URL, a `ModelCheckpoint` there): its bytes are downloaded (the header length
    field first, by a ranged read), checked against the manifest (size, sha256) and loaded from
    memory; a file without a manifest (an upload never committed) is a FileNotFoundError. Into a
    plain (not FSDP2-sharded) model only, for now.

    Args:
        model: the module to load into (DDP-wrapped or FSDP2-sharded is fine).
        filepath: the file, index or directory.
        strict: require exactly the model's keys. Shapes must match either way.
        cast_dtypes: copy tensors stored in another dtype than the model's into it, cast (what torch's
            `load_state_dict` does silently). By default such a tensor is refused, naming the key and
            both dtypes: a dtype that changed in a file (a float32 weight whose header says int32) is
            a sign of damage. Pass True to load, e.g., a float16 file into a float32 model.
        storage_options: for a URL, fsspec's options (see `save_weights`).

    Raises:
        ImportError: the URL's fsspec backend is not installed (the message names the extra).
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
    path, storage = storage_for(filepath, storage_options, "load_weights: filepath")
    module = unwrap_model(model)
    if storage.remote:
        if has_dtensors(module.parameters()):
            raise ValueError(f"load_weights: filepath {path!r} is a URL; loading into an FSDP2-sharded model "
                             "is supported from local paths only (sharded remote states are not supported yet)")
        tensors, metadata = storage.read_file(path)
        load_model_tensors(path, module, model_tensors(tensors), metadata, strict, cast_dtypes)
        return
    if os.path.isdir(path) and is_sharded_state(path):  # a sharded training state: its model part
        # DCP's modules (a second's import) only when one is read: `import torchcallbacks` stays light
        from torchcallbacks.checkpoint.sharded_model import load_state_weights

        load_state_weights(module, path, strict, cast_dtypes=cast_dtypes)
        return
    if has_dtensors(module.parameters()):
        load_sharded_weights(module, path, strict, cast_dtypes=cast_dtypes)
        return
    if not os.path.isfile(path) or path.endswith(".index.json"):
        where, tensors, metadata = read_weights(path)
        load_model_tensors(where, module, model_tensors(tensors), metadata, strict, cast_dtypes)
        return
    tensors, metadata = read_file(path)
    load_model_tensors(path, module, model_tensors(tensors), metadata, strict, cast_dtypes)
