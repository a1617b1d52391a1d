"""`LocalStorage`: the local-disk operations of the checkpoint protocols, in one seam.

Everything the training-state writer (`checkpoint.training_state.TrainingStateWriter`) and the sharded
protocol (`checkpoint.sharded`) do to the disk goes through these few methods: write a file atomically
(`writer.atomic_save_file`: temp file, fsync, rename, fsync of the directory) and remove one; for a
sharded directory, prepare its parent (removing what killed saves left), write a shard or JSON file
into its temp directory, fsync the directory, publish it, discard a temp directory, find the complete
directory to read and remove one. A remote backend (fsspec, an object store with manifests instead
of renames) is another object with these methods.

Publishing a directory atomically: the files are written into `<directory>.tmp-<token>`, each
fsynced; rank 0 then publishes it: when there is no `<directory>` yet, one `rename`; when there is
one, an atomic exchange of the two directories (`renameat2(RENAME_EXCHANGE)` on Linux) and then the
old one (now under the temp name) is deleted. Where the exchange is not available the previous
directory is first renamed to `<directory>.old-<token>` and the new one renamed into place; a crash
between those two renames leaves no `<directory>` but a complete `.old-` one, which
`complete_directory` then finds. A process killed at any instant leaves the previous checkpoint
loadable; the temp directory it leaves behind is removed by the next save (`prepare_directory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.sharded_files import STATE_FILE
from torchcallbacks.checkpoint.writer import atomic_save_file, atomic_write_json, fsync_dir, fsync_file

PathLike = str | os.PathLike[str]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_directories(a: str, b: str) -> bool:
    """Swap directories `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False
    where that is not available (another OS, an old C library, a file system that refuses it).

    Args:
        a: a directory.
        b: another directory.

    Example:

    ```python
    if not exchange_directories("ckpt.tmp-1", "ckpt"):
        ...  # the two-rename fallback
    ```
    """
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


class LocalStorage:
    """The local file system, as the checkpoint protocols use it (see the module docstring).

    Example:

    ```python
    storage = LocalStorage()
    storage.write_file("ckpt/state.safetensors", tensors, metadata)
    storage.remove("ckpt/old.safetensors")
    ```
    """

    #: Whether this storage is remote (`fsspec_storage.FsspecStorage`); callers branch on nothing else.
    remote = False

    # -- files -------------------------------------------------------------------------------------
    def write_file(
        self,
        path: PathLike,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        keep_previous_as: PathLike | None = None,
    ) -> None:
        """Create or replace the safetensors file `path` atomically (`writer.atomic_save_file`).

        Args:
            path: the file.
            tensors: name -> contiguous tensor, no two sharing memory.
            metadata: the header metadata.
            keep_previous_as: the replaced file becomes this one (see `atomic_save_file`).

        Example:

        ```python
        LocalStorage().write_file("w.safetensors", {"w": torch.ones(2)}, {"format": "pt"})
        ```
        """
        atomic_save_file(tensors, path, metadata, keep_previous_as)

    def read_file(self, path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """All tensors and the header metadata of the file `path` (`tensor_files.read_file`).

        Args:
            path: the file.

        Example:

        ```python
        tensors, metadata = LocalStorage().read_file("w.safetensors")
        ```
        """
        from torchcallbacks.checkpoint.tensor_files import read_file

        return read_file(path)

    def has_file(self, path: PathLike) -> bool:
        """Whether `path` is a file.

        Args:
            path: the file.

        Example:

        ```python
        LocalStorage().has_file("ckpt/m-01.safetensors")
        ```
        """
        return os.path.isfile(path)

    def check_writable(self, directory: str, name: str) -> None:
        """`checks.check_writable_dir_everywhere`: the directory is created and probed (collective).

        Args:
            directory: the directory.
            name: the argument it came from, for the message.

        Example:

        ```python
        LocalStorage().check_writable("ckpt", "ModelCheckpoint: filepath")
        ```
        """
        from torchcallbacks.checks import check_writable_dir_everywhere

        check_writable_dir_everywhere(directory, name)

    def remove_file(self, path: PathLike) -> None:
        """Remove the file `path`; nothing if there is none.

        Args:
            path: the file.

        Example:

        ```python
        LocalStorage().remove_file("ckpt/epoch-01.safetensors")
        ```
        """
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def remove(self, path: PathLike) -> None:
        """Remove a checkpoint of ours: a sharded directory (`remove_directory`) or a file; nothing if
        there is none (or a directory that is not a complete checkpoint of ours).

        Args:
            path: the file or directory.

        Example:

        ```python
        LocalStorage().remove("ckpt/state-01")  # a directory of shards, renamed away first
        ```
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            self.remove_directory(path)
        elif os.path.isfile(path):
            os.remove(path)

    # -- sharded directories -----------------------------------------------------------------------
    def prepare_directory(self, target: str) -> None:
        """Make `target`'s parent, and remove what earlier saves at `target` left: temp directories
        of saves that were killed, and `.old-` copies once `target` is complete (rank 0, before a save).

        Args:
            target: the checkpoint directory about to be saved.

        Example:

        ```python
        LocalStorage().prepare_directory("/abs/ckpt/step-100")
        ```
        """
        os.makedirs(os.path.dirname(target), exist_ok=True)
        for path in glob.glob(glob.escape(target) + ".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
        if os.path.isfile(os.path.join(target, STATE_FILE)):
            for path in glob.glob(glob.escape(target) + ".old-*"):
                shutil.rmtree(path, ignore_errors=True)

    def make_directory(self, path: str) -> None:
        """Create the directory `path` (and its parents) if it is not there.

        Args:
            path: the directory.

        Example:

        ```python
        LocalStorage().make_directory("ckpt/step-100.tmp-0123")
        ```
        """
        os.makedirs(path, exist_ok=True)

    def write_tensors(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write a safetensors file (`{"format": "pt"}` metadata) into a temp directory, fsynced; it
        becomes visible with the directory's publication, so the file itself is not renamed.

        Args:
            path: the file, inside a temp directory.
            tensors: name -> contiguous CPU tensor.

        Example:

        ```python
        LocalStorage().write_tensors("ckpt.tmp-1/replicated.safetensors", {"step": torch.tensor(3)})
        ```
        """
        save_file(tensors, path, metadata={"format": "pt"})
        fsync_file(path)

    def write_json(self, path: str, value: Any) -> None:
        """Write strict JSON to `path`, atomically (`writer.atomic_write_json`).

        Args:
            path: the file.
            value: JSON-able data.

        Example:

        ```python
        LocalStorage().write_json("ckpt.tmp-1/state.json", {"format": "..."})
        ```
        """
        atomic_write_json(path, value)

    def sync_directory(self, path: str) -> None:
        """Flush a directory's entries to storage.

        Args:
            path: the directory.

        Example:

        ```python
        LocalStorage().sync_directory("ckpt.tmp-1")
        ```
        """
        fsync_dir(path)

    def discard(self, tmp: str) -> None:
        """Remove the temp directory of a save that failed (whatever it holds; errors ignored).

        Args:
            tmp: the temp directory.

        Example:

        ```python
        LocalStorage().discard("ckpt.tmp-1")
        ```
        """
        shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, tmp: str, target: str, token: str, *, keep_previous_as: str | None = None) -> None:
        """Make the complete directory `tmp` appear as `target` in one step (rank 0 only); see the
        module docstring.

        Args:
            tmp: the complete temp directory, `<target>.tmp-<token>`.
            target: the checkpoint directory.
            token: the save's token (names the `.old-` copy of the fallback).
            keep_previous_as: the directory the replaced checkpoint becomes (exchanged into place,
                the one it replaces deleted), instead of being deleted; `target` is complete at every
                instant either way.

        Raises:
            FileExistsError: `target` is something other than a directory.

        Example:

        ```python
        LocalStorage().publish("/abs/ckpt.tmp-1f2e", "/abs/ckpt", "1f2e")
        ```
        """
        parent = os.path.dirname(target)
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif not os.path.isdir(target) or os.path.islink(target):
            raise FileExistsError(f"{target!r} exists and is not a checkpoint directory")
        elif exchange_directories(tmp, target):
            fsync_dir(parent)
            self._retire(tmp, keep_previous_as)  # the previous checkpoint, now under the temp name
        else:
            old = f"{target}.old-{token}"
            os.rename(target, old)
            os.rename(tmp, target)
            fsync_dir(parent)
            self._retire(old, keep_previous_as)
        fsync_dir(parent)

    def _retire(self, replaced: str, keep_as: str | None) -> None:
        """The checkpoint a publication replaced: deleted, or made `keep_as` (in one step: an exchange
        with the older copy there, which is then deleted, or a rename). Something at `keep_as` that
        is not a checkpoint directory of ours is left alone, with a warning (the replaced one is then
        deleted)."""
        if keep_as is None:
            shutil.rmtree(replaced)
            return
        if not os.path.lexists(keep_as):
            os.rename(replaced, keep_as)
            return
        if os.path.islink(keep_as) or not os.path.isfile(os.path.join(keep_as, STATE_FILE)):
            shutil.rmtree(replaced)
            warnings.warn(
                f"{keep_as!r} exists and is not a checkpoint directory: it is left as it is, and the replaced "
                "checkpoint is not kept there", stacklevel=2,
            )
            return
        if exchange_directories(replaced, keep_as):
            shutil.rmtree(replaced)  # the older copy, now under the replaced one's name
        else:
            self.remove_directory(keep_as)
            os.rename(replaced, keep_as)

    def complete_directory(self, directory: str) -> str:
        """The directory to read: `directory` if complete, else (after a crash in the middle of the
        two-rename fallback of `publish`) the newest complete `<directory>.old-*`, with a warning.

        Args:
            directory: the checkpoint directory (absolute).

        Raises:
            FileNotFoundError: no checkpoint there.
            CheckpointError: `directory` is there but not complete.

        Example:

        ```python
        path = LocalStorage().complete_directory("/abs/backup/latest")
        ```
        """
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

    def has_directory(self, directory: str) -> bool:
        """Whether there is a sharded checkpoint to read at `directory`: complete, or the `.old-`
        copy an interrupted publication left (`complete_directory` reads either).

        Args:
            directory: the checkpoint directory.

        Example:

        ```python
        LocalStorage().has_directory("backup/latest")
        ```
        """
        directory = os.path.abspath(directory)
        if os.path.isfile(os.path.join(directory, STATE_FILE)):
            return True
        return not os.path.lexists(directory) and any(
            os.path.isfile(os.path.join(p, STATE_FILE)) for p in glob.glob(glob.escape(directory) + ".old-*")
        )

    def remove_directory(self, directory: PathLike) -> None:
        """Delete a sharded checkpoint directory (one process only, e.g. rank 0): it is first renamed
        to `<directory>.tmp-<token>` (one atomic step: a crash never leaves a half-deleted checkpoint
        under its name), then removed. A path that is not a complete checkpoint directory is left alone.

        Args:
            directory: the checkpoint directory.

        Example:

        ```python
        LocalStorage().remove_directory("ckpt/state-01")
        ```
        """
        target = os.path.abspath(os.fspath(directory))
        if os.path.islink(target) or not os.path.isfile(os.path.join(target, STATE_FILE)):
            return
        doomed = f"{target}.tmp-{uuid.uuid4().hex}"
        os.rename(target, doomed)
        fsync_dir(os.path.dirname(target))
        shutil.rmtree(doomed)


#: The storage of local paths (the default of every writer and reader).
LOCAL = LocalStorage()


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
    LOCAL.remove_directory(directory)
