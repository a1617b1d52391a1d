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
(`SafetensorsShardWriter` / `SafetensorsShardReader`), and everything else is JSON.

Atomic at directory level: the files are written into `<directory>.tmp-<token>` (the token drawn by
rank 0 and sent to everyone), each fsynced; after a barrier rank 0 publishes the directory: when
there is none yet, one `rename`; when one exists, an atomic exchange of the two directories
(`renameat2(RENAME_EXCHANGE)` on Linux) and then the old one (now under the temp name) is deleted.
Where the exchange is not available the previous directory is first renamed to
`<directory>.old-<token>` and the new one renamed into place; a crash between those two renames
leaves no `<directory>` but a complete `.old-` one, which `load_sharded` then reads. A process killed
at any instant leaves the previous checkpoint loadable; the temp directory it leaves behind is removed
by the next save.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import glob
import math
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from torchcallbacks.checkpoint.encoding import decode, encode, from_json, to_json
from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.writer import _fsync_dir, atomic_write_json, fsync_file
from torchcallbacks.checks import check_local_path
from torchcallbacks.distributed import all_gather_json, barrier, get_rank, get_world_size
from torchcallbacks.version import __version__

PathLike = str | os.PathLike[str]

#: The files of a complete sharded checkpoint directory.
STATE_FILE = "state.json"
METADATA_FILE = "dcp_metadata.json"
REPLICATED_FILE = "replicated.safetensors"
FORMAT = "torchcallbacks.sharded_state"
METADATA_FORMAT = "torchcallbacks.dcp_metadata"
#: Of `state.json`. 2: numpy's and Python's random-state words are tensors (replicated ones), not JSON
#: lists; version 1 directories (lists) are still read.
FORMAT_VERSION = 2
#: Of `dcp_metadata.json` (unchanged since version 1).
METADATA_VERSION = 1

#: dtype names allowed in `dcp_metadata.json` (those safetensors stores).
_DTYPE_NAMES = {name: d for name in dir(torch) if isinstance(d := getattr(torch, name), torch.dtype)}

#: Called by every process after its files are written and before the directory is published (a test
#: hook: a test sets it to sleep there, to kill the job in the middle of a save).
_before_publish: Callable[[], None] | None = None


# -- small file helpers ------------------------------------------------------------------------------
def _check_own_file(path: str) -> None:
    """A file of a checkpoint directory must be the directory's own: a symbolic link (to a file
    outside it, or anywhere: an edited or planted directory) is refused without being opened."""
    if os.path.islink(path):
        raise CheckpointError(
            f"{path!r} is a symbolic link: the files of a sharded checkpoint directory must be its own regular files"
        )


def _read_json_file(path: str, what: str) -> Any:
    from torchcallbacks.checkpoint.reader import loads_strict

    _check_own_file(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{os.path.dirname(path)!r} is not a complete sharded checkpoint: no {what}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path!r}: cannot read the {what}: {exc}") from exc
    document = loads_strict(text, repr(path))
    if not isinstance(document, dict):
        raise CheckpointError(f"{path!r}: the {what} is not a JSON object")
    return document


# -- DCP storage: safetensors shards and JSON metadata -----------------------------------------------
def _shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def _chunk_key(fqn: str, offsets: Any) -> str:
    return f"{fqn}@{','.join(str(int(o)) for o in offsets)}"


@dataclasses.dataclass(frozen=True)
class _ChunkLocation:
    """Where one chunk of a tensor is stored: a shard file of the directory and the tensor name in it."""

    file: str
    key: str


