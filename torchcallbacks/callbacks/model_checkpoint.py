"""`ModelCheckpoint`: save the model (or the whole training state) to safetensors files during training."""

from __future__ import annotations

import os
import re
import string
from typing import Any

from torchcallbacks.callbacks.callback import Logs
from torchcallbacks.callbacks.monitor import MonitorCallback
from torchcallbacks.checkpoint.fsspec_storage import storage_for
from torchcallbacks.checkpoint.full_weights import check_max_shard_size
from torchcallbacks.checkpoint.sharded_files import is_sharded_state
from torchcallbacks.checkpoint.training_state import TrainingStateWriter, training_state_path
from torchcallbacks.checks import check_save_freq, check_verbose
from torchcallbacks.distributed import barrier, mean_over_processes, print_main
from torchcallbacks.logs import to_floats


def _template_fields(filepath: str) -> list[str]:
    names = []
    try:
        parsed = list(string.Formatter().parse(filepath))
    except ValueError as exc:
        raise ValueError(f"ModelCheckpoint: filepath {filepath!r} is not a valid template: {exc}") from exc
    for _, name, _, _ in parsed:
        if name is None:
            continue
        key = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not key or key.isdigit():
            raise ValueError(
                f"ModelCheckpoint: filepath {filepath!r} has a positional field '{{{name}}}'; name the "
                "value, e.g. '{epoch:02d}' or '{val_loss:.3f}'"
            )
        names.append(key)
    return names


