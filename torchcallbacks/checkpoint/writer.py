"""Atomic safetensors writes, synchronous or on a background thread.

`atomic_save_file` writes a temp file (in a temp directory of its own, inside the target's directory,
since `save_file` itself first writes a `.tmpXXXXXX` file beside the file it is given) with `safetensors.torch.save_file`
(which writes each tensor straight from its memory, no serialised copy of the file; tensors on an
accelerator are first copied to host memory, all of them before the file is written), flushes and
fsyncs it, moves it over the target with `os.replace` and fsyncs the directory: a crash at any instant
leaves the old file or the new one, never a torn one. On an error (a full disk, say) the temp file is
removed and the previous file is left as it was.

`atomic_write(path, write)` is that protocol for any content (`write` fills the temp file it is
given, inside the temp directory): `atomic_save_file` uses it, and so do the streamed safetensors
files (`stream.py`) and the index of split weights files.

Temp directories are named `.<name>.<host>.<pid>.<8 hex digits>.tmp` (`<host>`: this machine's host name,
characters other than ASCII letters, digits and `-` replaced by `-`). A process killed mid-write leaves
its temp directory behind; after each save, the writer removes such leftovers in the directory it wrote to,
but only entries whose names have that form and, of those, only those of a process of this host that is
no longer running, or last modified more than `STALE_TEMP_SECONDS` ago (whatever the host: on a
shared file system, another host's process cannot be checked from here, and its live writes keep
their temp file's modification time recent).

`CheckpointWriter` does the same from a background thread when `async_save=True`: the tensors are
first copied off their live storage on the calling (training) thread, into host buffers that are
reused from one save to the next (`close()` drops them); then the file is written while training goes
on. At most one write is in flight (a new save waits for the previous one); an error of a background
write is raised on the training thread, at the next save, at `flush()` or at `close()`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from torchcallbacks.checkpoint.errors import CheckpointWriteError

#: A temp file of this writer whose modification time is older than this (in seconds: 24 hours) is
#: removed by the next save in its directory even if it was named by another host (whose process
#: cannot be checked from here). No write takes that long: a live write keeps its mtime recent.
STALE_TEMP_SECONDS = 24 * 60 * 60


def _host_name() -> str:
    """This machine's host name as it appears in temp file names: only `[A-Za-z0-9-]`, at most 63."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63]
    return name or "unknown-host"


def _temp_name(basename: str) -> str:
    """A unique temp name for `basename` in the same directory (so that os.replace is a rename on one
    file system) that says which host and process writes it: `.<name>.<host>.<pid>.<8 hex>.tmp`,
    `<name>` shortened if needed to keep within the usual 255-byte limit of a file name."""
    suffix = f".{_host_name()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    while basename[1:] and len(f".{basename}{suffix}".encode()) > 255:
        basename = basename[:-1]
    return f".{basename}{suffix}"


def _save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None) -> None:
    """`safetensors.torch.save_file`, with its refusal of a dtype it cannot store (a bare KeyError of
    the dtype) turned into a TypeError that names the tensor."""
    try:
        save_file(tensors, filename, metadata=metadata)
    except KeyError as exc:
        dtype = exc.args[0] if exc.args else None
        names = [name for name, tensor in tensors.items() if tensor.dtype == dtype]
        if not isinstance(dtype, torch.dtype) or not names:
            raise
        raise TypeError(f"tensor {names[0]!r}: dtype {dtype} cannot be stored in safetensors") from exc


