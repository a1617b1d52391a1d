"""Sharded training states (FSDP2 DTensors) as a directory of safetensors shards and JSON, without pickle.

`save_sharded(directory, state)` / `load_sharded(directory, template)` store a state tree (the layout
of `LoopState.state_dict()`, whose tensors may be `DTensor`s) through `torch.distributed.checkpoint`:
every process writes only its own shards, nobody gathers the whole model or optimizer state. Both are
collective: every process of the group calls them at the same point (outside a process group they
work in one process).

What goes where (the directory, once complete):

- `shard-RRRRR-of-WWWWW.safetensors`, one per process that holds tensor chunks: plain safetensors
  files (readable by `safetensors.safe_open`), one tensor per chunk, named `<path>@<offsets>`.
- `dcp_metadata.json`: DCP's `Metadata` as JSON (written by the coordinator): for every tensor its
  dtype, global size and chunks (offsets, sizes, the file and the key that hold each chunk).
- `replicated.safetensors` (written by rank 0): the tensors that are not `DTensor`s (Adam's `step`,
  buffers FSDP leaves replicated, random states), under their paths in the tree. They are the same on
  every process, need no resharding, and every process reads them back without a template.
- `state.json` (written by rank 0, last): the tree with every tensor replaced by
  `{"__tensor__": "<path>"}` (the `encoding` module's tags), every process's `per_process` value,
  and the format and versions.

Why not DCP's own storage: `FileSystemWriter` pickles its `.metadata` (and `FileSystemReader`
unpickles it), and DCP's planners store non-tensor values as `torch.save` bytes and read them back
with `torch.load` and `weights_only` off. `HuggingFaceStorageWriter` writes no metadata file when every
process saves its own shards (the reader rebuilds it from whatever `*.safetensors` files are in the
directory, so a missing shard goes unnoticed), and it writes non-tensor values as raw pickled bytes
in front of the safetensors data. So tensors only go through DCP here, with our own storage layer
(`dcp_storage.SafetensorsShardWriter` / `SafetensorsShardReader`), and everything else is JSON.

Atomic at directory level: the files are written into `<directory>.tmp-<token>` (the token drawn by
rank 0 and sent to everyone), each fsynced; after every process has written its files, rank 0
publishes the directory (`storage.LocalStorage.publish`: a rename, or an atomic exchange with the
previous one); a crash in the middle of the fallback leaves a complete `.old-` directory, which
`load_sharded` then reads. A process killed at any instant leaves the previous checkpoint loadable;
the temp directory it leaves behind is removed by the next save.

This module is the protocol (`save_sharded`, `load_sharded`, `ShardedCheckpointWriter`); the pieces
it is built on live in `sharded_files` (names, JSON files), `dcp_storage` (DCP's storage writer and
reader), `storage` (the disk: `LocalStorage`, `remove_sharded`) and `full_weights`
(`export_full_weights`), and the names users import from here are re-exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from torchcallbacks.checkpoint.dcp_storage import (
    SafetensorsShardReader,
    SafetensorsShardWriter,
    parse_metadata,
)
from torchcallbacks.checkpoint.encoding import decode, encode, from_json, to_json
from torchcallbacks.checkpoint.errors import CheckpointError, raise_process_errors
from torchcallbacks.checkpoint.full_weights import export_full_weights
from torchcallbacks.checkpoint.sharded_files import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    METADATA_FORMAT,
    METADATA_VERSION,
    REPLICATED_FILE,
    STATE_FILE,
    check_own_file,
    is_sharded_state,
    read_json_file,
)
from torchcallbacks.checkpoint.storage import LOCAL, LocalStorage, remove_sharded
from torchcallbacks.distributed import all_gather_json, get_rank, get_world_size
from torchcallbacks.version import __version__

__all__ = [  # what users and tests import from here (some of it defined in the modules above)
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "METADATA_VERSION",
    "REPLICATED_FILE",
    "STATE_FILE",
    "SafetensorsShardReader",
    "SafetensorsShardWriter",
    "ShardedCheckpointWriter",
    "export_full_weights",
    "is_sharded_state",
    "load_sharded",
    "remove_sharded",
    "save_sharded",
    "sharded_states",
]

PathLike = str | os.PathLike[str]

#: Called by every process after its files are written and before the directory is published (a test
#: hook: a test sets it to sleep there, to kill the job in the middle of a save).
_before_publish: Callable[[], None] | None = None


def _cleanup_on_error(errors: list[Any], pending: _PendingSave) -> list[Any]:
    if any(errors) and get_rank() == 0:
        pending.storage.discard(pending.tmp)
    return errors


class _Unread(dict[str, Any]):
    """What `decode` looks tensors up in before they are read: every name is there, as None."""

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: str) -> None:
        return None


def load_sharded(
    directory: PathLike,
    state_template: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]],
    *,
    partial: bool = False,
    cast_dtypes: bool = False,
) -> tuple[dict[str, Any], list[Any] | None]:
    """Read a directory of `save_sharded` into the tensors of `state_template`, in place.

    Collective: every process calls it at the same point. Each process reads only the chunks its own
    shards need, whatever the number of processes that saved (so 2 -> 1 and 1 -> 2 reshard; without a
    process group, plain full-size tensors in the template receive whole tensors). The template must
    hold a tensor for every tensor that was saved as a `DTensor` (e.g. `get_state_dict` of the model and
    optimizer of the run that resumes) and may hold the others (replicated tensors it lacks are new
    tensors read from `replicated.safetensors`); a tensor it holds that the checkpoint lacks is an
    error. Values that are not tensors come from the JSON. Nothing is unpickled.

    Args:
        directory: the checkpoint directory.
        state_template: a tree of the saved structure whose tensors have the saved shapes and dtypes;
            they are overwritten. Its values that are not tensors are ignored. Or a function of the
            saved tree (its tensors not read yet: None in their places) that returns the template,
            called before any tensor is read: for templates that depend on what was saved (a
            callback state that holds a snapshot only once it has one; see `LoopState.sharded_template`),
            and for checks that must refuse a checkpoint before anything is read into the template.
        partial: sharded tensors the template lacks are not read (they are None in the returned
            state) instead of an error: for a caller that loads some parts only (`load_checkpoint`).
        cast_dtypes: a stored tensor of another dtype than the template's is cast into it (by
            default refused, naming the file and the key).

    Returns:
        `(state, processes)`: the saved tree, its tensors being the template's (now loaded), and the
        list of every saving process's `per_process` value (None if none was saved).

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: an incomplete or damaged directory, or a template that does not fit (tensors
            missing on either side, other shapes or dtypes): the message names the directory and the
            tensors.

    Example:

    ```python
    model_state, optim_state = get_state_dict(model, optimizer)  # the templates
    state, processes = load_sharded("ckpt/step-100", {"model": model_state, "optim": optim_state, "step": 0})
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ```
    """
    path = LOCAL.complete_directory(os.path.abspath(os.fspath(directory)))
    where = os.path.join(path, STATE_FILE)
    document = read_json_file(where, STATE_FILE)
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{where!r}: not a {FORMAT} document")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{where!r}: format version {version!r}; this torchcallbacks reads 1 to {FORMAT_VERSION}")
    saved = document.get("state")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where!r}: field 'state' must be a JSON object")
    names = _tensor_names(saved, set())
    lists = [document.get(field) for field in ("sharded", "replicated")]
    if not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in lists):
        raise CheckpointError(f"{where!r}: fields 'sharded' and 'replicated' must be lists of tensor names")
    sharded_names, replicated_names = set(lists[0]), set(lists[1])
    if sharded_names | replicated_names != names or sharded_names & replicated_names:
        raise CheckpointError(f"{where!r}: fields 'sharded' and 'replicated' do not list the tensors of field 'state'")
    if callable(state_template):
        try:
            unread = {key: decode(value, _Unread()) for key, value in saved.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where!r} is damaged: {exc}") from exc
        state_template = state_template(unread)
    _, template = _encode_tree(state_template)
    if partial:
        sharded_names &= template.keys()
    missing, unexpected = sorted(sharded_names - template.keys()), sorted(template.keys() - names)
    if missing or unexpected:
        raise CheckpointError(
            f"{path!r} does not fit the template: "
            + "; ".join(part for part in (
                f"sharded tensors the template lacks: {missing[:10]}" if missing else "",
                f"tensors the checkpoint lacks: {unexpected[:10]}" if unexpected else "",
            ) if part)
        )
    # Everything that can be checked before a tensor is read into the template (which may be the
    # model's own parameters) is checked first: the metadata (chunks tiling each tensor, files the
    # directory's own), the template's sizes and dtypes against it, the replicated file's tensors.
    metadata = parse_metadata(path)
    shards = {name: template[name] for name in sharded_names}
    _check_template(path, metadata, shards, cast_dtypes)
    tensors, copies = _read_replicated(path, sorted(replicated_names), template, cast_dtypes)
    try:
        with _one_process_is_intended():
            dcp.load(shards, storage_reader=SafetensorsShardReader(path, cast_dtypes=cast_dtypes, metadata=metadata),
                     planner=DefaultLoadPlanner())
    except (Exception, CheckpointException) as exc:  # DCP raises every process's error everywhere (a BaseException)
        raise _checkpoint_error(path, exc) from exc
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)
    tensors.update(shards)
    try:
        state = {key: decode(value, _Unread(tensors) if partial else tensors) for key, value in saved.items()}
        processes = document.get("processes")
        ranks = [from_json(p) for p in processes] if isinstance(processes, list) else None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where!r} is damaged: {exc}") from exc
    return state, ranks


def _read_replicated(
    path: str, names: list[str], template: Mapping[str, torch.Tensor], cast_dtypes: bool = False
) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The replicated tensors, by name: the template's tensors where it has them (same shape and,
    unless `cast_dtypes`, dtype required), else the tensors read; and the `(template tensor, value)`
    copies to make once everything is read (nothing is copied here). Every process reads the file
    itself (safetensors: no pickle)."""
    if not names:
        return {}, []
    file = os.path.join(path, REPLICATED_FILE)
    check_own_file(file)
    try:
        stored = load_file(file)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path!r} is not a complete sharded checkpoint: no {REPLICATED_FILE}") from exc
    except Exception as exc:  # safetensors' own errors (a truncated or damaged file)
        raise CheckpointError(f"{file!r}: cannot read it: {exc}") from exc
    absent = [n for n in names if n not in stored]
    if absent:
        raise CheckpointError(f"{file!r} lacks the tensors {absent[:10]}")
    out: dict[str, torch.Tensor] = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name in names:
        value, target = stored[name], template.get(name)
        if target is None:
            out[name] = value
            continue
        if isinstance(target, DTensor) or target.shape != value.shape or (target.dtype != value.dtype and not cast_dtypes):
            raise CheckpointError(
                f"{file!r}: tensor {name!r} is {tuple(value.shape)} {value.dtype} (not sharded); the template has "
                f"{tuple(target.shape)} {target.dtype}{' as a DTensor' if isinstance(target, DTensor) else ''}"
            )
        copies.append((target, value))
        out[name] = target
    return out, copies


