"""Checks of the arguments shared by `fit`, `evaluate` and `predict`, with errors that name them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Callback
from torchcallbacks.callbacks.callback_list import CallbackList


def check_model(model: Any, where: str) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, received {type(model).__name__}")
    return model


def check_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if optimizer is None or not optimizers:
        raise TypeError("fit: optimizer is required, e.g. optimizer=torch.optim.Adam(model.parameters())")
    for item in optimizers:
        if not isinstance(item, torch.optim.Optimizer):
            raise TypeError(
                f"fit: optimizer must be a torch.optim.Optimizer (or a list of them), received {type(item).__name__}"
            )
    return optimizers


def check_callable(value: Any, name: str) -> Callable[..., Any] | None:
    if value is not None and not callable(value):
        raise TypeError(f"{name}: expected a callable, received {type(value).__name__}")
    return value


def check_verbose(verbose: Any) -> int:
    if verbose == "auto":
        return 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"verbose: expected 'auto', 0, 1 or 2, received {verbose!r}")
    return int(verbose)


def resolve_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to run on: `device` (the model is moved there), else where the model's weights are."""
    if device is not None:
        target = torch.device(device)
        model.to(target)
        return target
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def make_callback_list(
    callbacks: Iterable[Callback] | CallbackList | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    add_history: bool,
    add_progbar: bool,
    params: dict[str, Any],
) -> CallbackList:
    """A `CallbackList` wired to this run; a `CallbackList` passed in is reused with its callbacks."""
    if isinstance(callbacks, CallbackList):
        callback_list = CallbackList(callbacks.callbacks, add_history, add_progbar, model, optimizer, **params)
        callback_list.set_loop(callbacks.loop)
        return callback_list
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        if not isinstance(callbacks, (Callback, Iterable)):
            raise TypeError(
                "callbacks: expected a list of torchcallbacks.Callback instances (or a CallbackList), "
                f"received {type(callbacks).__name__}"
            )
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
    return CallbackList(callbacks, add_history, add_progbar, model, optimizer, **params)

