"""`LearningRateScheduler`: set the learning rate from a schedule, per epoch or per batch."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.lr_scheduler import ReduceLROnPlateau as TorchReduceLROnPlateau

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.callbacks.learning_rate import (
    check_lr,
    check_optimizers_argument,
    first_lr,
    get_lr,
    logged_optimizers,
    lr_logs,
    set_lr,
    target_optimizers,
)
from torchcallbacks.callbacks.monitor import monitored_value
from torchcallbacks.checks import UNSET, check_count, check_verbose, renamed_argument
from torchcallbacks.distributed import mean_over_processes, print_main
from torchcallbacks.logs import to_float

# torch warns when a scheduler steps before the optimizer has. This callback steps its scheduler only
# after a training step, so the warning can only come from a step that a GradScaler skipped (inf/NaN
# gradients, common in the first steps of float16 training), where it is a false alarm.
_STEP_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def _takes_two_arguments(schedule: Callable[..., Any]) -> bool:
    """Whether `schedule` can be called as `schedule(position, lr)`; decided from its signature, so
    that a TypeError raised inside a two-argument schedule is never mistaken for a wrong arity."""
    try:
        signature = inspect.signature(schedule)
    except (TypeError, ValueError):  # some builtins have no signature: call them Keras' way
        return True
    positional = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


class LearningRateScheduler(Callback):
    """Sets the optimizer's learning rate from a schedule, at every epoch (or every batch).

    `schedule` is one of:

    - a function `schedule(epoch, lr) -> new_lr`, called at the start of every epoch for each
      parameter group of every optimizer (or of those given as `optimizers`) with that group's
      current learning rate, so groups keep their own rates (e.g. `lambda epoch, lr: lr * 0.9`);
    - a function `schedule(epoch) -> new_lr` (one argument; decided from its signature), whose
      result is set on every parameter group;
    - a ready `torch.optim.lr_scheduler.LRScheduler` (StepLR, CosineAnnealingLR, OneCycleLR,
      SequentialLR, ...), stepped at the end of every epoch (or batch); torch's `ReduceLROnPlateau`
      is stepped with the logged value named by `monitor`.

    Like `torch.optim.lr_scheduler.LambdaLR`, it records each group's starting learning rate as
    `group["initial_lr"]` (unless already set), so a schedule can scale it.

    A schedule's result may be any real number or a 0-d tensor; NaN, infinite and negative values and
    non-numbers are an error naming the schedule's arguments. A TypeError raised inside the schedule
    propagates unchanged. The epoch's learning rates are written into the epoch logs (before a torch
    scheduler steps at epoch end): every parameter group of every optimizer of the loop,
    `learning_rate` for the first optimizer's first group (Keras' name), `learning_rate/group_<j>` for
    its other groups and `learning_rate/optimizer_<i>/group_<j>` for the other optimizers (see
    `learning_rate.lr_name`).

    With `per_batch=True` the schedule is applied before every training batch with the global step
    (batches trained since the start of training, 0-based) in place of the epoch, which warm-up and
    cosine schedules need; a torch scheduler is then stepped after every batch. With gradient
    accumulation (`params["gradient_accumulation_steps"]` = k, set by `fit`) a step is an optimizer
    step: the schedule gets `global_step // k`, the index of the optimizer step the batch belongs to,
    and a torch scheduler is stepped after the batches that step the optimizer (every k-th).

    The position in the schedule is in `state_dict()` (for a torch scheduler, its own `state_dict()`),
    so a resumed run continues the schedule. Applying the schedule is idempotent per epoch (per step
    with `per_batch`): when a run resumed in the middle of an epoch calls `on_epoch_begin` again for
    that epoch, the learning rate restored with the optimizer is kept, not scheduled twice.

    Args:
        schedule: the function or torch scheduler described above.
        verbose: 1 prints the new learning rate whenever the schedule sets it (per epoch only).
        per_batch: apply the schedule per batch (global step) instead of per epoch.
        monitor: the logged value passed to torch's `ReduceLROnPlateau.step()`; unused otherwise.
        optimizer: the optimizer(s) a function schedule sets (one or a list, as fit's `optimizer`);
            None (the default) for every optimizer of the loop. A torch scheduler acts on its own
            optimizer, which must be one of the loop's.
        optimizers: the deprecated name of `optimizer`.

    Example:

    ```python
    def scheduler(epoch, lr):
        return lr if epoch < 10 else lr * math.exp(-0.1)

    callback = torchcallbacks.LearningRateScheduler(scheduler)
    torchcallbacks.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                       loss=F.mse_loss, epochs=15, callbacks=[callback])

    # Warm-up then cosine, per batch, with torch's own schedulers:
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=100)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=900)
    both = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[100])
    callback = torchcallbacks.LearningRateScheduler(both, per_batch=True)
    ```
    """

    stops_in_sync = True  # batch hooks: sets the lr only (see Callback.stops_in_sync)

    def __init__(
        self,
        schedule: Callable[..., Any] | LRScheduler,
        verbose: int = 0,
        *,
        per_batch: bool = False,
        monitor: str = "val_loss",
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = UNSET,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = UNSET,
    ) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor: expected the name of a logged value, received {monitor!r}")
        self.monitor = monitor
        self._warned_missing = False
        optimizer = renamed_argument(optimizer, optimizers, "optimizer", "optimizers", "LearningRateScheduler")
        self.chosen_optimizers = check_optimizers_argument(optimizer, "LearningRateScheduler")
        self.scheduler: LRScheduler | None = None
        self.schedule: Callable[..., Any] | None = None
        if isinstance(schedule, LRScheduler):
            self.scheduler = schedule
        elif callable(schedule):
            self.schedule = schedule
            self._two_arguments = _takes_two_arguments(schedule)
        else:
            raise TypeError(
                "schedule: expected a function schedule(epoch, lr) -> lr (or schedule(epoch)) or a "
                f"torch.optim.lr_scheduler.LRScheduler, received {type(schedule).__name__}"
            )
        self.verbose = check_verbose(verbose, "LearningRateScheduler: verbose")
        self.per_batch = bool(per_batch)
        #: The epoch (global step with `per_batch`) the schedule was last applied at; None before.
        self.last_applied: int | None = None

    # -- function schedules ---------------------------------------------------------------------
    def _apply(self, position: int) -> None:
        assert self.schedule is not None
        if self.last_applied == position:
            return  # already applied before a resume: the optimizer's restored lr is the scheduled one
        optimizers = target_optimizers(self, self.chosen_optimizers)
        name = "step" if self.per_batch else "epoch"
        shared: float | None = None
        for group in (group for optimizer in optimizers for group in optimizer.param_groups):
            if self._two_arguments:
                lr = get_lr(group)
                value = check_lr(self.schedule(position, lr), f"schedule({name}={position}, lr={lr})")
            else:
                if shared is None:
                    shared = check_lr(self.schedule(position), f"schedule({name}={position})")
                value = shared
            set_lr(group, value)
        self.last_applied = position
        if self.verbose > 0 and not self.per_batch:
            print_main(
                f"\nEpoch {position + 1}: LearningRateScheduler setting learning rate to {to_float(first_lr(optimizers[0]))}."
            )

    # -- torch schedulers ---------------------------------------------------------------------------
    def _step_scheduler(self, logs: Logs | None) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_STEP_ORDER_WARNING)
            if isinstance(scheduler, TorchReduceLROnPlateau):
                value = monitored_value(self, self.monitor, "auto", logs, has_mode=False)
                if value is not None:
                    if self.per_batch:
                        # Batch logs are this process's running means: average them over processes so
                        # that the lr changes identically everywhere (epoch logs of fit already are).
                        value = mean_over_processes({"value": value})["value"]
                    scheduler.step(value)
            else:
                scheduler.step()

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._warned_missing = False  # warned once per run
        if not self.loop.resumed:
            self.last_applied = None
        if self.scheduler is not None and self.optimizers and self.scheduler.optimizer not in self.optimizers:
            raise ValueError(
                f"LearningRateScheduler: the {type(self.scheduler).__name__} was built on an optimizer that is not "
                "one of the loop's (fit's optimizer=...); build it on that optimizer, or it sets learning rates "
                "the model never uses"
            )
        if self.schedule is not None:
            for optimizer in target_optimizers(self, self.chosen_optimizers):
                for group in optimizer.param_groups:
                    group.setdefault("initial_lr", get_lr(group))

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        if self.schedule is not None and not self.per_batch:
            self._apply(epoch)

    def _accumulation(self) -> int:
        return self.params.get("gradient_accumulation_steps") or 1

    def idle_hooks(self) -> frozenset[str]:
        """The batch hooks, except with `per_batch`: the one that applies the schedule (a function's
        before the batch, a torch scheduler's step after it)."""
        if not self.per_batch:
            return frozenset({"on_train_batch_begin", "on_train_batch_end"})
        return frozenset({"on_train_batch_begin" if self.schedule is None else "on_train_batch_end"})

    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        if self.schedule is not None and self.per_batch:
            self._apply(self.loop.global_step // self._accumulation())

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self.scheduler is not None and self.per_batch and self.loop.global_step % self._accumulation() == 0:
            self._step_scheduler(logs)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if logs is not None:
            acted_on = [self.scheduler.optimizer] if self.scheduler is not None else target_optimizers(self, self.chosen_optimizers)
            logs.update(lr_logs(logged_optimizers(self, acted_on)))
        if self.scheduler is not None and not self.per_batch:
            self._step_scheduler(logs)

    # -- state ------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        kind = type(self.scheduler).__name__ if self.scheduler is not None else "function"
        return {"schedule": kind, "per_batch": self.per_batch}

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is not None:
            return {"scheduler": self.scheduler.state_dict()}
        return {"last_applied": self.last_applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict["scheduler"])
        else:
            last = state_dict["last_applied"]
            self.last_applied = None if last is None else check_count(last, "last_applied")