def _check_template(path: str, metadata: Metadata, shards: Mapping[str, torch.Tensor], cast_dtypes: bool) -> None:
    """Each sharded tensor of the template has the global size and (unless `cast_dtypes`) the dtype
    the metadata records for it, before anything is read."""
    differ: list[str] = []
    shapes = False
    for name in sorted(shards):
        target, md = shards[name], metadata.state_dict_metadata.get(name)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{os.path.join(path, METADATA_FILE)!r} has no entry for tensor {name!r}")
        shape = tuple(target.shape) != tuple(md.size)
        if shape or (target.dtype != md.properties.dtype and not cast_dtypes):
            shapes = shapes or shape
            differ.append(f"tensor {name!r} is stored as {tuple(md.size)} {md.properties.dtype}, the tensor it is loaded "
                          f"into is {tuple(target.shape)} {target.dtype}")
    if differ:
        raise CheckpointError(f"{path!r}: " + "; ".join(differ[:10]) + ("" if shapes else " (cast_dtypes=True casts dtypes)"))


def _checkpoint_error(path: str, exc: BaseException) -> CheckpointError:
    """DCP's error (a `CheckpointException` wrapping every process's) as a CheckpointError: a
    process's own CheckpointError's message when there is one."""
    failures = exc.failures if isinstance(exc, CheckpointException) else {}
    for failure in failures.values():  # (exception, traceback) per process
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            return CheckpointError(str(inner))
    return CheckpointError(f"loading {path!r} failed: {exc}")


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process outside a process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# -- the state tree ----------------------------------------------------------------------------------
def _encode_tree(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and k and "/" not in k for k in state):
        raise TypeError("state: expected a dict with non-empty string keys without '/'")
    tensors: dict[str, torch.Tensor] = {}
    document = {key: encode(value, key, tensors) for key, value in state.items()}
    return document, tensors