class SafetensorsShardWriter(StorageWriter):
    """A DCP `StorageWriter` that writes each process's chunks to one safetensors file and the
    checkpoint's `Metadata` as JSON (`dcp_metadata.json`): nothing is pickled.

    Only tensors can be stored (a non-tensor value of the state dict raises a `TypeError`: such values
    belong in JSON, see `save_sharded`).

    Args:
        path: the directory to write into (created if needed).
        defer: copy this process's chunks into host buffers of their own during `dcp.save` and write
            the file later, with `write_deferred()` (e.g. on a background thread while training goes
            on); the metadata is written during `dcp.save` in either case.

    Example:

    ```python
    torch.distributed.checkpoint.save({"w": dtensor}, storage_writer=SafetensorsShardWriter("ckpt.tmp"))
    ```
    """

    def __init__(self, path: PathLike, *, defer: bool = False) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.defer = defer
        self.bytes_written = 0
        self.is_coordinator = False
        self._deferred: tuple[str, dict[str, torch.Tensor]] | None = None

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.bytes_written = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        bad = [item.index.fqn for item in plan.items if item.type == WriteItemType.BYTE_IO]
        if bad:
            raise TypeError(f"only tensors are stored through DCP here; non-tensor values: {bad}")
        os.makedirs(self.path, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(plan, storage_data=_shard_name(i, len(plans))) for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        file_name: str = plan.storage_data
        tensors: dict[str, torch.Tensor] = {}
        results: list[WriteResult] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if not isinstance(data, torch.Tensor):  # pragma: no cover - refused by prepare_local_plan
                raise TypeError(f"{item.index.fqn}: only tensors are stored through DCP here")
            assert item.tensor_data is not None
            key = _chunk_key(item.index.fqn, item.tensor_data.chunk.offsets)
            # deferred: a copy of its own (training changes the live shard meanwhile)
            tensor = data.detach().to("cpu", copy=self.defer).contiguous()
            tensors[key] = tensor
            size = tensor.numel() * tensor.element_size()
            results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=_ChunkLocation(file_name, key)))
        if tensors:
            self._deferred = (os.path.join(self.path, file_name), tensors)
            if not self.defer:
                self.write_deferred()
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def write_deferred(self) -> None:
        """Write this process's shard file (fsynced) if `dcp.save` left it to be written, and let go of
        its buffers. Touches only this process's file: safe on a background thread.

        Example:

        ```python
        writer = SafetensorsShardWriter("ckpt.tmp", defer=True)
        torch.distributed.checkpoint.save(shards, storage_writer=writer)
        writer.write_deferred()
        ```
        """
        if self._deferred is None:
            return
        (path, tensors), self._deferred = self._deferred, None
        save_file(tensors, path, metadata={"format": "pt"})
        fsync_file(path)
        self.bytes_written = os.path.getsize(path)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        locations = {(r.index.fqn, tuple(r.index.offset or ())): r.storage_data for rs in results for r in rs}
        tensors: dict[str, Any] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):  # pragma: no cover - refused by prepare_local_plan
                raise TypeError(f"{fqn}: only tensors are stored through DCP here")
            chunks = []
            for chunk in md.chunks:
                where = locations[(fqn, tuple(chunk.offsets))]
                chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "file": where.file, "key": where.key})
            tensors[fqn] = {
                "dtype": str(md.properties.dtype).removeprefix("torch."), "size": list(md.size), "chunks": chunks,
            }
        atomic_write_json(os.path.join(self.path, METADATA_FILE),
                         {"format": METADATA_FORMAT, "format_version": METADATA_VERSION, "tensors": tensors})

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _overlapping(boxes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[int, int] | None:
    """The indices of two chunks `(offsets, sizes)` of one tensor that share an element, or None.

    A sweep along the first dimension: each chunk is compared with those whose rows it meets (FSDP2
    shards along rows, so that is a handful), not with all of them."""
    live = [i for i, (_, sizes) in enumerate(boxes) if all(n > 0 for n in sizes)]  # empty chunks hold nothing
    if live and not boxes[live[0]][0]:  # a 0-d tensor: every chunk that is not empty is its one element
        return (live[0], live[1]) if len(live) > 1 else None
    open_chunks: list[int] = []
    for i in sorted(live, key=lambda k: boxes[k][0][0]):
        offsets, sizes = boxes[i]
        open_chunks = [j for j in open_chunks if boxes[j][0][0] + boxes[j][1][0] > offsets[0]]
        for j in open_chunks:
            other, other_sizes = boxes[j]
            if all(a < b + m and b < a + n for a, n, b, m in zip(offsets, sizes, other, other_sizes, strict=True)):
                return (min(i, j), max(i, j))
        open_chunks.append(i)
    return None


def _parse_metadata(path: str) -> Metadata:
    """`dcp_metadata.json` as DCP's `Metadata`, every field checked (a damaged file names itself)."""
    where = os.path.join(path, METADATA_FILE)
    document = _read_json_file(where, METADATA_FILE)
    version = document.get("format_version")
    if document.get("format") != METADATA_FORMAT or type(version) is not int or version != METADATA_VERSION:
        raise CheckpointError(
            f"{where!r}: not a {METADATA_FORMAT} document of version {METADATA_VERSION} (field 'format' is "
            f"{document.get('format')!r}, 'format_version' {version!r})"
        )
    entries = document.get("tensors")
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where!r}: field 'tensors' must be a JSON object")

    def ints(value: Any, field: str) -> list[int]:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise CheckpointError(f"{where!r}: field {field!r} must be a list of integers >= 0, found {value!r}")
        return value

    present: dict[str, bool] = {}

    def own_file(name: str) -> bool:
        if name not in present:
            file = os.path.join(path, name)
            _check_own_file(file)
            present[name] = os.path.basename(name) == name and name not in ("", ".", "..") and os.path.isfile(file)
        return present[name]

    state_dict_metadata: dict[str, Any] = {}
    storage_data: dict[MetadataIndex, _ChunkLocation] = {}
    for fqn, entry in entries.items():
        field = f"tensors/{fqn}"
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPE_NAMES or not isinstance(entry.get("chunks"), list):
            raise CheckpointError(f"{where!r}: field {field!r} must have a known 'dtype', a 'size' and 'chunks'")
        size = ints(entry.get("size"), f"{field}/size")
        chunks, boxes, volume = [], [], 0
        for i, chunk in enumerate(entry["chunks"]):
            if not isinstance(chunk, dict) or not isinstance(chunk.get("file"), str) or not isinstance(chunk.get("key"), str):
                raise CheckpointError(f"{where!r}: field {field}/chunks/{i} must name a 'file' and a 'key'")
            offsets = ints(chunk.get("offsets"), f"{field}/chunks/{i}/offsets")
            sizes = ints(chunk.get("sizes"), f"{field}/chunks/{i}/sizes")
            if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)
            ):
                raise CheckpointError(f"{where!r}: field {field}/chunks/{i} lies outside the tensor of size {size}")
            if not own_file(chunk["file"]):
                raise CheckpointError(f"{where!r}: field {field}/chunks/{i} names file {chunk['file']!r}, which the directory lacks")
            volume += math.prod(sizes)
            boxes.append((offsets, sizes))
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            storage_data[MetadataIndex(fqn, offsets)] = _ChunkLocation(chunk["file"], chunk["key"])
        # The chunks must tile the tensor exactly once: none overlapping another (a load would take one
        # of them, or the part of a weight that only an overlap leaves out would keep its initial values)
        # and, then, none missing (their elements add up to the tensor's).
        overlap = _overlapping(boxes)
        if overlap is not None:
            i, j = overlap
            raise CheckpointError(
                f"{where!r}: chunks {i} and {j} of tensor {fqn!r} overlap (offsets {boxes[i][0]} sizes {boxes[i][1]}, "
                f"offsets {boxes[j][0]} sizes {boxes[j][1]}): each element must be in exactly one chunk"
            )
        if volume != math.prod(size):
            raise CheckpointError(
                f"{where!r}: the chunks of {field!r} cover {volume} of its {math.prod(size)} elements: each "
                "element must be in exactly one chunk"
            )
        state_dict_metadata[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=_DTYPE_NAMES[entry["dtype"]]), size=torch.Size(size), chunks=chunks,
        )
    return Metadata(state_dict_metadata=state_dict_metadata, storage_data=storage_data, storage_meta=StorageMeta())


