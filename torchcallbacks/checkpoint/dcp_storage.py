"""DCP storage of a sharded checkpoint directory: `SafetensorsShardWriter` / `SafetensorsShardReader`,
the `torch.distributed.checkpoint` `StorageWriter` / `StorageReader` that write each process's chunks
as one safetensors file and DCP's `Metadata` as JSON (`dcp_metadata.json`), and read them back, every
field checked. Nothing is pickled (why not DCP's own storage: see `checkpoint.sharded`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
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
from torch.futures import Future

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.sharded_files import (
    METADATA_FILE,
    METADATA_FORMAT,
    METADATA_VERSION,
    check_own_file,
    read_json_file,
)
from torchcallbacks.checkpoint.writer import atomic_write_json, fsync_file

PathLike = str | os.PathLike[str]

#: dtype names allowed in `dcp_metadata.json` (those safetensors stores).
_DTYPE_NAMES = {name: d for name in dir(torch) if isinstance(d := getattr(torch, name), torch.dtype)}


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


def parse_metadata(path: str) -> Metadata:
    """`dcp_metadata.json` as DCP's `Metadata`, every field checked (a damaged file names itself):
    known dtypes, chunks inside their tensor, tiling it exactly once, in files the directory holds.

    Args:
        path: the directory.

    Raises:
        CheckpointError: a missing or damaged metadata file (named, with the field).

    Example:

    ```python
    metadata = parse_metadata("ckpt/step-100")
    ```
    """
    where = os.path.join(path, METADATA_FILE)
    document = read_json_file(where, METADATA_FILE)
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
            check_own_file(file)
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
        return self.metadata if self.metadata is not None else parse_metadata(self.path)

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
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].file, []).append(item)
        for copy in (False, True):  # every chunk's header first, then the data: a refusal copies nothing
            for file_name, items in per_file.items():
                path = os.path.join(self.path, file_name)
                try:
                    check_own_file(path)
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