def _tensor_names(document: Any, out: set[str]) -> set[str]:
    if isinstance(document, list):
        for value in document:
            _tensor_names(value, out)
    elif isinstance(document, dict):
        if len(document) == 1 and "__tensor__" in document:
            out.add(document["__tensor__"])
        else:
            for value in document.values():
                _tensor_names(value, out)
    return out


def save_sharded(
    directory: PathLike, state: Mapping[str, Any], *, per_process: Any = None, storage: LocalStorage = LOCAL,
    keep_previous_as: PathLike | None = None,
) -> int:
    """Save a state tree whose tensors may be `DTensor`s as a sharded checkpoint directory, atomically.

    Collective: every process calls it at the same point with trees of the same structure. Each
    process writes the chunks of its own shards (a tensor that is not a `DTensor` is taken to be the
    same on every process and written once); rank 0 writes the rest of the tree as JSON, so every
    value that is not a tensor must also be the same on every process. Values that differ between
    processes (random states, a loop's own parts) go in `per_process`: every process's value is kept.

    Args:
        directory: the checkpoint directory to create or replace (it appears only complete).
        state: the tree: dicts, lists, tuples, numbers, strings, None and tensors (e.g. model and
            optimizer state dicts from `torch.distributed.checkpoint.state_dict.get_state_dict`).
        per_process: this process's own JSON-able value (tensors allowed), or None.
        storage: where the files go (`storage.LocalStorage`; the shard files themselves are written
            by DCP's storage writer, `dcp_storage.SafetensorsShardWriter`).
        keep_previous_as: the directory the replaced checkpoint becomes (a fallback copy), instead of
            being deleted.

    Returns:
        The bytes this process wrote to its shard file.

    Raises:
        CheckpointError: a process failed to write (every process raises; the previous checkpoint
            is left as it was).

    Example:

    ```python
    model_state, optim_state = get_state_dict(model, optimizer)
    save_sharded("ckpt/step-100", {"model": model_state, "optim": optim_state, "step": 100},
                 per_process={"rng": capture_rng_state()})
    ```
    """
    pending = _stage(directory, state, per_process, defer=False, storage=storage, keep_previous_as=keep_previous_as)
    return _finish(pending, _write_rest(pending))


