"""`EarlyStopping`: stop training when a monitored value has stopped improving."""

from __future__ import annotations

import copy
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Logs
from torchcallbacks.callbacks.loop_state import is_sharded
from torchcallbacks.callbacks.monitor import MonitorCallback
from torchcallbacks.checks import check_count, check_verbose
from torchcallbacks.distributed import print_main


class EarlyStopping(MonitorCallback):
    """Stops training when a monitored value has stopped improving.

    At the end of each epoch the monitored value is compared with the best one so far (by the
    `mode` and `min_delta` rules of `MonitorCallback`). After `patience` epochs without an
    improvement, it sets `model.stop_training = True`.

    `baseline` is a value the monitored quantity has to reach: training stops after `patience` epochs
    that have not reached it, even while the value keeps improving (Keras never stops in that case).
    Once the baseline is reached, patience counts epochs without improvement as usual.

    With `restore_best_weights=True` the weights (parameters and buffers, from `model.state_dict()`)
    of the best epoch are copied to CPU memory, so the snapshot costs no accelerator memory, and are
    loaded back into the model when training ends: after an early stop, when training runs to its
    last epoch, and when it ends by an exception. Under FSDP2 (DTensor parameters) the snapshot holds
    each process's own shards only (DTensors with CPU local tensors), never the full model, and is
    restored shard by shard; a sharded backup stores it as shards too (see `state_template`).

    `state_dict()` holds `wait`, `best`, `best_epoch`, `stopped_epoch` and the best-weights snapshot
    (as tensors), so a resumed run continues the same patience count and restores the same weights.

    Args:
        monitor: the logged value to watch. Defaults to "val_loss".
        min_delta: the smallest change that counts as an improvement. Defaults to 0.
        patience: number of epochs without improvement after which training stops. Defaults to 0.
        verbose: 1 prints a message when training stops and when weights are restored.
        mode: "min", "max" or "auto" (inferred from the name, or from the metric's declared
            direction; an unknown name is a ValueError at the first epoch end).
        baseline: a value to reach (see above), or None.
        restore_best_weights: load the weights of the best epoch at the end of training.
        start_from_epoch: number of epochs to wait before monitoring starts (a warm-up).

    Attributes:
        best: the best monitored value so far (None before the first monitored epoch).
        best_epoch: the epoch (0-based) of `best`.
        stopped_epoch: the epoch (0-based) at which it stopped training; 0 when it did not.
        wait: epochs counted towards `patience`.
        best_weights: the CPU snapshot of the best weights, or None.

    Example:

    ```python
    # Stop when the validation loss has not improved for 3 epochs, keep the best weights.
    stopper = torchcallbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    history = torchcallbacks.fit(model, train_loader, optimizer=opt, loss=F.mse_loss,
                                 validation_data=val_loader, epochs=100, callbacks=[stopper])
    print(stopper.stopped_epoch, stopper.best_epoch, stopper.best)
    ```
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, baseline=baseline, min_delta=min_delta)
        self.patience = check_count(patience, "patience")
        self.start_from_epoch = check_count(start_from_epoch, "start_from_epoch")
        self.verbose = check_verbose(verbose, "EarlyStopping: verbose")
        self.restore_best_weights = bool(restore_best_weights)
        self.best = None
        self.best_epoch = 0
        self.stopped_epoch = 0
        self.wait = 0
        self.best_weights: dict[str, Any] | None = None
        self._best_weights_epoch = 0

    def _reset(self) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best = None
        self.best_epoch = 0

    def _cpu_weights(self) -> dict[str, Any]:
        """A CPU copy of `model.state_dict()`; under FSDP2 its DTensors stay DTensors (same mesh and
        placements) whose local tensors are CPU copies of this process's shards (no communication)."""
        return {
            key: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in self.model.state_dict().items()
        }

    def _snapshot(self, epoch: int) -> None:
        self.best_weights = self._cpu_weights()
        self._best_weights_epoch = epoch

    def state_template(self, saved: dict[str, Any]) -> dict[str, Any]:
        """When the saved state has a snapshot: under FSDP2, CPU shards of the model's own state dict
        to read it into (also when this process has no snapshot yet, e.g. a fresh process resuming);
        for a plain model (an FSDP2 run's checkpoint read in one process), full CPU tensors."""
        saved_weights = saved.get("best_weights")
        if not isinstance(saved_weights, dict):
            return {}
        if not is_sharded(self.model):
            return {"best_weights": {k: v for k, v in self._cpu_weights().items() if k in saved_weights}}
        from torch.distributed.tensor import DTensor

        return {"best_weights": {k: v for k, v in self._cpu_weights().items() if isinstance(v, DTensor)}}

    def on_train_begin(self, logs: Logs | None = None) -> None:
        super().on_train_begin(logs)
        if not self.loop.resumed:
            self._reset()
            self.best_weights = None

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        current = self.get_monitor_value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        self.wait += 1
        improved = self._is_improvement(current, self.best)
        if self.restore_best_weights and (improved or self.best_weights is None):
            self._snapshot(epoch)
        if improved:
            self.best = current
            self.best_epoch = epoch
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
                return
            # Better than before but the baseline is not reached yet: the epoch counts towards
            # patience (Keras returns here and so never stops while the value creeps towards it).
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            setattr(self.model, "stop_training", True)  # noqa: B010  (the Keras idiom; typed setattr of nn.Module)

    def on_train_end(self, logs: Logs | None = None) -> None:
        super().on_train_end(logs)
        if self.stopped_epoch > 0 and self.verbose > 0:
            print_main(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print_main(f"Restoring model weights from the end of the best epoch: {self._best_weights_epoch + 1}.")
            self.model.load_state_dict(self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "best_weights": self.best_weights,
            "best_weights_epoch": self._best_weights_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict["best"]
        weights = state_dict.get("best_weights")
        if weights is not None and not (
            isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())
        ):
            raise TypeError("EarlyStopping state 'best_weights': expected None or a dict of tensors")
        self.wait = check_count(state_dict["wait"], "wait")
        self.best = None if best is None else float(best)
        self.best_epoch = check_count(state_dict["best_epoch"], "best_epoch")
        self.stopped_epoch = check_count(state_dict["stopped_epoch"], "stopped_epoch")
        self.best_weights = weights
        self._best_weights_epoch = check_count(state_dict.get("best_weights_epoch", 0), "best_weights_epoch")