def fsync_file(path: str) -> None:
    """Flush the file `path` to its storage (`os.fsync`).

    Args:
        path: the file.

    Example:

    ```python
    fsync_file("shard-00000-of-00002.safetensors")
    ```
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Flush a directory's entries to storage (after a rename or a delete in it); nothing where the
    platform has no directory handles.

    Args:
        directory: the directory.

    Example:

    ```python
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    ```
    """
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
        keep_previous_as: if given and `path` is a file, the old file becomes this one (a hard link
            renamed into place) just before the new one takes its place: there is a complete file at
            `path` at every instant.

    Example:

    ```python
    atomic_save_file({"w": torch.ones(2)}, "ckpt.safetensors", {"format": "pt"},
                     keep_previous_as="ckpt.previous.safetensors")
    ```
    """
    # save_file creates the file with the usual permissions.
    atomic_write(path, lambda tmp: _save_file(dict(tensors), tmp, dict(metadata) if metadata is not None else None),
                 keep_previous_as)


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[str], None],
    keep_previous_as: str | os.PathLike[str] | None = None,
) -> None:
    """Create or replace the file `path` atomically with what `write(temp_path)` writes: `write`
    creates a temp file inside a uniquely named temp directory beside `path`; the file is then
    fsynced, moved over `path` with `os.replace`, and the directory fsynced. On an error (also one of
    `write`) the temp directory is removed and the previous file is left as it was. Leftover temp
    directories of dead writers are removed afterwards.

    Args:
        path: the file to create or replace; its directory is created if needed.
        write: writes the whole content to the file it is given (and closes it).
        keep_previous_as: if given and `path` is a file, the old file becomes this one (a hard link
            renamed into place) just before the new one takes its place: there is a complete file at
            `path` at every instant.

    Example:

    ```python
    atomic_write("index.json", lambda tmp: pathlib.Path(tmp).write_text(json.dumps(index)))
    ```
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a directory is where the file goes (it is left as it is)", path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A private temp directory: save_file itself writes a `.tmpXXXXXX` file next to the file it is
    # given and renames it, so a kill leaves that one inside ours, removed with it as a leftover.
    tmp_dir = os.path.join(directory, _temp_name(os.path.basename(path)))
    tmp = os.path.join(tmp_dir, "file")
    try:
        os.mkdir(tmp_dir)
        try:
            write(tmp)
        except SafetensorError as exc:
            raise _write_error(exc, path) from exc
        fsync_file(tmp)
        if keep_previous_as is not None and os.path.isfile(path):
            _keep_copy(path, os.fspath(keep_previous_as), os.path.join(tmp_dir, "previous"))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # empty after a success
    fsync_dir(directory)
    with contextlib.suppress(OSError):  # the file is in place: a failed sweep (a vanished directory) is no failed save
        _remove_stale_temp_files(directory)


def _write_error(error: Exception, path: str) -> Exception:
    """safetensors' error of a failed write (`... I/O error: No space left on device (os error 28)`)
    as a `CheckpointWriteError` with that errno and the target's name; `error` itself otherwise."""
    match = re.search(r"\(os error (\d+)\)", str(error))
    if match is None:
        return error
    code = int(match[1])
    return CheckpointWriteError(code, f"{os.strerror(code)} (writing a checkpoint file)", path)


def _keep_copy(path: str, previous: str, held: str) -> None:
    """Make `previous` a copy of `path` while `path` stays in place: a hard link (or, on a file
    system without them, a copy) under the temp name `held`, then renamed to `previous`. A kill at
    any instant leaves `path` whole, where moving it to `previous` first left a moment without it."""
    try:
        os.link(path, held)
    except OSError:
        shutil.copyfile(path, held)
        fsync_file(held)
    os.replace(held, previous)


def atomic_write_json(path: str | os.PathLike[str], value: Any, *, indent: int | None = None) -> None:
    """Write `value` as strict JSON (no NaN or infinity) to `path`, atomically (`atomic_write`).

    Args:
        path: the file to create or replace.
        value: JSON-able data.
        indent: as `json.dumps`'s.

    Example:

    ```python
    atomic_write_json("ckpt/state.json", {"step": 3})
    ```
    """
    text = json.dumps(value, indent=indent, allow_nan=False)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)

    atomic_write(path, write)


# `.<name>.<host>.<pid>.<8 hex>.tmp`; the host part has no dots, so the name parses from the right.
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _process_is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no process can have that pid
        return True
    except OSError:  # exists, but not ours to signal
        return False
    return False


