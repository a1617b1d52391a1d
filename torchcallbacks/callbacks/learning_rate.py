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
    """A callback's `optimizer` argument: None (act on all), an optimizer, or a list of them.

    Args:
        value: the argument as given.
        owner: the callback's class name, for the message.

    Example:

    ```python
    self.chosen_optimizers = check_optimizers_argument(optimizer, "ReduceLROnPlateau")
    ```
    """
    if value is None:
        return None
    chosen = list(value) if isinstance(value, (list, tuple)) else [value]
    if not chosen or not all(isinstance(o, torch.optim.Optimizer) for o in chosen):
        raise TypeError(
            f"{owner}: optimizer must be None (every optimizer), a torch.optim.Optimizer or a list of them, "
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


#: The log name of the first optimizer's first parameter group's learning rate (Keras' name).
LEARNING_RATE = "learning_rate"


def lr_name(optimizer_index: int, group_index: int) -> str:
    """The log name of one parameter group's learning rate.

    The first optimizer's first group is `learning_rate` (Keras' name); the first optimizer's other
    groups are `learning_rate/group_<j>`; optimizer `i > 0` logs `learning_rate/optimizer_<i>/group_<j>`
    (0-based indices, in the order of the loop's optimizers and of `param_groups`). A `/` keeps them
    together in TensorBoard (one section, `epoch_learning_rate`) and is a plain character in a CSV
    header.

    Example:

    ```python
    lr_name(0, 0)  # "learning_rate"
    lr_name(0, 1)  # "learning_rate/group_1"
    lr_name(1, 0)  # "learning_rate/optimizer_1/group_0"
    ```
    """
    if optimizer_index == 0:
        return LEARNING_RATE if group_index == 0 else f"{LEARNING_RATE}/group_{group_index}"
    return f"{LEARNING_RATE}/optimizer_{optimizer_index}/group_{group_index}"


def all_lrs(optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """Every parameter group's learning rate as stored (numbers, or tensors read later without a
    device sync now), under the names of `lr_name`."""
    return {
        lr_name(i, j): group["lr"]
        for i, optimizer in enumerate(optimizers)
        for j, group in enumerate(optimizer.param_groups)
    }


def lr_logs(optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
    """The learning rates written into the epoch logs: every parameter group of every optimizer, as
    floats, named by `lr_name` (`learning_rate` is the first optimizer's first group's).

    Example:

    ```python
    logs.update(lr_logs(self.optimizers))
    ```
    """
    return {name: to_float(lr) for name, lr in all_lrs(optimizers).items()}


def logged_optimizers(callback: Callback, acted_on: Sequence[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """The optimizers whose rates a learning-rate callback logs: every optimizer of the loop, so the
    names (indices) are the same whichever optimizers the callback acts on; `acted_on` when the loop
    has none (a hand-written loop that gave the callback its optimizers directly)."""
    loop_optimizers = [o for o in callback.optimizers if isinstance(o, torch.optim.Optimizer)]
    return loop_optimizers if loop_optimizers else list(acted_on)
