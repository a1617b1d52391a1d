"""Atomic safetensors writes, synchronous or on a background thread.

`atomic_save_file` writes a temp file in the target's directory, flushes and fsyncs it, moves it over
the target with `os.replace` and fsyncs the directory: a crash at any instant leaves the old file or the
new one, never a torn one. On an error (a full disk, say) the temp file is removed and the previous
file is left as it was.

`CheckpointWriter` does the same from a background thread when `async_save=True`: the tensors are
first copied off their live storage on the calling (training) thread, into host buffers that are
reused from one save to the next; then the file is written while training goes on. At most one write
is in flight (a new save waits for the previous one); an error of a background write is raised on the
training thread, at the next save or at `flush()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors.torch import save_file

#: torch dtype -> safetensors dtype name.
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], filename: str, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file: an 8-byte little-endian header length, the JSON header (padded with
    spaces to a multiple of 8), then each tensor's bytes, largest element size first as safetensors
    itself orders them. Each tensor is written straight from its memory (no serialised copy of the
    whole file, unlike `safetensors.torch.save`), which is what makes the save as fast as a raw write.
    The file is written in place, not atomically (`atomic_save_file` is the atomic one).

    Args:
        tensors: name -> tensor (any device; the dtype must be one safetensors stores).
        filename: the file to write.
        metadata: safetensors header metadata (strings only).

    Example:

    ```python
    write_safetensors({"w": torch.ones(2, 3)}, "w.safetensors", {"format": "pt"})
    safetensors.torch.load_file("w.safetensors")["w"]  # tensor of ones
    ```
    """
    if sys.byteorder != "little":  # safetensors is little-endian; its own writer converts
        save_file(dict(tensors), filename, metadata=dict(metadata) if metadata is not None else None)
        return
    items = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in items:
        if tensor.dtype not in DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, tensor in items:
            if tensor.numel() == 0:
                continue
            data = tensor.detach().cpu().contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().data)


# The function that serialises the tensors into the temp file (a module attribute, so that tests can
# make it fail like a full disk does).
_serialize = write_safetensors


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    keep_previous_as: str | os.PathLike[str] | None = None,
) -> None:
    """Write `tensors` and `metadata` as a safetensors file at `path`, atomically.

    Args:
        tensors: name -> contiguous tensor, no two sharing memory.
        path: the file to create or replace; its directory is created if needed.
        metadata: safetensors header metadata (strings only).
        keep_previous_as: if given and `path` exists, the old file is moved there (also atomically)
            just before the new one takes its place.

    Example:

    ```python
    atomic_save_file({"w": torch.ones(2)}, "ckpt.safetensors", {"format": "pt"},
                     keep_previous_as="ckpt.previous.safetensors")
    ```
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A unique name in the same directory (so that os.replace is a rename on one file system); the
    # file is created by the serialiser with the usual permissions.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _serialize(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_previous_as is not None and os.path.exists(path):
            os.replace(path, os.fspath(keep_previous_as))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    _remove_stale_temp_files(directory)


_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def _remove_stale_temp_files(directory: str) -> None:
    """Remove temp files of this writer left in `directory` by processes that died mid-write (a
    SIGKILL, a power cut). Files of processes still running are left alone: they may be writing."""
    for name in os.listdir(directory):
        match = _TEMP_NAME.match(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))
        except OSError:  # exists, but not ours to signal
            continue


def _remove_files(paths: Iterable[str]) -> None:
    for stale in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


class CheckpointWriter:
    """Writes checkpoint files atomically, in the calling thread or in a background one.

    Args:
        async_save: write on a background thread (after copying the tensors on the calling thread).

    Example:

    ```python
    writer = CheckpointWriter(async_save=True)
    writer.write("ckpt.safetensors", {"w": w}, {"format": "pt"})   # returns once w is copied
    ...
    writer.flush()   # waits for the write; raises its error if it failed
    ```
    """

    def __init__(self, async_save: bool = False) -> None:
        self.async_save = bool(async_save)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def write(
        self,
        path: str | os.PathLike[str],
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        keep_previous_as: str | os.PathLike[str] | None = None,
        delete_after: Iterable[str] = (),
    ) -> None:
        """Save a file (see `atomic_save_file`), then delete the files in `delete_after`.

        With `async_save`, waits for the write in flight (raising its error, if any), copies the
        tensors into host buffers and returns; the file is written on a background thread.

        Args:
            path: the file to create or replace.
            tensors: name -> contiguous tensor, no two sharing memory.
            metadata: safetensors header metadata (strings only).
            keep_previous_as: if given and `path` exists, the old file is moved there first.
            delete_after: files to delete once `path` is written (`path` itself is never deleted).

        Example:

        ```python
        writer.write("epoch2.safetensors", {"w": w}, {"format": "pt"},
                     delete_after=["epoch1.safetensors"])
        ```
        """
        to_delete = [os.fspath(p) for p in delete_after if os.fspath(p) != os.fspath(path)]
        if not self.async_save:
            atomic_save_file(tensors, path, metadata, keep_previous_as)
            _remove_files(to_delete)
            return
        self.flush()
        copies, event = self._copy_off(tensors)
        meta = dict(metadata) if metadata is not None else None

        def job() -> None:
            try:
                if event is not None:
                    event.synchronize()
                atomic_save_file(copies, path, meta, keep_previous_as)
                _remove_files(to_delete)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=job, name="torchcallbacks-checkpoint-writer", daemon=False)
        self._thread.start()

    def _copy_off(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """Host copies of `tensors` in reused buffers (pinned for CUDA tensors, copied without blocking
        and completed by an event the writer thread waits on)."""
        copies: dict[str, torch.Tensor] = {}
        cuda = False
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            buffer = self._buffers.get(name)
            # Copies from the current CUDA device run without blocking, completed by one event.
            pin = tensor.device.type == "cuda" and tensor.device.index == torch.cuda.current_device()
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype or (pin and not buffer.is_pinned()):
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
                self._buffers[name] = buffer
            buffer.copy_(tensor, non_blocking=pin)
            cuda = cuda or pin
            copies[name] = buffer
        for name in [n for n in self._buffers if n not in tensors]:
            del self._buffers[name]
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return copies, event

    def flush(self) -> None:
        """Wait for the write in flight, if any; raise its error on this thread.

        Example:

        ```python
        writer.write("ckpt.safetensors", {"w": w})
        writer.flush()  # the file is complete (or the write's error is raised here)
        ```
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def pending(self) -> bool:
        """Whether a background write is still running.

        Example:

        ```python
        if not writer.pending:
            writer.flush()  # returns at once, or raises the error of the write that failed
        ```
        """
        return self._thread is not None and self._thread.is_alive()
