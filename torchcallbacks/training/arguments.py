"""Checks of the arguments shared by `fit`, `evaluate` and `predict`, with errors that name them."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Callback
from torchcallbacks.callbacks.callback_list import CallbackList

# check_verbose is re-exported: fit, evaluate and predict import it from here.
from torchcallbacks.checks import check_verbose as check_verbose


def check_model(model: Any, where: str) -> torch.nn.Module:
    """`model` itself when it is a `torch.nn.Module`, else a `TypeError` that names `where`.

    A model with parameters or buffers on the `meta` device (shapes without data, as built under
    `torch.device("meta")` for deferred initialisation) is a `ValueError` naming `model` and the
    first such tensor: it cannot run, nor be moved with `.to()`.

    Args:
        model: the `model` argument as given.
        where: the public function checking it, for the message (e.g. `"fit"`).

    Example:

    ```python
    model = check_model(torch.nn.Linear(4, 1), "fit")
    ```
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, received {type(model).__name__}")
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_meta:
            raise ValueError(
                f"{where}: model has tensors on the 'meta' device (shapes without data), e.g. {name!r}; "
                "materialize it first: model.to_empty(device=...) and then initialize the weights "
                "(e.g. model.reset_parameters() per module) or load them (torchcallbacks.load_weights)"
            )
    return model


def check_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """`fit`'s `optimizer` argument as a list of optimizers; None, an empty list or anything that is
    not a `torch.optim.Optimizer` is a `TypeError`.

    Args:
        optimizer: an optimizer or a list (or tuple) of them.

    Example:

    ```python
    optimizers = check_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))  # a list of one
    ```
    """
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if optimizer is None or not optimizers:
        raise TypeError("fit: optimizer is required, e.g. optimizer=torch.optim.Adam(model.parameters())")
    for item in optimizers:
        if not isinstance(item, torch.optim.Optimizer):
            raise TypeError(
                f"fit: optimizer must be a torch.optim.Optimizer (or a list of them, or one of Keras' names 'sgd', "
                f"'adam', 'adamw', 'rmsprop'), received {type(item).__name__}"
            )
    return optimizers


def check_optimized(
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    several: bool,
    warn_unoptimized: bool = True,
    loss: Any = None,
) -> None:
    """Refuse optimizers that would train nothing of `model`, warn about parameters none trains.

    The model's trainable parameters are those of `model.parameters()` with `requires_grad` (a
    DistributedDataParallel or FSDP2 model's are the very objects its optimizers hold), compared by
    identity, once per `fit`. An optimizer holding none of them (built over another model, or over
    a copy of this one) is a `ValueError` naming it, unless it holds trainable parameters of `loss`
    (a `torch.nn.Module` loss with weights of its own). When the optimizers together leave some of
    the trainable parameters out, a `UserWarning` says how many, unless `warn_unoptimized` is False.
    A model without trainable parameters is not checked.

    Args:
        model: the model `fit` trains.
        optimizers: the optimizers from `check_optimizers`.
        several: whether `fit` was given a list of more than one (the message then names the position).
        warn_unoptimized: warn when some trainable parameters are in no optimizer.
        loss: `fit`'s loss; a module's own trainable parameters count for its optimizers.

    Example:

    ```python
    model = torch.nn.Linear(4, 1)
    check_optimized(model, [torch.optim.SGD(model.parameters(), lr=0.1)], several=False)  # passes
    ```
    """
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        return
    own_loss = {id(p) for p in loss.parameters() if p.requires_grad} if isinstance(loss, torch.nn.Module) else set()
    covered: set[int] = set()
    for i, optimizer in enumerate(optimizers):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        of_model = held & trainable
        if not of_model and not held & own_loss:
            name = type(optimizer).__name__
            where = f"optimizer[{i}] ({name})" if several else f"optimizer ({name})"
            raise ValueError(
                f"fit: {where} holds none of the model's trainable parameters (0 of {len(trainable)}), so "
                f"training would change nothing; build it from this model's parameters, e.g. "
                f"torch.optim.{name}(model.parameters(), ...), after moving, wrapping or sharding the "
                "model and not from a copy of it"
            )
        covered |= of_model
    missing = len(trainable) - len(covered)
    if missing and warn_unoptimized:
        warnings.warn(
            f"fit: {missing} of the model's {len(trainable)} trainable parameters are in no optimizer and will "
            "not be trained; freeze them (requires_grad_(False)), add them to an optimizer, or pass "
            "warn_unoptimized=False",
            UserWarning,
            stacklevel=3,
        )


def check_callable(value: Any, name: str) -> Callable[..., Any] | None:
    """`value` when it is None or callable, else a `TypeError` that names the argument.

    Args:
        value: the argument as given.
        name: its name, for the message (e.g. `"train_step"`).

    Example:

    ```python
    train_step = check_callable(train_step, "train_step")
    ```
    """
    if value is not None and not callable(value):
        raise TypeError(f"{name}: expected a callable, received {type(value).__name__}")
    return value


def resolve_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to run on: `device` (the model is moved there), else where the model's weights are.

    A model without parameters or buffers runs on the CPU.

    Args:
        model: the model.
        device: the device asked for, or None to keep the model where it is.

    Example:

    ```python
    device = resolve_device(model, "cuda" if torch.cuda.is_available() else None)
    ```
    """
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
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    add_history: bool,
    add_progbar: bool,
    params: dict[str, Any],
) -> CallbackList:
    """A `CallbackList` wired to this run.

    A `CallbackList` passed in is the one used: it is wired to this run's model, optimizers and
    parameters (and gets the default History / ProgbarLogger if it lacks them), keeping its `loop`
    and everything tracked there. A single `Callback` is taken as a list of one; anything else is a
    `TypeError`.

    Args:
        callbacks: the `callbacks` argument of `fit`, `evaluate` or `predict`.
        model: the model the callbacks act on.
        optimizer: the optimizer(s) they may read or adjust (None outside `fit`).
        add_history: append a `History` unless one is in the list.
        add_progbar: append a `ProgbarLogger` unless one is in the list.
        params: the run's parameters (`epochs`, `steps`, `verbose`, ...).

    Example:

    ```python
    callbacks = make_callback_list([EarlyStopping(patience=2)], model, optimizer, add_history=True,
                                   add_progbar=False, params={"epochs": 10, "steps": 100, "verbose": 0})
    ```
    """
    if isinstance(callbacks, CallbackList):
        callbacks.set_model(model)
        if optimizer is not None:
            callbacks.set_optimizer(optimizer)
        callbacks.params.clear()
        callbacks.params.update(params)
        callbacks.add_defaults(add_history, add_progbar)
        return callbacks
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        if not isinstance(callbacks, (Callback, Iterable)):
            raise TypeError(
                "callbacks: expected a list of torchcallbacks.Callback instances (or a CallbackList), "
                f"received {type(callbacks).__name__}"
            )
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
    return CallbackList(callbacks, add_history, add_progbar, model, optimizer, **params)

