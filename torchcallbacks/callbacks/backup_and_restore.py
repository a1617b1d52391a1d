"""`BackupAndRestore`: back up the training state and resume exactly where an interrupted run stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings
from typing import Any

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.checkpoint.files import CheckpointError, TrainingState, load_checkpoint, save_loop_state
from torchcallbacks.checkpoint.rng import (
    capture_rng_state,
    restore_rng_state,
    rng_state_from_json,
    rng_state_to_json,
)
from torchcallbacks.checkpoint.writer import CheckpointWriter
from torchcallbacks.checks import check_save_freq
from torchcallbacks.distributed import (
    all_gather_json,
    any_process,
    barrier,
    get_rank,
    get_world_size,
    is_distributed,
    main_process_only,
)


class BackupAndRestore(Callback):
    """Back up the whole training state, and resume from it when training starts again.

    At train begin, if `backup_dir` holds a backup, the model, the optimizer(s), the GradScaler, the
    `scheduler`, every callback's `state_dict()`, the random generators (torch CPU/CUDA, numpy, Python),
    the global step and, in `fit`, the running means of the interrupted epoch are restored, and
    training continues at the saved epoch **and batch**: the batches of the epoch already trained are skipped, and the random state at that epoch's start is
    restored before the data loader draws its shuffle order, so an interrupted run ends with the same
    weights, bit for bit, as one that never stopped (given deterministic kernels).

    A SIGTERM (the usual preemption notice) makes it write a backup at the next consistent point (the
    end of the running batch, or of the epoch during validation) and then exit with status 143, or call
    the handler that was installed before.

    Place it after the callbacks whose state it carries (e.g. `ModelCheckpoint`, `EarlyStopping`), so
    that their state is saved after their own epoch-end update and restored after their own
    `on_train_begin` reset; it warns otherwise. Only `self.optimizer` is saved: in `fit` with several
    optimizers that is the first one.

    Args:
        backup_dir: directory for the backup files (`latest.safetensors`, and `previous.safetensors`
            with `double_checkpoint`). Use one directory per training job.
        save_freq: "epoch" to back up at every epoch end, or an integer: every that many training batches
            (counted over the run). `False` is rejected (Keras saves every batch).
        double_checkpoint: keep the previous backup too, and fall back to it when the latest cannot be
            read.
        delete_checkpoint: delete the backup when training finishes normally (not after an exception,
            an interrupt or a SIGTERM).
        async_save: write backups on a background thread (at most one in flight; errors are raised on
            the training thread at the next save or at train end).
        scheduler: LR scheduler(s) stepped outside callbacks whose state to back up too.
        save_on_sigterm: handle SIGTERM as described above (main thread only).

    Under `torch.distributed` the main process writes one file holding every process's random
    states (gathered, under "ranks"); on restart each process loads the model and optimizer state
    from it and restores its own random states, so a resumed run is exact as in the single-process
    case. A barrier follows each backup. A SIGTERM (torchrun forwards it to every process) is acted
    on at the next backup point (every `save_freq` batches, or the epoch end), where the processes
    agree on it, so all of them save and exit at the same batch. `backup_dir` must be a directory
    every process sees.

    Example:

    ```python
    backup = torchcallbacks.BackupAndRestore("backup/", save_freq=100)
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=50,
                       callbacks=[torchcallbacks.ModelCheckpoint("best.safetensors"), backup])
    # kill the process at any moment, run it again: it continues where it stopped
    ```
    """

    LATEST = "latest.safetensors"
    PREVIOUS = "previous.safetensors"

    stops_in_sync = True  # batch hooks: its SIGTERM exit is agreed at save points (see Callback.stops_in_sync)

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        async_save: bool = False,
        scheduler: Any = None,
        save_on_sigterm: bool = True,
    ) -> None:
        super().__init__()
        if not backup_dir:
            raise ValueError(f"Empty `backup_dir` argument passed: BackupAndRestore needs a directory, received {backup_dir!r}")
        if not isinstance(backup_dir, (str, os.PathLike)) or not os.fspath(backup_dir):
            raise TypeError(f"BackupAndRestore: backup_dir must be a non-empty path, received {backup_dir!r}")
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = check_save_freq(save_freq, "BackupAndRestore")
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self.scheduler = scheduler
        self.save_on_sigterm = bool(save_on_sigterm)
        self.latest_path = os.path.join(self.backup_dir, self.LATEST)
        self.previous_path = os.path.join(self.backup_dir, self.PREVIOUS)
        #: The state restored at the last train begin, or None.
        self.restored: TrainingState | None = None
        self._writer = CheckpointWriter(async_save)
        self._epoch_rng: dict[str, Any] | None = None
        self._pending_epoch_rng: dict[str, Any] | None = None
        self._pending_batch_rng: dict[str, Any] | None = None
        self._pending_metrics: dict[str, Any] | None = None
        self._resume_batch = 0
        self._sigterm = False
        self._previous_handler: Any = None
        self._installed = False

    # -- train begin: restore ------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._pending_epoch_rng = self._pending_batch_rng = self._epoch_rng = self._pending_metrics = None
        self._sigterm = False
        self._warn_about_order()
        self.restored = state = self._restore()
        if state is not None:
            loop = self.loop
            loop.initial_epoch, loop.initial_batch, loop.global_step = state.epoch, state.batch, state.global_step
            rng = self._own_rng(state.rng)
            if state.batch > 0:
                self._pending_metrics = self._own_metrics(state.extra.get("metrics"))
                self._pending_epoch_rng = rng.get("epoch_begin")
                self._pending_batch_rng = rng.get("current")
                self._resume_batch = state.batch
                # fit calls this after skipping the trained batches, before fetching the next one.
                loop.resume_hook = self._restore_batch_rng
            else:
                self._pending_epoch_rng = rng.get("current")
        self._install_sigterm()

    def _restore(self) -> TrainingState | None:
        candidates = [self.latest_path] + ([self.previous_path] if self.double_checkpoint else [])
        errors: list[CheckpointError] = []
        for path in candidates:
            if not os.path.exists(path):
                continue
            if errors:
                warnings.warn(f"BackupAndRestore: {errors[-1]}; falling back to {path!r}", stacklevel=3)
            try:
                return load_checkpoint(
                    path, self.model, self.optimizer, scaler=self.loop.scaler, scheduler=self.scheduler,
                    callbacks=self.loop.callbacks, restore_rng=False,
                )
            except CheckpointError as exc:
                errors.append(exc)
        if errors:
            raise errors[-1]
        return None

    @staticmethod
    def _own_rng(rng: dict[str, Any]) -> dict[str, Any]:
        """This process's random states: a backup of a distributed run keeps every process's under
        "ranks" (its top-level states are those of process 0)."""
        ranks = rng.get("ranks")
        if not ranks:
            return rng
        if len(ranks) != get_world_size():
            warnings.warn(
                f"BackupAndRestore: the backup was written by {len(ranks)} processes and this run has "
                f"{get_world_size()}; every process restores the random states of process 0, so random "
                "draws (dropout, augmentation) differ from an uninterrupted run",
                stacklevel=3,
            )
            return rng
        own: dict[str, Any] = ranks[get_rank()]
        return own

    @staticmethod
    def _own_metrics(saved: Any) -> dict[str, Any] | None:
        """This process's running means of the interrupted epoch (saved one per process). With another
        number of processes, process 0 takes the totals of all, so the epoch's reduced means stay right."""
        if not saved:
            return None
        if len(saved) == get_world_size():
            own: dict[str, Any] = saved[get_rank()]
            return own
        if get_rank() != 0:
            return {}
        merged: dict[str, list[float]] = {}
        for states in saved:
            for name, (total, weight) in states.items():
                entry = merged.setdefault(name, [0.0, 0.0])
                entry[0] += total
                entry[1] += weight
        return merged

    def _warn_about_order(self) -> None:
        callbacks = list(self.loop.callbacks or [])
        if self not in callbacks:
            return
        later = [
            type(c).__name__ for c in callbacks[callbacks.index(self) + 1:]
            if type(c).state_dict is not Callback.state_dict
        ]
        if later:
            warnings.warn(
                f"BackupAndRestore comes before {', '.join(later)}, whose state it saves before their epoch-end "
                "update and restores before their on_train_begin; put BackupAndRestore last",
                stacklevel=3,
            )

    # -- random states at the points where a resumed run must match -----------------------------------
    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        # fit reset its running means just before this hook; put back those of the trained batches.
        if self._pending_metrics is not None and self.loop.load_metrics_state is not None:
            self.loop.load_metrics_state(self._pending_metrics)
        self._pending_metrics = None
        if self._pending_epoch_rng is not None:
            restore_rng_state(self._pending_epoch_rng)
            self._pending_epoch_rng = None
        # The state the data loader's shuffle is drawn from, for backups in the middle of this epoch.
        self._epoch_rng = capture_rng_state()

    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        # In fit the loop's resume_hook did this already; this serves hand-written loops.
        if self._pending_batch_rng is not None and batch == self._resume_batch:
            self._restore_batch_rng()

    def _restore_batch_rng(self) -> None:
        if self._pending_batch_rng is not None:
            restore_rng_state(self._pending_batch_rng)
            self._pending_batch_rng = None

    # -- saving ------------------------------------------------------------------------------------
    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        at_save_point = self.save_freq != "epoch" and self.loop.global_step % int(self.save_freq) == 0
        if is_distributed():
            # Processes get SIGTERM at different batches; they agree on it at backup points only
            # (one all-reduce per backup), so that all of them save and exit at the same batch.
            sigterm = at_save_point and self.save_on_sigterm and any_process(self._sigterm)
        else:
            sigterm = self._sigterm
        if at_save_point or sigterm:
            self._save(self.loop.epoch, batch + 1)
        if sigterm:
            self._exit_on_sigterm()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        sigterm = self.save_on_sigterm and any_process(self._sigterm)
        if self.save_freq == "epoch" or sigterm:
            self._save(epoch + 1, 0)
        if sigterm:
            self._exit_on_sigterm()

    def _save(self, epoch: int, batch: int) -> None:
        rng: dict[str, Any] = {"current": capture_rng_state()}
        if batch > 0 and self._epoch_rng is not None:
            rng["epoch_begin"] = self._epoch_rng
        # Every process's random states go into the one file the main process writes.
        every = all_gather_json({k: rng_state_to_json(v) for k, v in rng.items()}) if is_distributed() else None
        # The running means of the epoch so far (fit's), one entry per process, for a mid-epoch resume.
        extra = None
        if batch > 0 and self.loop.metrics_state is not None:
            metrics = self.loop.metrics_state()
            extra = {"metrics": all_gather_json(metrics) if is_distributed() else [metrics]}
        self._write(epoch, batch, rng, every, extra)
        barrier()  # the backup is complete (or handed to the writer) before any process goes on

    @main_process_only
    def _write(
        self, epoch: int, batch: int, rng: dict[str, Any], every: list[Any] | None, extra: dict[str, Any] | None
    ) -> None:
        if every is not None:
            rng["ranks"] = [{k: rng_state_from_json(v) for k, v in states.items()} for states in every]
        save_loop_state(
            self, self.latest_path, epoch=epoch, batch=batch, rng=rng, scheduler=self.scheduler,
            writer=self._writer, keep_previous_as=self.previous_path if self.double_checkpoint else None,
            extra=extra,
        )

    # -- SIGTERM -------------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True

    def _install_sigterm(self) -> None:
        if self.save_on_sigterm and not self._installed and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def _uninstall_sigterm(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._installed = False

    def _exit_on_sigterm(self) -> None:
        self._sigterm = False
        self._writer.flush()
        handler = self._previous_handler
        self._uninstall_sigterm()
        if callable(handler):
            handler(signal.SIGTERM, None)
        elif handler != signal.SIG_IGN:
            raise SystemExit(128 + signal.SIGTERM)

    # -- train end -----------------------------------------------------------------------------------
    def on_train_end(self, logs: Logs | None = None) -> None:
        try:
            self._writer.flush()
        finally:
            self._uninstall_sigterm()
            if self.loop.exception is None:
                barrier()  # every process finished with the backup before it is deleted
                if self.delete_checkpoint:
                    self._delete()

    @main_process_only
    def _delete(self) -> None:
        for path in (self.latest_path, self.previous_path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.backup_dir)