def _remove_stale_temp_files(directory: str) -> None:
    """Remove temp directories of this writer (with whatever `save_file` left in them; or temp files,
    as earlier versions wrote) left in `directory` by processes that died mid-write (a SIGKILL, a
    power cut): one is removed only if its name has the writer's temp form, it was named by a
    process of this host that is not running or was last modified more than `STALE_TEMP_SECONDS`
    ago, and (a directory) it holds nothing but files named as ours (`_remove_temp`). Anything else is
    left alone: it may be a live write of another host, or not ours at all."""
    host, now = _host_name(), time.time()
    for name in os.listdir(directory):
        match = _TEMP_NAME.match(name)
        if match is None:
            continue
        full = os.path.join(directory, name)
        if match.group("host") == host and _process_is_dead(int(match.group("pid"))):
            stale = True
        else:
            try:
                stale = now - os.stat(full, follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            except OSError:  # gone already
                continue
        if stale:
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
                _remove_temp(full)


#: What a temp directory of ours holds: the file being written, the previous copy on its way
#: (`keep_previous_as`), and safetensors' own temp file (`.tmp` and 6 letters or digits).
_TEMP_CONTENT = re.compile(r"^(file|previous|\.tmp[A-Za-z0-9]{6})$")


def _remove_temp(path: str) -> None:
    """Remove a stale temp file, or a temp directory holding only files named as ours are (each
    removed, then the empty directory): a directory with anything else in it, or a link, is not
    one of ours and is left alone."""
    if os.path.islink(path):
        return
    if not os.path.isdir(path):
        os.remove(path)
        return
    names = os.listdir(path)
    inside = [os.path.join(path, name) for name in names]
    if all(_TEMP_CONTENT.match(name) for name in names) and all(
        os.path.isfile(p) and not os.path.islink(p) for p in inside
    ):
        for file in inside:
            os.remove(file)
        os.rmdir(path)


def _remove_files(paths: Iterable[str]) -> None:
    for stale in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


class CheckpointWriter:
    """Writes checkpoint files atomically, in the calling thread or in a background one.

    Args:
        async_save: write on a background thread (after copying the tensors on the calling thread).
        storage: where the files go: an object with `write_file(path, tensors, metadata,
            keep_previous_as)` and `remove_file(path)` (`checkpoint.storage.LocalStorage`); None
            (default): the local disk, through `atomic_save_file`.

    Example:

    ```python
    writer = CheckpointWriter(async_save=True)
    writer.write("ckpt.safetensors", {"w": w}, {"format": "pt"})   # returns once w is copied
    ...
    writer.flush()   # waits for the write; raises its error if it failed
    writer.close()   # at the end: flush, then free the reused host buffers
    ```
    """

    def __init__(self, async_save: bool = False, *, storage: Any = None) -> None:
        self.async_save = bool(async_save)
        self.storage = storage
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
            self._save(path, tensors, metadata, keep_previous_as)
            self._remove(to_delete)
            return
        self.flush()
        copies, event = self._copy_off(tensors)
        meta = dict(metadata) if metadata is not None else None

        def job() -> None:
            try:
                if event is not None:
                    event.synchronize()
                self._save(path, copies, meta, keep_previous_as)
                self._remove(to_delete)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=job, name="torchcallbacks-checkpoint-writer", daemon=False)
        self._thread.start()

    def _save(
        self, path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
        keep_previous_as: str | os.PathLike[str] | None,
    ) -> None:
        if self.storage is None:
            atomic_save_file(tensors, path, metadata, keep_previous_as)
        else:
            self.storage.write_file(path, tensors, metadata, keep_previous_as)

    def _remove(self, paths: list[str]) -> None:
        if self.storage is None:
            _remove_files(paths)
        else:
            for stale in paths:
                self.storage.remove_file(stale)

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

    def close(self) -> None:
        """`flush()`, then drop the host buffers kept for the next asynchronous save (as large as the
        last file's tensors), also when the write failed. The writer can still be used: a later
        asynchronous save allocates new buffers.

        Example:

        ```python
        writer = CheckpointWriter(async_save=True)
        writer.write("ckpt.safetensors", {"w": w})
        writer.close()  # the file is complete and the host copy of w is freed
        ```
        """
        try:
            self.flush()
        finally:
            self._buffers = {}