class SafetensorsShardReader(StorageReader):
    """The DCP `StorageReader` of `SafetensorsShardWriter`'s directories: the metadata is read from
    JSON (checked: known dtypes, chunks inside their tensor and covering it, files present) and each
    chunk with `safetensors.safe_open`, sliced to what the reading process needs. Nothing is unpickled.

    Before any chunk is copied into the template, every chunk this process reads is checked in its
    shard file's header: present, of the shape and dtype `dcp_metadata.json` gives it (a shard
    rewritten with another dtype under the same metadata is refused naming the file and the key), so
    a refusal leaves the template as it was.

    Args:
        path: the directory.
        cast_dtypes: cast a chunk of another dtype than the template's (the metadata's dtype, which
            `load_sharded` compares with the template's first) into it.
        metadata: the directory's metadata, already read and checked (`load_sharded` reads it before
            anything else); None: read it when DCP asks.

    Example:

    ```python
    torch.distributed.checkpoint.load(template, storage_reader=SafetensorsShardReader("ckpt"))
    ```
    """

    def __init__(self, path: PathLike, *, cast_dtypes: bool = False, metadata: Metadata | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.cast_dtypes = cast_dtypes
        self.metadata = metadata
        self.storage_data: dict[MetadataIndex, _ChunkLocation] = {}
        self.chunk_specs: dict[MetadataIndex, tuple[list[int], torch.dtype]] = {}

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata if self.metadata is not None else _parse_metadata(self.path)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data
        self.chunk_specs = {
            MetadataIndex(fqn, chunk.offsets): (list(chunk.sizes), md.properties.dtype)
            for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
            for chunk in md.chunks
        }

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        from safetensors import safe_open

        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].file, []).append(item)
        for copy in (False, True):  # every chunk's header first, then the data: a refusal copies nothing
            for file_name, items in per_file.items():
                path = os.path.join(self.path, file_name)
                try:
                    _check_own_file(path)
                    with safe_open(path, framework="pt") as file:
                        for item in items:
                            if copy:
                                self._copy(file, item, planner)
                            else:
                                self._check_chunk(path, file, item)
                except (OSError, KeyError) as exc:
                    raise CheckpointError(f"{path!r}: cannot read a chunk: {exc}") from exc
                except Exception as exc:  # safetensors' own errors (a truncated or damaged file)
                    if isinstance(exc, CheckpointError):
                        raise
                    raise CheckpointError(f"{path!r}: cannot read a chunk: {exc}") from exc
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _check_chunk(self, path: str, file: Any, item: Any) -> None:
        """The chunk's tensor in the shard's header: present, of the metadata's shape and dtype."""
        key = self.storage_data[item.storage_index].key
        sizes, dtype = self.chunk_specs[item.storage_index]
        if key not in file.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise CheckpointError(f"{path!r} lacks tensor {key!r}, which {METADATA_FILE} puts there")
        piece = file.get_slice(key)
        shape = list(piece.get_shape())
        stored = (piece[0:0] if shape else file.get_tensor(key)).dtype  # the header's dtype, no data read
        if shape != sizes or stored != dtype:
            raise CheckpointError(
                f"{path!r}: tensor {key!r} is {tuple(shape)} {stored} in the shard's header, but {METADATA_FILE} "
                f"says {tuple(sizes)} {dtype} (a damaged or rewritten shard)"
            )

    def _copy(self, file: Any, item: Any, planner: LoadPlanner) -> None:
        key = self.storage_data[item.storage_index].key
        if not item.lengths:
            tensor = file.get_tensor(key)
        else:
            source = file.get_slice(key)
            tensor = source[tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))]
        target = planner.resolve_tensor(item).detach()
        target.copy_(tensor)  # of the same size (the planner's), and dtype unless cast_dtypes (load_sharded)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


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


