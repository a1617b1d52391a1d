"""`ReduceLROnPlateau`: lower the learning rate when a monitored value has stopped improving."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Logs
from torchcallbacks.callbacks.learning_rate import (
    check_optimizers_argument,
    get_lr,
    logged_optimizers,
    lr_logs,
    set_lr,
    target_optimizers,
)
from torchcallbacks.callbacks.monitor import MonitorCallback
from torchcallbacks.checks import UNSET, check_count, check_number, check_verbose, renamed_argument
from torchcallbacks.distributed import print_main


class ReduceLROnPlateau(MonitorCallback):
    """Multiplies the learning rate by `factor` when a monitored value has stopped improving.

    At every epoch end the learning rate of the epoch is written into the logs as `learning_rate`
    (callbacks after this one, e.g. a CSV logger, see it). When the monitored value has not improved
    (by more than `min_delta`) for `patience` epochs, every parameter group of every optimizer (or of
    those given as `optimizers`) whose learning rate is above its `min_lr` gets
    `max(lr * factor, min_lr)`; then `cooldown` epochs pass before counting starts again. Parameter
    groups keep their own learning rates (a group at 1e-3 and one at 1e-4 become 1e-4 and 1e-5 with
    `factor=0.1`). Every group of every optimizer of the loop is logged: `learning_rate` is the first
    optimizer's first group's, `learning_rate/group_<j>` the first optimizer's other groups',
    `learning_rate/optimizer_<i>/group_<j>` those of the other optimizers (see
    `learning_rate.lr_name`).

    Unlike Keras, unknown keyword arguments are an error rather than silently ignored.

    Args:
        monitor: the logged value to watch. Defaults to "val_loss".
        factor: the factor the learning rate is multiplied by; `0 <= factor < 1`.
        patience: number of epochs without improvement after which the learning rate is reduced.
        verbose: 1 prints a message when the learning rate is reduced.
        mode: "min", "max" or "auto" (inferred from the name or the metric's declared direction).
        min_delta: the smallest change that counts as an improvement.
        cooldown: number of epochs to wait after a reduction before counting again.
        min_lr: lower bound on the learning rate; a number, or one per parameter group (of each
            optimizer it acts on).
        optimizer: the optimizer(s) to act on (one or a list, as fit's `optimizer`); None (the default)
            for every optimizer of the loop.
        optimizers: the deprecated name of `optimizer`.

    Attributes:
        best: the best monitored value so far.
        wait: epochs without improvement counted so far.
        cooldown_counter: epochs of cooldown left.

    Example:

    ```python
    reduce_lr = torchcallbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=5, min_lr=1e-6)
    torchcallbacks.fit(model, train_loader, optimizer=opt, loss=F.mse_loss,
                       validation_data=val_loader, epochs=100, callbacks=[reduce_lr])
    ```
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0.0,
        *,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = UNSET,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = UNSET,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, min_delta=min_delta)
        factor = check_number(factor, "factor")
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"factor: ReduceLROnPlateau does not support a factor >= 1 or < 0, received {factor}")
        self.factor = factor
        self.patience = check_count(patience, "patience")
        self.cooldown = check_count(cooldown, "cooldown")
        self.verbose = check_verbose(verbose, "ReduceLROnPlateau: verbose")
        if isinstance(min_lr, (list, tuple)):
            self.min_lr: float | list[float] = [check_number(v, "min_lr") for v in min_lr]
            bad = [v for v in self.min_lr if v < 0]
        else:
            self.min_lr = check_number(min_lr, "min_lr")
            bad = [self.min_lr] if self.min_lr < 0 else []
        if bad:
            raise ValueError(f"min_lr: expected values >= 0, received {min_lr!r}")
        optimizer = renamed_argument(optimizer, optimizers, "optimizer", "optimizers", "ReduceLROnPlateau")
        self.chosen_optimizers = check_optimizers_argument(optimizer, "ReduceLROnPlateau")
        self.wait = 0
        self.cooldown_counter = 0
        self.best = None

    def _reset(self) -> None:
        self.best = None
        self.wait = 0
        self.cooldown_counter = 0

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _min_lrs(self, groups: int) -> list[float]:
        if isinstance(self.min_lr, list):
            if len(self.min_lr) != groups:
                raise ValueError(
                    f"min_lr: {len(self.min_lr)} values given, but the optimizer has {groups} parameter groups"
                )
            return self.min_lr
        return [self.min_lr] * groups

    def on_train_begin(self, logs: Logs | None = None) -> None:
        super().on_train_begin(logs)
        if not self.loop.resumed:
            self._reset()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        optimizers = target_optimizers(self, self.chosen_optimizers)
        if logs is not None:
            logs.update(lr_logs(logged_optimizers(self, optimizers)))
        current = self.get_monitor_value(logs)
        if current is None:
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience:
                self._reduce(optimizers, epoch)

    def _reduce(self, optimizers: list[torch.optim.Optimizer], epoch: int) -> None:
        reduced = []
        for optimizer in optimizers:
            for group, min_lr in zip(optimizer.param_groups, self._min_lrs(len(optimizer.param_groups)), strict=True):
                old_lr = get_lr(group)
                if old_lr > min_lr:
                    new_lr = max(old_lr * self.factor, min_lr)
                    set_lr(group, new_lr)
                    reduced.append(new_lr)
        if reduced:
            if self.verbose > 0:
                rates = ", ".join(f"{lr:.4g}" for lr in reduced)
                print_main(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {rates}.")
            self.cooldown_counter = self.cooldown
            self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict["best"]
        self.best = None if best is None else float(best)
        self.wait = check_count(state_dict["wait"], "wait")
        self.cooldown_counter = check_count(state_dict["cooldown_counter"], "cooldown_counter")
