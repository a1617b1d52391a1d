"""Training-state files: the whole state of a run in one safetensors file (docs/checkpoint-format.md).

`write_training_state` / `read_training_state` store and read a state tree (what
`LoopState.state_dict()` returns: counters, model, optimizers, scaler, callback states, the loop's own
parts, random states) and know nothing of what the parts mean: `LoopState` (callbacks/loop_state.py)
owns the layout and checks it, and `save_checkpoint` / `load_checkpoint`
(callbacks/checkpoint_functions.py) are built on it. Files of format 1 are read and upgraded to the
current layout, and so are files with a top-level `schedulers` list (what `save_checkpoint` wrote
before it was built on `LoopState`); files of format 2 differ only in holding numpy's and Python's
random-state words as lists of ints, which `check_rng_state` and `restore_rng_state` take as they
are. Nothing here ever unpickles.
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
from torchcallbacks.checkpoint.reader import loads_strict
from torchcallbacks.checkpoint.tensor_files import (
    FORMAT_VERSION,
    KIND_KEY,
    PREFIX,
    STATE_KEY,
    TRAINING_STATE,
    PathLike,
    header,
    model_tensors,
    read_file,
    write_tensors,
)
from torchcallbacks.checkpoint.validate import check_counter
from torchcallbacks.checkpoint.writer import CheckpointWriter
from torchcallbacks.version import __version__

#: Document entries that describe the file rather than the state.
_FILE_FIELDS = ("format", "format_version", "library_version", "torch_version")


@dataclass
class TrainingState:
    """What a training state held besides what was loaded in place: what `load_checkpoint` and
    `LoopState.load_state_dict` return (the one place that makes it) and `BackupAndRestore.restored`.

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
    file_header = header(TRAINING_STATE)
    file_header[STATE_KEY] = json.dumps(document, allow_nan=False)
    write_tensors(path, tensors, file_header, writer, keep_previous_as=keep_previous_as, delete_after=delete_after)


# -- reading -----------------------------------------------------------------------------------------
def read_training_state(path: PathLike, *, storage: Any = None) -> dict[str, Any]:
    """The state tree of a training-state file, in the one layout of `LoopState.state_dict()`: files
    of format 1, and files with a top-level `schedulers` list (`save_checkpoint` before it was built on
    `LoopState`), are upgraded to it.

    Nothing is validated beyond the file itself: the parts are checked by `LoopState.load_state_dict`
    (which `load_checkpoint` and `BackupAndRestore` use) before anything is applied.

    Args:
        path: the file.
        storage: where it is (`storage.LocalStorage`, `fsspec_storage.FsspecStorage`); None: a local path.

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
    tensors, metadata = read_file(path) if storage is None else storage.read_file(path)
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
        # in place: the parsed document is read once (a copy would double the peak of a large header)
        state: dict[str, Any] = {k: decode(v, tensors, in_place=True) for k, v in document.items() if k not in _FILE_FIELDS}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the training-state metadata is damaged: {exc}") from exc
    state["model"] = model_tensors(tensors)
    state["library_version"] = document.get("library_version", "")
    for name in ("epoch", "batch", "global_step"):
        check_counter(state.get(name), where, name)
    if version == 1:
        state = _upgrade_format_1(state)
    return _upgrade_schedulers(state, where) if "schedulers" in state else state


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


def _upgrade_schedulers(state: dict[str, Any], where: str) -> dict[str, Any]:
    """The layout `save_checkpoint` wrote before it was built on `LoopState` (and format 1 backups):
    a top-level `schedulers` list -> the loop parts `scheduler/<i>` (`BackupAndRestore(scheduler=...)`'s
    names), in the loop part of the file and of every process in `ranks`; `extra` is the same field."""
    schedulers = state.pop("schedulers")
    if not isinstance(schedulers, list):
        raise CheckpointError(f"{where}: field 'schedulers' must be a list, found {schedulers!r}")
    named = {f"scheduler/{i}": s for i, s in enumerate(schedulers)}
    loop = state.get("loop")
    state["loop"] = {**named, **(loop if isinstance(loop, dict) else {})}
    for rank in state.get("ranks") or []:
        if isinstance(rank, dict):
            part = rank.get("loop")
            rank["loop"] = {**named, **(part if isinstance(part, dict) else {})}
    return state