@dataclasses.dataclass
class _PendingSave:
    """A save whose collective part is done (temp directory agreed, DCP planned, metadata written):
    what is left is each process's own files (`_write_rest`) and the publication (`_finish`)."""

    target: str
    tmp: str
    token: str
    writer: SafetensorsShardWriter
    replicated: dict[str, torch.Tensor]  # rank 0's to write; empty elsewhere
    state_document: dict[str, Any] | None  # rank 0's state.json; None elsewhere
    storage: LocalStorage
    keep_previous_as: str | None = None  # what the replaced directory becomes


def _stage(
    directory: PathLike, state: Mapping[str, Any], per_process: Any, *, defer: bool, storage: LocalStorage = LOCAL,
    keep_previous_as: PathLike | None = None,
) -> _PendingSave:
    """The collective first part of a save (every process): agree on the temp directory, run DCP's
    planning and write its metadata, and gather every process's `per_process` value. With `defer`, the
    shards and the replicated tensors are copied to host buffers of their own, to be written later."""
    target = os.path.abspath(os.fspath(directory))
    document, tensors = _encode_tree(state)
    shards = {name: t for name, t in tensors.items() if isinstance(t, DTensor)}
    rank0 = get_rank() == 0
    replicated = {
        name: t.detach().to("cpu", copy=defer).contiguous() for name, t in tensors.items() if not isinstance(t, DTensor)
    } if rank0 else {}
    replicated_names = sorted(name for name, t in tensors.items() if not isinstance(t, DTensor))
    own = to_json(per_process) if per_process is not None else None
    error = None
    if rank0:
        try:
            storage.prepare_directory(target)
        except OSError as exc:
            error = repr(exc)
    agreed = all_gather_json([uuid.uuid4().hex, error])
    raise_process_errors([e for _, e in agreed], f"saving {target!r}")
    token = agreed[0][0]
    tmp = f"{target}.tmp-{token}"
    writer = SafetensorsShardWriter(tmp, defer=defer)
    try:
        with _one_process_is_intended():
            dcp.save(shards, storage_writer=writer, planner=DefaultSavePlanner())
    except (Exception, CheckpointException) as exc:  # DCP raises on every process when one fails (a BaseException)
        if rank0:
            storage.discard(tmp)
        raise CheckpointError(f"saving {target!r} failed: {exc}") from exc
    processes = all_gather_json(own) if per_process is not None else None
    state_document = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
        "torch_version": torch.__version__, "world_size": get_world_size(),
        "state": document, "processes": processes,
        "sharded": sorted(shards), "replicated": replicated_names,
    } if rank0 else None
    previous = os.path.abspath(os.fspath(keep_previous_as)) if keep_previous_as is not None else None
    return _PendingSave(target, tmp, token, writer, replicated, state_document, storage, previous)