# -- publishing a directory atomically ---------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap directories `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False
    where that is not available (another OS, an old C library, a file system that refuses it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, f"cannot exchange {a!r} and {b!r}: {os.strerror(code)}")


def _publish(tmp: str, target: str, token: str) -> None:
    """Make the complete directory `tmp` appear as `target` (rank 0 only); see the module docstring."""
    parent = os.path.dirname(target)
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif not os.path.isdir(target) or os.path.islink(target):
        raise FileExistsError(f"{target!r} exists and is not a checkpoint directory")
    elif _exchange(tmp, target):
        _fsync_dir(parent)
        shutil.rmtree(tmp)  # the previous checkpoint, now under the temp name
    else:
        old = f"{target}.old-{token}"
        os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(parent)
        shutil.rmtree(old)
    _fsync_dir(parent)


def _remove_leftovers(target: str) -> None:
    """Temp directories of saves that were killed, and `.old-` copies once `target` is complete."""
    for path in glob.glob(glob.escape(target) + ".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    if os.path.isfile(os.path.join(target, STATE_FILE)):
        for path in glob.glob(glob.escape(target) + ".old-*"):
            shutil.rmtree(path, ignore_errors=True)


def _complete_directory(directory: str) -> str:
    """The directory to read: `directory` if complete, else (after a crash in the middle of the
    two-rename fallback of `_publish`) the newest complete `<directory>.old-*`."""
    if os.path.isfile(os.path.join(directory, STATE_FILE)):
        return directory
    if not os.path.lexists(directory):
        olds = [p for p in glob.glob(glob.escape(directory) + ".old-*") if os.path.isfile(os.path.join(p, STATE_FILE))]
        if olds:
            chosen = max(olds, key=os.path.getmtime)
            warnings.warn(f"{directory!r} is missing; reading {chosen!r}, left by a save that was interrupted", stacklevel=3)
            return chosen
        raise FileNotFoundError(f"no sharded checkpoint at {directory!r}")
    raise CheckpointError(f"{directory!r} is not a complete sharded checkpoint: no {STATE_FILE}")


def _raise_if_any(errors: list[Any], what: str) -> None:
    bad = [(rank, message) for rank, message in enumerate(errors) if message]
    if bad:
        raise CheckpointError(f"{what} failed: " + "; ".join(f"process {r}: {m}" for r, m in bad))


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


def save_sharded(directory: PathLike, state: Mapping[str, Any], *, per_process: Any = None) -> int:
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
    pending = _stage(directory, state, per_process, defer=False)
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


def _stage(directory: PathLike, state: Mapping[str, Any], per_process: Any, *, defer: bool) -> _PendingSave:
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
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _remove_leftovers(target)
        except OSError as exc:
            error = repr(exc)
    agreed = all_gather_json([uuid.uuid4().hex, error])
    _raise_if_any([e for _, e in agreed], f"saving {target!r}")
    token = agreed[0][0]
    tmp = f"{target}.tmp-{token}"
    writer = SafetensorsShardWriter(tmp, defer=defer)
    try:
        with _one_process_is_intended():
            dcp.save(shards, storage_writer=writer, planner=DefaultSavePlanner())
    except (Exception, CheckpointException) as exc:  # DCP raises on every process when one fails (a BaseException)
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving {target!r} failed: {exc}") from exc
    processes = all_gather_json(own) if per_process is not None else None
    state_document = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
        "torch_version": torch.__version__, "world_size": get_world_size(),
        "state": document, "processes": processes,
        "sharded": sorted(shards), "replicated": replicated_names,
    } if rank0 else None
    return _PendingSave(target, tmp, token, writer, replicated, state_document)


