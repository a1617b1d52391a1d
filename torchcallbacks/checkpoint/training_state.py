"""The one writer and reader of the training state: a file, or a sharded directory, chosen from the state.

`TrainingStateWriter.save(path, state)` writes a state tree (what `LoopState.state_dict()` returns)
as one training-state file (`state_file.write_training_state`: safetensors, written atomically, on a
background thread with `async_save`) or, when the tree holds `DTensor`s (an FSDP2 model), as a
sharded directory (`sharded.ShardedCheckpointWriter`: every process writes its own shards, published
atomically; with `async_save` at the next save or `flush()`). The caller does not say which and does
not decide who writes: the main process writes a file, every process its shards, and a barrier
follows every save. The writer also decides when rotation may delete: the paths in `delete_after` are
removed only once the new save is committed (the file renamed into place, the directory published).

`read_state(path, template)` is the other half: the tree of a file, or of a sharded directory read
into `template`. `training_state_path(path, model)` is where a training state of that model saved at
`path` is (the directory `X` for `X.safetensors` when the model has DTensor parameters), for callers
that need the name before the state is gathered (a `ModelCheckpoint` records it in its own state).

Every disk operation goes through the writer's `storage`: `storage.LocalStorage` for a path,
`fsspec_storage.FsspecStorage` for a URL (files committed by manifests; sharded states are refused
there).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.files import save_weights
from torchcallbacks.checkpoint.fsspec_storage import FsspecStorage
from torchcallbacks.checkpoint.sharded_files import is_sharded_state
from torchcallbacks.checkpoint.state_file import read_training_state, write_training_state
from torchcallbacks.checkpoint.storage import LOCAL, LocalStorage
from torchcallbacks.checkpoint.writer import CheckpointWriter
from torchcallbacks.distributed import barrier, has_dtensors, is_main_process, unwrap_model

PathLike = str | os.PathLike[str]

#: Where the bytes go: the local disk, or fsspec for a URL.
Storage = LocalStorage | FsspecStorage

#: What a sharded state's template is: a tree, or a function of the saved tree (see `load_sharded`).
Template = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]]


def holds_dtensors(state: Any) -> bool:
    """Whether a state tree (dicts, lists, tuples, tensors, other values) holds a `DTensor`.

    Args:
        state: the tree, e.g. `LoopState.state_dict()`.

    Example:

    ```python
    holds_dtensors({"model": fsdp_model.state_dict()})  # True
    ```
    """
    return has_dtensors(_tensors(state))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors of a tree, depth first."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def sharded_path(path: PathLike) -> str:
    """The directory a sharded training state saved at `path` is: `X.safetensors` -> `X`.

    Args:
        path: the path asked for.

    Example:

    ```python
    sharded_path("ckpt/state-01.safetensors")  # 'ckpt/state-01'
    ```
    """
    return os.fspath(path).removesuffix(".safetensors")


def training_state_path(path: PathLike, model: torch.nn.Module | None) -> str:
    """Where the training state of `model` saved at `path` is: `path`, or for a model with DTensor
    parameters (FSDP2) the directory `sharded_path(path)`, the one `TrainingStateWriter.save` writes.

    Args:
        path: the path asked for, `X.safetensors`.
        model: the model (wrappers are removed), or None.

    Example:

    ```python
    training_state_path("backup/latest.safetensors", fsdp_model)  # 'backup/latest'
    ```
    """
    if model is not None and has_dtensors(unwrap_model(model).parameters()):
        return sharded_path(path)
    return os.fspath(path)


def has_training_state(path: PathLike, storage: Storage = LOCAL) -> bool:
    """Whether there is a training state to read at `path`: anything under that name but a directory
    that is not a complete sharded checkpoint, or the `.old-` copy an interrupted publication of a
    sharded directory left there.

    Args:
        path: the file or directory (`training_state_path`).
        storage: where to look.

    Example:

    ```python
    if has_training_state("backup/latest.safetensors"):
        ...
    ```
    """
    path = os.fspath(path)
    if storage.remote:  # a file committed by its manifest (no sharded directories there)
        return storage.has_file(path)
    if os.path.isdir(path) and not os.path.islink(path):
        return is_sharded_state(path)
    return os.path.lexists(path) or storage.has_directory(path)


def read_state(
    path: PathLike, template: Template | None = None, *, partial: bool = False, cast_dtypes: bool = False,
    storage: Storage = LOCAL,
) -> dict[str, Any]:
    """The state tree of a training state: a file (`read_training_state`), or a sharded directory (also
    the `.old-` copy an interrupted publication left) read into `template` (`sharded.load_sharded`,
    collective). Nothing is validated beyond the storage itself: `LoopState.load_state_dict` checks
    the parts.

    Args:
        path: the file or directory.
        template: what a sharded directory is read into (a tree, or a function of the saved tree:
            see `load_sharded`); not used for a file.
        partial: a sharded directory's tensors the template lacks are not read (see `load_sharded`).
        cast_dtypes: a sharded tensor of another dtype than the template's is cast (see `load_sharded`).
        storage: where to read.

    Raises:
        FileNotFoundError: nothing there.
        CheckpointError: an unreadable or damaged state (named), or a sharded directory without a
            template.

    Example:

    ```python
    state = read_state("backup/latest.safetensors")
    state = read_state("backup/latest", callbacks.loop.sharded_template)  # FSDP2, every process
    ```
    """
    path = os.fspath(path)
    if storage.remote:
        return read_training_state(path, storage=storage)
    if os.path.isdir(path) or (not os.path.lexists(path) and storage.has_directory(path)):
        if template is None:
            raise CheckpointError(f"{path!r} is a sharded training state: pass the model it is read into")
        # DCP's modules (a second's import) only when a sharded state is used: `import torchcallbacks` stays light
        from torchcallbacks.checkpoint.sharded import load_sharded

        state, _ = load_sharded(path, template, partial=partial, cast_dtypes=cast_dtypes)
        return state
    return read_training_state(path)


class TrainingStateWriter:
    """Writes training states, each a file or a sharded directory as the state requires (see the
    module docstring), synchronously or with `async_save` on a background thread.

    Every process calls `save`, `flush` and `close` at the same points (they are collective under
    `torch.distributed`: the state was gathered there, and a sharded save needs every process);
    `abandon` is for a process that leaves after an error, and involves no other process.

    Args:
        async_save: write in the background (a file: after a host copy of its tensors; a sharded
            directory: after a host copy of this process's shards, published at the next save or
            `flush()`). At most one save is in flight; its error is raised at the next save, at
            `flush()` or at `close()`.
        storage: where the bytes go (`storage.LocalStorage`, the default, or an `FsspecStorage`).

    Attributes:
        files: the `CheckpointWriter` of the files (also what `save_weights` writes through).

    Example:

    ```python
    writer = TrainingStateWriter(async_save=True)
    writer.save("ckpt/e2.safetensors", callbacks.loop.state_dict(), delete_after=["ckpt/e1.safetensors"])
    writer.flush()   # e2 is on disk (or published), and only now e1 is deleted
    writer.close()
    ```
    """

    def __init__(self, async_save: bool = False, *, storage: Storage = LOCAL) -> None:
        self.async_save = bool(async_save)
        self.storage = storage
        self.files = CheckpointWriter(self.async_save, storage=storage)
        self._sharded: Any = None  # a sharded.ShardedCheckpointWriter, made at the first sharded save
        self._unpublished_stale: list[str] = []  # to delete once the sharded save in flight is published

    def save(
        self,
        path: PathLike,
        state: Mapping[str, Any],
        *,
        keep_previous_as: PathLike | None = None,
        delete_after: Iterable[PathLike] = (),
    ) -> str:
        """Write `state` at `path` (collective): a file, or for a state that holds DTensors the
        directory `sharded_path(path)`. The save in flight, if any, is committed first; then the paths
        in `delete_after` are removed once this save is committed (at once when synchronous; with
        `async_save`, after the file's write, or once the directory is published).

        Args:
            path: the file to create or replace, `X.safetensors` (or the directory `X` itself).
            state: the tree, e.g. `LoopState.state_dict()`.
            keep_previous_as: the state replaced becomes this one (a fallback copy): the file, or for a
                sharded state the directory `sharded_path(keep_previous_as)`.
                A sharded directory is replaced atomically, the previous one complete until then, so
                this is not applied to it (a warning says so once).
            delete_after: files or sharded directories of earlier saves to remove (the one written is
                never removed).

        Returns:
            The path written: `path`, or the directory.

        Example:

        ```python
        written = writer.save("backup/latest.safetensors", loop.state_dict(),
                              keep_previous_as="backup/previous.safetensors")
        ```
        """
        stale = [os.fspath(p) for p in delete_after]
        if holds_dtensors(state):
            return self._save_sharded(sharded_path(path), state, stale, keep_previous_as)
        self.flush()  # one save at a time (a file writer also waits by itself)
        target = os.fspath(path)
        if is_main_process():  # the tree holds every process's own parts: one file, written once
            write_training_state(target, state, writer=self.files, keep_previous_as=keep_previous_as,
                                 delete_after=[p for p in stale if p != target])
        barrier()  # the file is written (or handed to the writer) before any process goes on
        return target

    def _save_sharded(self, directory: str, state: Mapping[str, Any], stale: list[str], keep_previous_as: Any) -> str:
        if self.storage.remote:
            raise ValueError(
                f"{directory!r}: a sharded (FSDP2) training state is a directory of shards; sharded remote states "
                "are not supported yet: give a local path"
            )
        self.flush()  # the save in flight is published first: one at a time
        if self._sharded is None:
            # DCP's modules (a second's import) only when a sharded state is saved: `import torchcallbacks` stays light
            from torchcallbacks.checkpoint.sharded import ShardedCheckpointWriter

            self._sharded = ShardedCheckpointWriter(self.async_save, storage=self.storage)  # type: ignore[arg-type]  # local (remote refused above)
        previous = sharded_path(keep_previous_as) if keep_previous_as is not None else None
        self._sharded.save(directory, state, keep_previous_as=previous)  # every process its shards
        stale = [p for p in stale if os.path.abspath(p) != os.path.abspath(directory)]
        if self.async_save:
            self._unpublished_stale = stale
        else:
            self.delete(stale)
        barrier()
        return directory

    def save_weights(
        self, model: torch.nn.Module, path: PathLike, *, delete_after: Iterable[PathLike] = (),
        max_shard_size: int | None = None,
    ) -> None:
        """Write the model's weights as a weights file (`files.save_weights`; collective): for a model
        with DTensor parameters every process takes part (the full tensors gathered one at a time,
        rank 0 writes, synchronously), else the main process writes through `files` (in the
        background with `async_save`). Then a barrier.

        Args:
            model: the model (wrapped or FSDP2-sharded is fine).
            path: the file, `X.safetensors`.
            delete_after: weights saves to remove once this one is written.
            max_shard_size: split weights of more bytes (see `save_weights`).

        Example:

        ```python
        writer.save_weights(model, "ckpt/model-03.safetensors", delete_after=["ckpt/model-01.safetensors"])
        ```
        """
        if is_main_process() or has_dtensors(unwrap_model(model).parameters()):
            save_weights(model, path, writer=self.files, delete_after=[os.fspath(p) for p in delete_after],
                         max_shard_size=max_shard_size)
        barrier()  # every process reaches here; nobody reads early

    def flush(self) -> None:
        """Commit the save in flight (collective): wait for a file's write, or publish a sharded
        directory once every process has written; then remove what it made stale. Its error, if
        any, is raised here (a sharded one on every process, as a `CheckpointError`).

        Example:

        ```python
        writer.flush()  # before anything reads the checkpoint
        ```
        """
        self.files.flush()
        if self._sharded is not None:
            self._sharded.flush()
            stale, self._unpublished_stale = self._unpublished_stale, []
            self.delete(stale)

    def abandon(self) -> None:
        """After an error (not collective: other processes may be elsewhere): wait for the save in
        flight and drop a sharded one unpublished (its temp directory is removed by the next save
        there), keeping what it would have made stale; a file's write is waited for and its error
        raised, as `close()` does.

        Example:

        ```python
        try:
            train()
        except Exception:
            writer.abandon()
            raise
        ```
        """
        if self._sharded is not None:
            self._sharded.abandon()
            self._unpublished_stale = []
        self.files.close()

    def close(self) -> None:
        """`flush()` (collective), then free the host buffers kept for the next asynchronous save.
        The writer can still be used afterwards.

        Example:

        ```python
        writer.close()  # at train end, on every process
        ```
        """
        self.files.close()
        self.flush()

    def delete(self, paths: Iterable[PathLike]) -> None:
        """Remove checkpoints of ours (the main process only): files, and sharded directories (renamed
        away first, so none is ever left half deleted). Paths that are not there are skipped.

        Args:
            paths: files or sharded directories.

        Example:

        ```python
        writer.delete(["backup/latest.safetensors", "backup/latest"])
        ```
        """
        if is_main_process():
            for path in paths:
                self.storage.remove(path)