class ModelCheckpoint(MonitorCallback):
    """Save the model's weights, or the whole training state, at some frequency.

    Files are safetensors. With `save_weights_only=True` they hold the model's `state_dict()` and
    `safetensors.torch.load_file` / `load_model` read them; otherwise they are training-state files
    (model, optimizer(s), GradScaler, callback states, random states, counters; see
    `torchcallbacks.load_checkpoint`) whose model part `torchcallbacks.load_weights` reads. Every write is
    atomic: a crash never leaves a torn file behind.

    Args:
        filepath: a path ending in `.safetensors`, possibly a template formatted with `epoch` (1-based),
            `batch` (1-based, batch-level saves only) and the logs' values, e.g.
            `"ckpt/model-{epoch:02d}-{val_loss:.3f}.safetensors"`. A bad format spec fails here; a key
            not in the logs fails at the first save, listing the keys available. The directory (up to
            its first template field) is created and checked to be writable at train begin.
        monitor: the logged value that decides "best" (`save_best_only`, `max_to_keep`, `best_path`).
        verbose: 0 silent, 1 prints a message at each save (and each non-improvement).
        save_best_only: only save when `monitor` improves on the best so far. If the value is missing from
            the logs: with `mode="auto"` a ValueError naming it and the available keys, except for a `val_`
            monitor while nothing was validated (batch logs, epochs without validation), which, like
            any missing value with an explicit `mode`, warns (once) and saves anyway, as Keras 3 does.
        save_weights_only: True saves the weights only; False the whole training state.
        mode: "auto", "min" or "max": how `monitor` improves (see `MonitorCallback`).
        save_freq: "epoch", or an integer: save every that many training batches (counted over the whole
            run, so across epochs). The monitored value is then the running mean in the batch logs.
        initial_value_threshold: the best value to beat at the start (with `save_best_only`).
        max_to_keep: keep at most this many files written by this callback, deleting the others: the
            best ones by `monitor` with `save_best_only`, else the newest ones. None keeps all.
        async_save: write files on a background thread (the tensors are copied first on the training
            thread; at most one write in flight; errors are raised at the next save or at train end).
        max_shard_size: with `save_weights_only`, split weights of more bytes than this into files of
            at most that many bytes of tensors, `X-00001-of-0000N.safetensors` ... plus the index
            `X.safetensors.index.json` for a filepath `X.safetensors` (Hugging Face's layout for
            `model.safetensors`; see `save_weights`). None (default): one file. Such saves are
            synchronous; `max_to_keep` deletes a save's files and index together.
        storage_options: for a URL `filepath` (`s3://bucket/run/m-{epoch:02d}.safetensors`, `memory://...`),
            fsspec's options (see `torchcallbacks.save_weights`). There each file is uploaded and then
            committed by its manifest `X.safetensors.manifest.json` (`checkpoint.fsspec_storage`);
            `max_to_keep` deletes a file (manifest first) only after the newer one is committed, and
            only names `filepath` gives; leftovers of interrupted uploads are removed at the next save
            in their directory. Split weights (`max_shard_size`) and FSDP2 training states are local
            only for now.

    With an FSDP2 model (DTensor parameters) and `save_weights_only` False, each save is a sharded
    checkpoint directory (`checkpoint.training_state.TrainingStateWriter`, which chooses it from the state,
    and `checkpoint.sharded.save_sharded`: every process writes its own shards, no
    process gathers the model; safetensors and JSON, published atomically), named by `filepath`
    without its `.safetensors` suffix: `"ckpt/state-{epoch:02d}.safetensors"` saves
    `ckpt/state-01/`, ... `best_path`, `last_path` and `max_to_keep` then name and delete such
    directories (a deleted one is renamed away first, so none is ever left half deleted), and
    `torchcallbacks.load_checkpoint` reads one back into a sharded model (collectively). The save is
    collective (every process reaches it: the decisions are the same everywhere). With `async_save`
    the collective part (planning, a copy of each process's shards into host buffers) is done on the
    training thread and the files are written on a background thread while training goes on; the
    directory is published at the next save, at train end, or when a backup takes this callback's
    state (which must not name a directory that is not there), and the directories it makes stale
    are deleted only then. At most one save is in flight.

    Under `torch.distributed` only the main process writes; every process keeps the same `best`,
    `best_path` and `last_path`, since decisions are taken on epoch logs that `fit` reduced over
    processes (batch-level saves average the batch logs over processes first). A barrier follows each
    save (and train end, after asynchronous writes finished), so a file named there exists for every
    process once the hook returns. The directory must be one that every process sees.

    With an FSDP2-sharded model (`fully_shard`) and `save_weights_only=True`, every process takes part
    in each save: the full tensors are gathered one at a time and rank 0 writes one plain safetensors
    file of the plain `state_dict()` keys (every name, tied ones too; see `torchcallbacks.save_weights`),
    which `load_weights` loads into a sharded or an unsharded model. `async_save` does not apply to
    those saves: the gather needs every process, so the file is written before the hook returns (an
    earlier asynchronous write is waited for first). `max_to_keep` and `best_path` work as usual.

    Attributes:
        best: the best monitored value so far.
        best_path: the file saved at the best monitored value, or None (a directory for the
            training state of an FSDP2 model, as below).
        last_path: the file (or directory) saved last, or None.

    Example:

    ```python
    ckpt = torchcallbacks.ModelCheckpoint(
        "ckpt/model-{epoch:02d}-{val_loss:.3f}.safetensors", monitor="val_loss",
        save_best_only=True, save_weights_only=True, max_to_keep=3)
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, validation_data=val_loader,
                       epochs=10, callbacks=[ckpt])
    torchcallbacks.load_weights(model, ckpt.best_path)
    ```
    """

    stops_in_sync = True  # batch hooks: saves only (see Callback.stops_in_sync)
    dispatch_order = 1  # saves after the other callbacks' updates (and SwapEMAWeights' swap)

    def __init__(
        self,
        filepath: str | os.PathLike[str],
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        max_to_keep: int | None = None,
        async_save: bool = False,
        max_shard_size: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, baseline=initial_value_threshold)
        if not isinstance(filepath, (str, os.PathLike)):
            raise TypeError(f"ModelCheckpoint: filepath must be a str or path, received {type(filepath).__name__}")
        filepath, self._storage = storage_for(filepath, storage_options, "ModelCheckpoint: filepath")
        if not filepath.endswith(".safetensors"):
            raise ValueError(f"ModelCheckpoint: filepath must end with '.safetensors', received {filepath!r}")
        self.save_freq = check_save_freq(save_freq, "ModelCheckpoint")
        fields = _template_fields(filepath)
        if "batch" in fields and self.save_freq == "epoch":
            raise ValueError(
                f"ModelCheckpoint: filepath {filepath!r} uses {{batch}}, which exists only for batch-level "
                "saves (an integer save_freq)"
            )
        try:
            filepath.format(**{k: (1 if k in ("epoch", "batch") else 1.0) for k in fields})
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
            raise ValueError(f"ModelCheckpoint: filepath {filepath!r} is not a valid template: {exc}") from exc
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"ModelCheckpoint: max_to_keep must be None or an integer >= 1, received {max_to_keep!r}")
        self.filepath = filepath
        self.verbose = check_verbose(verbose, "ModelCheckpoint: verbose")
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.max_to_keep = max_to_keep
        self.max_shard_size = check_max_shard_size(max_shard_size, "ModelCheckpoint: max_shard_size")
        if self.max_shard_size is not None and not self.save_weights_only:
            raise ValueError(
                "ModelCheckpoint: max_shard_size applies to weights files (save_weights_only=True); a training "
                "state is one file (or, for an FSDP2 model, a directory of shards)"
            )
        if self._storage.remote and self.max_shard_size is not None:
            raise ValueError(
                f"ModelCheckpoint: filepath {filepath!r} is a URL; split weights (max_shard_size) are written to local "
                "paths only (sharded remote states are not supported yet)"
            )
        if self._storage.remote:  # leftovers without a manifest are removed only if filepath names them
            self._storage.owns = lambda url: self._produces(url, ".safetensors")
        self.best_path: str | None = None
        self.last_path: str | None = None
        self._kept: list[list[Any]] = []  # [path, monitored value or None], oldest first
        # every save: a file or, for FSDP2, a directory of shards (local only)
        self._writer = TrainingStateWriter(async_save, storage=self._storage)

    @property
    def initial_value_threshold(self) -> float | None:
        """The best value to beat at the start: the `baseline` of `MonitorCallback`."""
        return self.baseline

    # -- state ------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {"filepath": self.filepath, "monitor": self.monitor}

    def state_dict(self) -> dict[str, Any]:
        """`best`, `best_path`, `last_path` and the files kept. An asynchronous write in flight is
        waited for first, so that a saved state never names a file that is not on disk yet (for an
        FSDP2 model that publication is collective, as every save of a training state is)."""
        self._writer.flush()
        return {"best": self.best, "best_path": self.best_path, "last_path": self.last_path, "kept": self._kept}

    def _own_file(self, path: Any, field: str) -> str | None:
        """`path` when it is None or a name this callback's saves can have: `filepath` with each field
        filled (a file), or that without `.safetensors` (an FSDP2 training-state directory), under the
        fixed directory part of `filepath` once symbolic links are resolved, and, where it exists, a
        regular file or one of our checkpoint directories. A state read from a file must never name
        anything else: the names it holds are deleted at the next rotation."""
        if path is None:
            return None
        if not isinstance(path, str):
            raise TypeError(f"ModelCheckpoint state {field!r}: expected a path string or None, received {path!r}")
        if self._storage.remote:  # a URL: a name filepath gives (no links or directories to resolve there)
            if not self._produces(path, ".safetensors"):
                raise ValueError(
                    f"ModelCheckpoint state {field!r} names {path!r}, which is not a checkpoint file that filepath "
                    f"{self.filepath!r} names; refusing a state that points elsewhere"
                )
            return path
        root = os.path.realpath(self._fixed_dir())
        file = self._produces(path, ".safetensors")
        directory = not file and self._produces(path, "")
        if not (file or directory) or os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise ValueError(
                f"ModelCheckpoint state {field!r} names {path!r}, which is not a checkpoint file under {root!r} "
                f"that filepath {self.filepath!r} names; refusing a state that points elsewhere"
            )
        if file and os.path.lexists(path) and not os.path.isfile(path):
            raise ValueError(f"ModelCheckpoint state {field!r} names {path!r}, which is not a regular file")
        if directory and os.path.lexists(path) and (os.path.islink(path) or not is_sharded_state(path)):
            raise ValueError(
                f"ModelCheckpoint state {field!r} names {path!r}, which is not a sharded checkpoint directory "
                "of ours"
            )
        return path

    def _produces(self, path: str, suffix: str) -> bool:
        """Whether `filepath` (with `suffix` in place of `.safetensors`) gives the name `path`: its
        literal parts as they are, each field any characters but a separator, no `..` component."""
        parts = string.Formatter().parse(self.filepath.removesuffix(".safetensors") + suffix)
        field = f"[^{re.escape(os.sep)}]+"
        pattern = "".join(re.escape(literal) + (field if name is not None else "") for literal, name, _, _ in parts)
        return re.fullmatch(pattern, path) is not None and ".." not in path.split(os.sep)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict.get("best")
        if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
            raise TypeError(f"ModelCheckpoint state 'best': expected a number or None, received {best!r}")
        kept = state_dict.get("kept", [])
        if not isinstance(kept, list) or not all(isinstance(item, (list, tuple)) and len(item) == 2 for item in kept):
            raise TypeError(f"ModelCheckpoint state 'kept': expected a list of [path, value] pairs, received {kept!r}")
        checked = [[self._own_file(path, "kept"), value] for path, value in kept]
        best_path = self._own_file(state_dict.get("best_path"), "best_path")
        last_path = self._own_file(state_dict.get("last_path"), "last_path")
        self.best, self.best_path, self.last_path, self._kept = best, best_path, last_path, checked

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        super().on_train_begin(logs)
        if self._storage.remote and training_state_path(self.filepath, self.model) != self.filepath:
            raise ValueError(
                f"ModelCheckpoint: filepath {self.filepath!r} is a URL and the model is FSDP2-sharded: its saves "
                "are gathered or sharded (a directory of shards), and sharded remote states are not supported yet; give a local path"
            )
        self._storage.check_writable(self._fixed_dir(), "ModelCheckpoint: filepath")  # now, not after an epoch

    def _fixed_dir(self) -> str:
        """The directory part of `filepath` above its first template field ("." when there is none)."""
        parts = []
        for part in os.path.dirname(self.filepath).split(os.sep):
            if "{" in part:
                break
            parts.append(part)
        return os.sep.join(parts) or (os.sep if self.filepath.startswith(os.sep) else ".")

    def idle_hooks(self) -> frozenset[str]:
        return frozenset({"on_train_batch_end"}) if self.save_freq == "epoch" else frozenset()

    def committed_paths(self) -> list[str]:
        """The files (directories, for a sharded training state) of this callback's saves that are
        complete on disk now, oldest first: writes are atomic, so a file in flight is not among them
        until it is committed. Trackers read it to log the saved models (`MLflowLogger(log_models=...)`).

        Example:

        ```python
        for path in checkpoint.committed_paths():
            print(path)
        ```
        """
        if self._storage.remote:
            return [path for path, _ in self._kept if self._storage.has_file(path)]
        return [path for path, _ in self._kept if os.path.exists(path)]

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self.loop.at_every(self.save_freq):
            # Batch logs are this process's running means; their mean over processes makes "is this
            # the best" the same everywhere (one all-reduce per save; nothing outside a process group).
            self._save(self.loop.epoch, batch, mean_over_processes(to_floats(logs)))

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.save_freq == "epoch":
            self._save(epoch, None, logs)

    def on_train_end(self, logs: Logs | None = None) -> None:
        if self.loop.exception is not None:
            self._writer.abandon()  # another process may be elsewhere: no collective
            return
        self._writer.close()  # collective: every process ends here
        barrier()  # the last (possibly asynchronous) save is on disk before any process reads it

    # -- saving -----------------------------------------------------------------------------------
    def _format(self, epoch: int, batch: int | None, logs: dict[str, Any]) -> str:
        values = dict(logs)
        values["epoch"] = epoch + 1
        if batch is not None:
            values["batch"] = batch + 1
        try:
            return self.filepath.format(**values)
        except KeyError as exc:
            raise KeyError(
                f"ModelCheckpoint: filepath {self.filepath!r} uses {{{exc.args[0]}}}, which is not in the logs; "
                f"available keys: {', '.join(sorted(values))}"
            ) from None

    def _message(self, text: str) -> None:
        if self.verbose > 0:
            print_main(text)

    def _save(self, epoch: int, batch: int | None, logs: Logs | None) -> None:
        values = to_floats(logs)
        filepath = self._format(epoch, batch, values)
        if not self.save_weights_only:  # a directory of shards for an FSDP2 model (what the writer writes)
            filepath = training_state_path(filepath, self.model)
        where = f"\nEpoch {epoch + 1}" + (f", batch {batch + 1}" if batch is not None else "")
        if self.save_best_only:
            current = self.get_monitor_value(values)
            if current is not None:
                best = self.best if self.best is not None else float("inf" if self.resolved_mode == "min" else "-inf")
                if not self._is_improvement(current, self.best):
                    self._message(f"{where}: {self.monitor} did not improve from {best:.5f}")
                    return
                self._message(f"{where}: {self.monitor} improved from {best:.5f} to {current:.5f}, saving model to {filepath}")
                self.best, self.best_path = current, filepath
            else:
                self._message(f"{where}: saving model to {filepath}")
        else:
            current = values.get(self.monitor)
            if current is not None and self._is_improvement(current, self.best):
                self.best, self.best_path = current, filepath
            self._message(f"{where}: saving model to {filepath}")
        self.last_path = filepath
        stale = self._keep(filepath, current)
        if self.best_path in stale:
            self.best_path = None
        if self.save_weights_only:
            self._writer.save_weights(self.model, filepath, delete_after=stale, max_shard_size=self.max_shard_size)
        else:  # gathered on every process (random states of each); the writer decides who writes
            self._writer.save(filepath, self.loop.state_dict(), delete_after=stale)

    def _keep(self, filepath: str, value: float | None) -> list[str]:
        """Record `filepath` and return the files to delete so that at most `max_to_keep` remain."""
        self._kept = [item for item in self._kept if item[0] != filepath] + [[filepath, value]]
        if self.max_to_keep is None or len(self._kept) <= self.max_to_keep:
            return []
        newest_first = list(reversed(range(len(self._kept))))
        if self.save_best_only:
            sign = 1.0 if self.resolved_mode == "min" else -1.0
            newest_first.sort(key=lambda i: (self._kept[i][1] is None, sign * (self._kept[i][1] or 0.0)))
        keep = set(newest_first[: self.max_to_keep]) | {len(self._kept) - 1}
        stale = [item[0] for i, item in enumerate(self._kept) if i not in keep]
        self._kept = [item for i, item in enumerate(self._kept) if i in keep]
        return stale