def _write_rest(pending: _PendingSave) -> str | None:
    """This process's files of a staged save (its shard file; on rank 0 also the replicated tensors and
    state.json), fsynced. Local: may run on a background thread. Returns the error, if any, as text."""
    try:
        pending.writer.write_deferred()
        if pending.state_document is not None:
            pending.storage.make_directory(pending.tmp)  # a tree without DTensors
            if pending.replicated:
                pending.storage.write_tensors(os.path.join(pending.tmp, REPLICATED_FILE), pending.replicated)
            pending.storage.write_json(os.path.join(pending.tmp, STATE_FILE), pending.state_document)
        pending.storage.sync_directory(pending.tmp)
    except Exception as exc:
        return repr(exc)
    finally:
        pending.replicated = {}  # the buffers go as soon as they are written
    return None


def _finish(pending: _PendingSave, error: str | None) -> int:
    """The collective last part of a save (every process): once every process has written its files,
    rank 0 publishes the directory. Raises a `CheckpointError` on every process if any failed."""
    if error is None and _before_publish is not None:
        try:
            _before_publish()
        except Exception as exc:
            error = repr(exc)
    raise_process_errors(_cleanup_on_error(all_gather_json(error), pending), f"saving {pending.target!r}")
    error = None
    if get_rank() == 0:
        try:
            pending.storage.publish(pending.tmp, pending.target, pending.token, keep_previous_as=pending.keep_previous_as)
        except OSError as exc:
            error = repr(exc)
            pending.storage.discard(pending.tmp)
    raise_process_errors(all_gather_json(error), f"publishing {pending.target!r}")
    return pending.writer.bytes_written


