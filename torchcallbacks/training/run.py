"""The skeleton `fit`, `evaluate` and `predict` share: begin hook, body, end hook (also after an
error, with `loop.exception` set), and the model's train mode put back whatever happens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from torchcallbacks.callbacks.callback_list import CallbackList


class RunResult:
    """What the body of a run hands to its end hook: `logs`, set by the body as it goes."""

    __slots__ = ("logs",)

    def __init__(self) -> None:
        self.logs: dict[str, Any] | None = None


@contextlib.contextmanager
def run_hooks(callbacks: CallbackList, model: torch.nn.Module, begin: str, end: str) -> Iterator[RunResult]:
    """Run `begin` (e.g. `"on_train_begin"`), the body, then `end` with the body's logs.

    `loop.exception` is cleared at the start (an earlier run's error never leaks into this one). When
    the begin hook or the body raises, the end hook still runs, with `loop.exception` set, so that
    callbacks undo what they began (swapped weights, open files); the error then propagates. The
    model's train / eval mode is put back in every case.

    Args:
        callbacks: the run's `CallbackList`.
        model: the model whose mode to put back.
        begin: the begin hook's name.
        end: the end hook's name.

    Example:

    ```python
    with run_hooks(callbacks, model, "on_predict_begin", "on_predict_end") as run:
        ...  # the batches; set run.logs for the end hook
    ```
    """
    was_training = model.training
    callbacks.loop.exception = None
    result = RunResult()
    try:
        getattr(callbacks, begin)()
        yield result
    except BaseException as exc:
        callbacks.end_after_error(end, exc, result.logs)
        raise
    else:
        getattr(callbacks, end)(result.logs)
    finally:
        model.train(was_training)