def _write_rest(pending: _PendingSave) -> str | None:
    """This process's files of a staged save (its shard file; on rank 0 also the replicated tensors and
    state.json), fsynced. Local: may run on a background thread. Returns the error, if any, as text."""
    try:
        pending.writer.write_deferred()
        if pending.state_document is not None:
            os.makedirs(pending.tmp, exist_ok=True)  # a tree without DTensors
            if pending.replicated:
                path = os.path.join(pending.tmp, REPLICATED_FILE)
                save_file(pending.replicated, path, metadata={"format": "pt"})
                fsync_file(path)
            atomic_write_json(os.path.join(pending.tmp, STATE_FILE), pending.state_document)
        _fsync_dir(pending.tmp)
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
    _raise_if_any(_cleanup_on_error(all_gather_json(error), pending.tmp), f"saving {pending.target!r}")
    error = None
    if get_rank() == 0:
        try:
            _publish(pending.tmp, pending.target, pending.token)
        except OSError as exc:
            error = repr(exc)
            shutil.rmtree(pending.tmp, ignore_errors=True)
    _raise_if_any(all_gather_json(error), f"publishing {pending.target!r}")
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

    Example:

    ```python
    saver = ShardedCheckpointWriter(async_save=True)
    saver.save("backup/latest", callbacks.loop.state_dict())  # returns once the shards are copied
    ...                                                       # training goes on while they are written
    saver.flush()                                             # every process: published now
    ```
    """

    def __init__(self, async_save: bool = False) -> None:
        self.async_save = bool(async_save)
        self._pending: _PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def save(self, directory: PathLike, state: Mapping[str, Any], *, per_process: Any = None) -> None:
        """Save `state` as a sharded checkpoint at `directory` (collective; see `save_sharded`).

        Args:
            directory: the checkpoint directory to create or replace.
            state: the tree (see `save_sharded`).
            per_process: this process's own value (see `save_sharded`).

        Example:

        ```python
        saver.save("ckpt/epoch-3", {"model": model_state, "optim": optim_state, "epoch": 3})
        ```
        """
        self.flush()  # the save in flight is published first: one at a time
        if not self.async_save:
            save_sharded(directory, state, per_process=per_process)
            return
        pending = _stage(directory, state, per_process, defer=True)
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
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizers": [get_optimizer_state_dict(model, o) for o in optimizers]}


def remove_sharded(directory: PathLike) -> None:
    """Delete a sharded checkpoint directory (one process only, e.g. rank 0): it is first renamed to
    `<directory>.tmp-<token>` (one atomic step: a crash never leaves a half-deleted checkpoint under
    its name), then removed. A path that is not a complete checkpoint directory is left alone.

    Args:
        directory: the checkpoint directory (`save_sharded`'s).

    Example:

    ```python
    if get_rank() == 0:
        remove_sharded("ckpt/state-01")
    ```
    """
    target = os.path.abspath(os.fspath(directory))
    if os.path.islink(target) or not os.path.isfile(os.path.join(target, STATE_FILE)):
        return
    doomed = f"{target}.tmp-{uuid.uuid4().hex}"
    os.rename(target, doomed)
    _fsync_dir(os.path.dirname(target))
    shutil.rmtree(doomed)


def _cleanup_on_error(errors: list[Any], tmp: str) -> list[Any]:
    if any(errors) and get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
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
    path = _complete_directory(os.path.abspath(os.fspath(directory)))
    where = os.path.join(path, STATE_FILE)
    document = _read_json_file(where, STATE_FILE)
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
    metadata = _parse_metadata(path)
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


# -- full weights for the world ----------------------------------------------------------------------
def _read_replicated(
    path: str, names: list[str], template: Mapping[str, torch.Tensor], cast_dtypes: bool = False
) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The replicated tensors, by name: the template's tensors where it has them (same shape and,
    unless `cast_dtypes`, dtype required), else the tensors read; and the `(template tensor, value)`
    copies to make once everything is read (nothing is copied here). Every process reads the file
    itself (safetensors: no pickle)."""
    if not names:
        return {}, []
    from safetensors.torch import load_file

    file = os.path.join(path, REPLICATED_FILE)
    _check_own_file(file)
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


def export_full_weights(model: torch.nn.Module, directory: PathLike, *, max_shard_size: int = 5_000_000_000) -> list[str]:
    """Write the model's full, unsharded weights in Hugging Face's layout: `model.safetensors`, or
    `model-00001-of-0000N.safetensors` ... and `model.safetensors.index.json` when they exceed
    `max_shard_size` bytes. Keys are the plain `state_dict()` names, every one written (tied ones too).

    Collective: every process calls it. The tensors are gathered one at a time
    (`DTensor.full_tensor()`) and rank 0 streams each into the file it writes
    (`full_weights.write_weights`), so it holds one tensor at a time, not a file's worth; each file is
    written atomically; files of an earlier export that the new one does not have are removed.
    `torchcallbacks.load_weights(model, directory)` and `transformers`' `from_pretrained` read it.

    Args:
        model: the model (FSDP2-sharded or not; wrappers are removed).
        directory: where to write (created if needed).
        max_shard_size: the most bytes of tensors in one file (a larger tensor gets a file of its own).

    Returns:
        The names of the files written, the index last when there is one.

    Raises:
        ValueError: `max_shard_size` is not a positive integer.
        CheckpointError: the write failed (on every process).

    Example:

    ```python
    export_full_weights(model, "export/")
    safetensors.torch.load_file("export/model.safetensors")
    ```
    """
    from torchcallbacks.checkpoint.full_weights import HF_WEIGHTS, write_weights  # it builds on this module
    from torchcallbacks.distributed import unwrap_model

    if max_shard_size is None:
        raise ValueError("max_shard_size: expected a positive integer (bytes), received None")
    out = check_local_path(directory, "export_full_weights: directory")
    written = write_weights(unwrap_model(model).state_dict(), os.path.join(out, HF_WEIGHTS), {"format": "pt"},
                            max_shard_size=max_shard_size, collective=True, deduplicate=False)
    barrier()
    return [os.path.basename(p) for p in written]
