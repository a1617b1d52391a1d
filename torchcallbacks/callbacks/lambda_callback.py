"""`LambdaCallback`: a callback made of plain functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchcallbacks.callbacks.callback import HOOK_ALIASES, HOOKS, Callback

_ALIASES = tuple(HOOK_ALIASES.values())


class LambdaCallback(Callback):
    """Builds a callback from functions passed by hook name.

    Each function takes the hook's arguments: `on_epoch_begin(epoch, logs)`, `on_train_batch_end(batch,
    logs)`, `on_train_begin(logs)`, and so on for every hook (`on_batch_begin` / `on_batch_end` too).
    Hooks that are not given are not called at all.

    Args:
        on_epoch_begin, on_epoch_end, on_train_begin, on_train_end, on_train_batch_begin,
        on_train_batch_end: the common hooks, by keyword.
        **kwargs: any other hook by name (`on_test_end=...`, `on_predict_batch_end=...`, ...).

    Example:

    ```python
    print_loss = LambdaCallback(on_epoch_end=lambda epoch, logs: print(epoch, logs["loss"]))
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, callbacks=[print_loss])
    ```
    """

    def __init__(
        self,
        on_epoch_begin: Callable[..., Any] | None = None,
        on_epoch_end: Callable[..., Any] | None = None,
        on_train_begin: Callable[..., Any] | None = None,
        on_train_end: Callable[..., Any] | None = None,
        on_train_batch_begin: Callable[..., Any] | None = None,
        on_train_batch_end: Callable[..., Any] | None = None,
        **kwargs: Callable[..., Any],
    ) -> None:
        super().__init__()
        hooks = {
            "on_epoch_begin": on_epoch_begin,
            "on_epoch_end": on_epoch_end,
            "on_train_begin": on_train_begin,
            "on_train_end": on_train_end,
            "on_train_batch_begin": on_train_batch_begin,
            "on_train_batch_end": on_train_batch_end,
            **kwargs,
        }
        for name, function in hooks.items():
            if name not in HOOKS and name not in _ALIASES:
                raise TypeError(
                    f"LambdaCallback: unknown hook {name!r}; expected one of {', '.join(HOOKS + _ALIASES)}"
                )
            if function is None:
                continue
            if not callable(function):
                raise TypeError(f"LambdaCallback: {name} must be callable, received {type(function).__name__}")
            setattr(self, name, function)
