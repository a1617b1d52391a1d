"""Safetensors files written by streaming: the header first, then each tensor's bytes as it comes.

`safetensors.torch.save_file` needs every tensor in memory at once. When the tensors are produced one
at a time (gathered from the shards of an FSDP2 model), `StreamPlan` computes the header up front
from the names, dtypes and shapes alone, and `write_stream` writes it and then appends each tensor's
bytes in the plan's order, so that only one tensor needs to be in memory. The file is what
`save_file` writes for the same tensors (byte for byte when the metadata has at most one entry; with
more, safetensors orders them arbitrarily):

- 8 bytes: the header length N, a little-endian unsigned 64-bit integer;
- N bytes: compact JSON (UTF-8), `{"__metadata__": {...}, "<name>": {"dtype": "F32", "shape": [...],
  "data_offsets": [begin, end]}, ...}`, padded with spaces to a multiple of 8 bytes;
- the data: every tensor's bytes (C order, little-endian), ordered as safetensors orders them: by
  dtype, largest alignment first (its `Dtype` order, reversed), then by name; offsets are relative to
  the end of the header.

The dtype names and their order are asked of the installed safetensors (once per set of dtypes: it
saves a one-element tensor of each to memory), not copied into a table here, so every dtype it
stores is streamed as it would store it. Packed 4-bit dtypes (whose safetensors shape is not torch's)
are refused with a TypeError naming the tensor.

Writes are atomic (`writer.atomic_write`: temp file, fsync, rename, directory fsync).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import BinaryIO

import torch

from torchcallbacks.checkpoint.writer import atomic_write


@functools.lru_cache(maxsize=64)
def _dtype_layout(dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, tuple[int, str]]:
    """dtype -> (its rank in safetensors' data order, its safetensors name), asked of safetensors
    itself (a one-element tensor of each dtype saved to memory), so that the header says what
    `save_file` would for every dtype this safetensors stores. A dtype it refuses, or stores with
    another shape (packed 4-bit types), is left out."""
    from safetensors.torch import save

    probes: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(dtypes):
        with contextlib.suppress(Exception):
            probe = torch.zeros(1, dtype=dtype)
            save({"t": probe})  # refused dtypes raise here
            probes[str(i)] = probe
    blob = save(probes)
    header = json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])
    names = [k for k in header if k != "__metadata__"]
    return {dtypes[int(k)]: (rank, header[k]["dtype"]) for rank, k in enumerate(names) if header[k]["shape"] == [1]}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the header says of one tensor: its name, dtype and (global) shape.

    Args:
        name: the tensor's name in the file.
        dtype: its dtype (one safetensors stores).
        shape: its shape.

    Example:

    ```python
    TensorSpec("0.weight", torch.float32, (33, 16))
    ```
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """The size of its data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


class StreamPlan:
    """The layout of one safetensors file: the tensors in data order and the header bytes.

    Args:
        specs: the tensors (any order; names unique).
        metadata: the header's `__metadata__` (strings only), or None for none.

    Raises:
        TypeError: a dtype safetensors cannot store, or metadata that is not string -> string (the
            message names the tensor or the entry).
        ValueError: a name used twice, or the reserved name `__metadata__`.

    Example:

    ```python
    plan = StreamPlan([TensorSpec("w", torch.float32, (2, 3))], {"format": "pt"})
    plan.order  # the names, in the order write_stream wants the tensors
    ```
    """

    def __init__(self, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> None:
        specs = list(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
        if "__metadata__" in names:
            raise ValueError("'__metadata__' is reserved in safetensors and cannot name a tensor")
        layout = _dtype_layout(tuple(sorted({s.dtype for s in specs}, key=str)))
        for spec in specs:
            if spec.dtype not in layout:
                raise TypeError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors (streamed)")
        if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata: safetensors stores string -> string entries only")
        self.specs: list[TensorSpec] = sorted(specs, key=lambda s: (layout[s.dtype][0], s.name))
        header: dict[str, object] = {}
        if metadata is not None:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for spec in self.specs:
            header[spec.name] = {"dtype": layout[spec.dtype][1], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self.header: bytes = struct.pack("<Q", len(text)) + text
        self.data_size = offset

    @property
    def order(self) -> list[str]:
        """The tensor names in data order: the order `write_stream` takes the tensors in."""
        return [s.name for s in self.specs]


def _write_tensor(file: BinaryIO, spec: TensorSpec, tensor: torch.Tensor) -> None:
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(
            f"tensor {spec.name!r} is {tuple(tensor.shape)} {tensor.dtype}; the header says {spec.shape} {spec.dtype}"
        )
    if tensor.numel() == 0:
        return
    data = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    file.write(data.numpy().data)  # the tensor's own memory, not a copy


def write_stream(
    path: str | os.PathLike[str], plan: StreamPlan, tensors: Iterable[torch.Tensor]
) -> None:
    """Write a safetensors file atomically from tensors that come one at a time, in `plan.order`.

    Each tensor's bytes are written as soon as it comes (a tensor on an accelerator is copied to host
    memory first), so the caller can produce them one by one (e.g. gathered from shards) and hold only
    one at a time. Exactly `len(plan.order)` tensors are taken from `tensors`.

    Args:
        path: the file to create or replace (its directory is created if needed).
        plan: the file's layout.
        tensors: the tensors, in `plan.order`, each with the dtype and shape of its spec.

    Raises:
        ValueError: a tensor whose dtype or shape differs from its spec, or too few tensors.
        OSError: the file cannot be written (the previous file at `path` is then left as it was).

    Example:

    ```python
    plan = StreamPlan([TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items()], {"format": "pt"})
    write_stream("model.safetensors", plan, (state[n] for n in plan.order))
    ```
    """
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise NotImplementedError("streamed safetensors files are written on little-endian machines only")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as file:
            file.write(plan.header)
            iterator = iter(tensors)
            for spec in plan.specs:
                tensor = next(iterator, None)
                if tensor is None:
                    raise ValueError(f"tensor {spec.name!r} never came: fewer tensors than the plan has")
                _write_tensor(file, spec, tensor)
                del tensor  # before the next one is produced: one tensor at a time
            file.flush()

    atomic_write(path, write)


def specs_of(tensors: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    """The specs of named tensors (a DTensor's are its global dtype and shape).

    Args:
        tensors: name -> tensor, or (name, tensor) pairs.

    Example:

    ```python
    plan = StreamPlan(specs_of(model.state_dict()), {"format": "pt"})
    ```
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in items]