class ShardedCheckpointWriter:
    """Saves sharded checkpoints (`save_sharded`) synchronously, or with the writing overlapping
    training (`async_save=True`).

    Asynchronous saves do their collective part on the calling (training) thread: the temp directory,
    DCP's planning and metadata, and a copy of this process's shards (and, on rank 0, of the replicated
    tensors) into host buffers of their own, so the extra memory is this process's own shards. A
    background thread then writes the files and fsyncs them while training goes on. The directory is
    published at the next `save()` or at `flush()` (both collective: every process calls them at the
    same point), so until then the previous checkpoint is the one on disk. At most one save is in flight.

    Args:
        async_save: write on a background thread (see above).
        storage: where the files go (see `save_sharded`).

    Example:

    ```python
    saver = ShardedCheckpointWriter(async_save=True)
    saver.save("backup/latest", callbacks.loop.state_dict())  # returns once the shards are copied
    ...                                                       # training goes on while they are written
    saver.flush()                                             # every process: published now
    ```
    """

    def __init__(self, async_save: bool = False, *, storage: LocalStorage = LOCAL) -> None:
        self.async_save = bool(async_save)
        self.storage = storage
        self._pending: _PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def save(
        self, directory: PathLike, state: Mapping[str, Any], *, per_process: Any = None,
        keep_previous_as: PathLike | None = None,
    ) -> None:
        """Save `state` as a sharded checkpoint at `directory` (collective; see `save_sharded`).

        Args:
            directory: the checkpoint directory to create or replace.
            state: the tree (see `save_sharded`).
            per_process: this process's own value (see `save_sharded`).
            keep_previous_as: the directory the replaced checkpoint becomes (see `save_sharded`).

        Example:

        ```python
        saver.save("ckpt/epoch-3", {"model": model_state, "optim": optim_state, "epoch": 3})
        ```
        """
        self.flush()  # the save in flight is published first: one at a time
        if not self.async_save:
            save_sharded(directory, state, per_process=per_process, storage=self.storage, keep_previous_as=keep_previous_as)
            return
        pending = _stage(directory, state, per_process, defer=True, storage=self.storage, keep_previous_as=keep_previous_as)
        self._pending, self._error = pending, None

        def job() -> None:
            self._error = _write_rest(pending)

        self._thread = threading.Thread(target=job, name="torchcallbacks-sharded-writer", daemon=False)
        self._thread.start()

    def flush(self) -> None:
        """Wait for the save in flight and publish it (collective); raises its error, if any, as a
        `CheckpointError` on every process.

        Example:

        ```python
        saver.flush()  # at train end, on every process
        ```
        """
        pending = self._pending
        if pending is None:
            return
        self._wait()
        self._pending = None
        _finish(pending, self._error)

    def abandon(self) -> None:
        """Wait for the save in flight, if any, and drop it unpublished (not collective: for a process
        that leaves after an error). Its temp directory is removed by the next save there.

        Example:

        ```python
        saver.abandon()
        ```
        """
        self._wait()
        self._pending = None

    def _wait(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()


def sharded_states(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """`{"model": ..., "optimizers": [...]}`: the DTensor state dicts of an FSDP2 model and its
    optimizers (`get_model_state_dict` / `get_optimizer_state_dict`, keyed by parameter names; an
    empty optimizer state is initialised), what a training state holds and a load reads into.

    Args:
        model: the sharded model (not wrapped).
        optimizers: its optimizers.

    Example:

    ```python
    template = sharded_states(model, [optimizer])
    ```
    """
    return {"model": get_model_state_dict(model), "optimizers": [get_optimizer_state_dict(model, o) for o in optimizers]}
