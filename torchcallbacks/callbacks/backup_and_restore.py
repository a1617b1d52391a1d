"""`BackupAndRestore`: back up the training state and resume exactly where an interrupted run stopped."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import warnings
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.fsspec_storage import storage_for
from torchcallbacks.checkpoint.state_file import TrainingState
from torchcallbacks.checkpoint.training_state import (
    TrainingStateWriter,
    has_training_state,
    read_state,
    sharded_path,
    training_state_path,
)
from torchcallbacks.checks import check_save_freq
from torchcallbacks.distributed import any_process, barrier, is_distributed, main_process_only


class _IgnoreSigterm:
    """A DataLoader `worker_init_fn` that makes the worker ignore SIGTERM, then calls the loader's own.

    A preemption notice sent to the whole process group (what schedulers and `kill -TERM -PGID` do)
    reaches the DataLoader workers too; torch's default makes them die at once, and the main process
    fails with "DataLoader worker exited unexpectedly" before it reaches the point where it writes its
    backup. Workers that ignore it keep serving batches until the main process has saved and exits
    (they end with it, as always)."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.previous is not None:
            self.previous(worker_id)


class BackupAndRestore(Callback):
    """Back up the whole training state, and resume from it when training starts again.

    A backup is the loop's training state (`LoopState.state_dict()`): the model, every optimizer, the
    GradScaler, the `scheduler`, every callback's state (by `state_key`), the global step, and in `fit`
    the running means of the epoch in progress, stateful metric objects, the position in the data and
    the random states (torch CPU/CUDA, numpy, Python, and the data loader's and sampler's own
    generators). When training starts again, the restore phase (before any callback's
    `on_train_begin`) loads the newest readable backup and training continues at the saved epoch
    **and batch**: the epoch's trained batches are skipped (by their indices, without loading them,
    where the loader allows it), so an interrupted run ends with the same weights, bit for bit, as
    one that never stopped (given deterministic kernels), with the same History, CSV rows and
    callback decisions. Its place in the callback list does not matter: it saves after every other
    callback's epoch-end update (`dispatch_order`).

    A SIGTERM (the usual preemption notice) makes it write a backup at the next consistent point (the
    end of the running batch, or of the epoch during validation) and then exit with status 143, or call
    the handler that was installed before. The workers of the training DataLoader (the loop's `"data"`
    part) ignore SIGTERM meanwhile, so a signal sent to the whole process group cannot kill them
    before the backup is written.

    Args:
        backup_dir: directory for the backup files (`latest.safetensors`, and `previous.safetensors`
            with `double_checkpoint`). Use one directory per training job.
        save_freq: "epoch" to back up at every epoch end, an integer to back up every that many
            training batches (counted over the run), or False for no periodic backup (only the one a
            SIGTERM asks for).
        double_checkpoint: keep the previous backup too, and fall back to it when the latest cannot be
            read or does not fit.
        delete_checkpoint: delete the backup when training finishes normally (not after an exception,
            an interrupt or a SIGTERM).
        async_save: write backups on a background thread (at most one in flight; errors are raised on
            the training thread at the next save or at train end). For an FSDP2 model the directory
            is published at the next backup or at train end (see
            `checkpoint.training_state.TrainingStateWriter`): until then the previous one is on disk.
        scheduler: LR scheduler(s) stepped outside callbacks whose state to back up too.
        save_on_sigterm: handle SIGTERM as described above (main thread only).
        storage_options: for a URL `backup_dir` (`s3://bucket/run/backup`), fsspec's options (see
            `torchcallbacks.save_weights`). There each backup is uploaded and committed by its manifest,
            `latest.safetensors.manifest.json` written last (a compare-and-swap on S3); with
            `double_checkpoint` the previous backup is copied and committed first, so one stays
            committed at every instant. Backups of FSDP2 models (directories) are local only for now.
        strict_data: refuse a backup whose data order differs from this run's data (a
            `CheckpointError` naming the file) instead of a `DataOrderWarning` (see `EpochIterator`).

    Under `torch.distributed` the main process writes one file holding every process's random states
    and loop position (gathered, under "ranks"); on restart each process loads the model and optimizer
    state from it and restores its own, so a resumed run is exact as in the single-process case. A
    barrier follows each backup. A SIGTERM (torchrun forwards it to every process) is acted on at the
    next backup point (every `save_freq` batches, or the epoch end), where the processes agree on it,
    so all of them save and exit at the same batch. `backup_dir` must be a directory every process sees.

    For a model with DTensor parameters (FSDP2's `fully_shard`) the backup is the directory
    `backup_dir/latest/` written by `checkpoint.sharded`: every process writes its own shards, nobody
    gathers the model or optimizer state, nothing is pickled, and the directory appears only complete.
    It is replaced atomically; with `double_checkpoint` the one it replaces becomes `backup_dir/previous/`,
    read when `latest/` cannot be.

    Attributes:
        restored: what the last restore phase loaded (a `TrainingState`), or None.

    Example:

    ```python
    backup = torchcallbacks.BackupAndRestore("backup/", save_freq=100)
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=50,
                       callbacks=[backup, torchcallbacks.ModelCheckpoint("best.safetensors")])
    # kill the process at any moment, run it again: it continues where it stopped
    ```
    """

    LATEST = "latest.safetensors"
    PREVIOUS = "previous.safetensors"
    LATEST_SHARDED = "latest"  # the directory of a sharded (FSDP2) backup: see checkpoint.sharded

    stops_in_sync = True  # batch hooks: its SIGTERM exit is agreed at save points (see Callback.stops_in_sync)
    dispatch_order = 2  # saves after every other callback's update, ModelCheckpoint's (1) included

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        async_save: bool = False,
        scheduler: Any = None,
        save_on_sigterm: bool = True,
        storage_options: dict[str, Any] | None = None,
        strict_data: bool = False,
    ) -> None:
        super().__init__()
        if not backup_dir:
            raise ValueError(f"Empty `backup_dir` argument passed: BackupAndRestore needs a directory, received {backup_dir!r}")
        if not isinstance(backup_dir, (str, os.PathLike)):
            raise TypeError(f"BackupAndRestore: backup_dir must be a path, received {backup_dir!r}")
        self.backup_dir, self._storage = storage_for(backup_dir, storage_options, "BackupAndRestore: backup_dir")
        self.save_freq = check_save_freq(save_freq, "BackupAndRestore")
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self.schedulers = list(scheduler) if isinstance(scheduler, (list, tuple)) else ([] if scheduler is None else [scheduler])
        self.save_on_sigterm = bool(save_on_sigterm)
        self.strict_data = bool(strict_data)
        self.latest_path = os.path.join(self.backup_dir, self.LATEST)
        self.previous_path = os.path.join(self.backup_dir, self.PREVIOUS)
        self.latest_sharded_path = os.path.join(self.backup_dir, self.LATEST_SHARDED)
        self.restored: TrainingState | None = None
        # a file or, for FSDP2, the directory latest/ (local only)
        self._writer = TrainingStateWriter(async_save, storage=self._storage)
        self._sigterm = False
        self._previous_handler: Any = None
        self._installed = False

    def identity(self) -> dict[str, Any]:
        return {"backup_dir": self.backup_dir}

    # -- the restore phase ---------------------------------------------------------------------------
    def restore(self) -> None:
        self._sigterm = False
        if self._storage.remote and training_state_path(self.latest_path, self.loop.model) != self.latest_path:
            raise ValueError(
                f"BackupAndRestore: backup_dir {self.backup_dir!r} is a URL and the model is FSDP2-sharded: its backup "
                "is a directory of shards, and sharded remote states are not supported yet; give a local backup_dir"
            )
        self._storage.check_writable(self.backup_dir, "BackupAndRestore: backup_dir")  # now, not at the first backup
        for path in (self.latest_path, self.previous_path):
            if not self._storage.remote and os.path.isdir(path):  # no backup could be written there: say so before training
                raise IsADirectoryError(errno.EISDIR, "BackupAndRestore: a directory is where its backup file goes", path)
        for i, scheduler in enumerate(self.schedulers):
            self.loop.track(f"scheduler/{i}", scheduler)
        self.restored = self._restore()
        self._install_sigterm()

    def _shield_workers(self, install: bool) -> None:
        loader = getattr(self.loop.parts.get("data"), "data", None)
        if not isinstance(loader, torch.utils.data.DataLoader) or loader.num_workers == 0:
            return
        current = loader.worker_init_fn
        if install and not isinstance(current, _IgnoreSigterm):
            loader.worker_init_fn = _IgnoreSigterm(current)
        elif not install and isinstance(current, _IgnoreSigterm):
            loader.worker_init_fn = current.previous

    def _restore(self) -> TrainingState | None:
        # latest.safetensors, or the directory latest/ for an FSDP2 model; then the previous one
        model = self.loop.model
        candidates = [training_state_path(self.latest_path, model)]
        if self.double_checkpoint:
            candidates.append(training_state_path(self.previous_path, model))
        errors: list[CheckpointError] = []
        for path in candidates:
            if not has_training_state(path, self._storage):
                continue
            if errors:
                warnings.warn(f"BackupAndRestore: {errors[-1]}; falling back to {path!r}", stacklevel=4)
            elif path != candidates[0]:
                warnings.warn(f"BackupAndRestore: {self.latest_path!r} is missing; resuming from {path!r}", stacklevel=4)
            try:
                # a sharded state's template (collective) follows what was saved, after its checks
                with self.loop.keeping_fresh_optimizers():
                    state = read_state(path, lambda saved, path=path: self.loop.sharded_template(saved, path),
                                       storage=self._storage)
                    return self.loop.load_state_dict(state, path, strict_data=self.strict_data)
            except CheckpointError as exc:
                errors.append(exc)
        if errors:
            raise errors[-1]
        return None

    # -- saving ------------------------------------------------------------------------------------
    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        at_save_point = self.loop.at_every(self.save_freq)
        if is_distributed():
            # Processes get SIGTERM at different batches; they agree on it at backup points only
            # (one all-reduce per backup), so that all of them save and exit at the same batch.
            sigterm = at_save_point and self.save_on_sigterm and any_process(self._sigterm)
        else:
            sigterm = self._sigterm
        if at_save_point or sigterm:
            self._save()
        if sigterm:
            self._exit_on_sigterm()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        sigterm = self.save_on_sigterm and any_process(self._sigterm)
        if self.save_freq == "epoch" or sigterm:
            self._save()
        if sigterm:
            self._exit_on_sigterm()

    def _save(self) -> None:
        state = self.loop.state_dict()  # every process: its random states and loop parts are gathered
        # the writer writes (the main process a file, every process its shards) and then waits for all
        self._writer.save(self.latest_path, state, keep_previous_as=self.previous_path if self.double_checkpoint else None)

    # -- SIGTERM -------------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True

    def _install_sigterm(self) -> None:
        if self.save_on_sigterm and not self._installed and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
            self._shield_workers(True)

    def _uninstall_sigterm(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._installed = False
            self._shield_workers(False)

    def _exit_on_sigterm(self) -> None:
        self._sigterm = False
        self._writer.flush()  # every process is here (the SIGTERM was agreed on)
        handler = self._previous_handler
        self._uninstall_sigterm()
        if callable(handler):
            handler(signal.SIGTERM, None)
        elif handler != signal.SIG_IGN:
            raise SystemExit(128 + signal.SIGTERM)

    # -- train end -----------------------------------------------------------------------------------
    def on_train_end(self, logs: Logs | None = None) -> None:
        try:
            if self.loop.exception is None:
                self._writer.close()  # collective: every process ends here
            else:
                self._writer.abandon()  # another process may be elsewhere: no collective
        finally:
            self._uninstall_sigterm()
            if self.loop.exception is None:
                barrier()  # every process finished with the backup before it is deleted
                if self.delete_checkpoint:
                    self._delete()

    @main_process_only
    def _delete(self) -> None:
        self._writer.delete([self.latest_path, self.previous_path, self.latest_sharded_path,
                             sharded_path(self.previous_path)])
        if not self._storage.remote:  # an object store has no directories to remove
            with contextlib.suppress(OSError):
                os.rmdir(self.backup_dir)
