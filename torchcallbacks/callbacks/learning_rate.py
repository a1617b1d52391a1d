"""Reading, checking and setting learning rates of an optimizer's parameter groups.

Shared by `LearningRateScheduler` and `ReduceLROnPlateau`, so that both handle tensor learning rates
(fused / capturable optimizers), per-group values and bad values the same way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Callback
from torchcallbacks.logs import to_float


def target_optimizers(callback: Callback, chosen: Sequence[torch.optim.Optimizer] | None = None) -> list[torch.optim.Optimizer]:
    """The optimizers a learning-rate callback acts on: `chosen` when given, else every optimizer of
    the loop (`callback.optimizers`); a TypeError that says how to provide one when there is none.

    Args:
        callback: the callback (its `optimizers` are the loop's).
        chosen: the optimizers the callback was told to act on, or None for all.

    Example:

    ```python
    for optimizer in target_optimizers(self, self.chosen_optimizers):
        ...
    ```
    """
    optimizers = list(chosen) if chosen is not None else callback.optimizers
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise TypeError(
            f"{type(callback).__name__}: needs the optimizer; pass it to fit(optimizer=...) or to "
            f"CallbackList(..., optimizer=...), received {optimizers!r}"
        )
    return optimizers


def check_optimizers_argument(value: Any, owner: str) -> list[torch.optim.Optimizer] | None:
    """A callback's `optimizers` argument: None (act on all), an optimizer, or a list of them.

    Args:
        value: the argument as given.
        owner: the callback's class name, for the message.

    Example:

    ```python
    self.chosen_optimizers = check_optimizers_argument(optimizers, "ReduceLROnPlateau")
    ```
    """
    if value is None:
        return None
    chosen = list(value) if isinstance(value, (list, tuple)) else [value]
    if not chosen or not all(isinstance(o, torch.optim.Optimizer) for o in chosen):
        raise TypeError(
            f"{owner}: optimizers must be None (every optimizer), a torch.optim.Optimizer or a list of them, "
            f"received {value!r}"
        )
    return chosen


def get_lr(group: dict[str, Any]) -> float:
    """A parameter group's learning rate as a float (it may be a tensor)."""
    return to_float(group["lr"])


def set_lr(group: dict[str, Any], value: float) -> None:
    """Set a parameter group's learning rate in place (a tensor learning rate stays a tensor)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr.fill_(value)
    else:
        group["lr"] = value


def check_lr(value: Any, where: str) -> float:
    """`value` as a float when it is a usable learning rate: a real number (not a bool) or a
    one-element tensor / 0-d array that is finite and >= 0. Otherwise a ValueError or TypeError
    that names `where` and what was received."""
    number: float
    if isinstance(value, bool):
        raise TypeError(f"{where}: expected a real number or a 0-d tensor, received the bool {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{where}: expected a real number or a 0-d tensor, received a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        number = to_float(value)
    elif isinstance(value, numbers.Real):
        number = float(value)
    elif getattr(value, "ndim", None) == 0 and hasattr(value, "item") and isinstance(value.item(), numbers.Real):
        number = float(value.item())  # a 0-d numpy array
    else:
        raise TypeError(f"{where}: expected a real number or a 0-d tensor, received {type(value).__name__} ({value!r})")
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{where}: expected a finite learning rate, received {number}")
    if number < 0:
        raise ValueError(f"{where}: expected a learning rate >= 0, received {number}")
    return number


def first_lr(optimizer: torch.optim.Optimizer) -> Any:
    """The first parameter group's learning rate as stored (a number, or a tensor: read it later
    without a device sync now)."""
    return optimizer.param_groups[0]["lr"]


def lr_logs(optimizer: torch.optim.Optimizer) -> float:
    """The value logged as `learning_rate`: the first parameter group's learning rate."""
    return to_float(first_lr(optimizer))
