"""Turning a loader into epochs of numbered batches: `steps_per_epoch`, endless iterables, resume skips."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def check_steps(value: int | None, name: str) -> int | None:
    """`value` when it is None or an integer >= 1, else a `ValueError` that names the argument.

    Args:
        value: the argument as given (e.g. `steps_per_epoch`).
        name: its name, for the message.

    Example:

    ```python
    steps = check_steps(steps_per_epoch, "steps_per_epoch")
    ```
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected None or an integer >= 1, received {value!r}")
    return value


def known_length(data: Iterable[Any]) -> int | None:
    """`len(data)` when the loader has one, else None (an iterable dataset, a generator).

    Args:
        data: an iterable of batches.

    Example:

    ```python
    known_length(DataLoader(dataset, batch_size=32))  # the number of batches
    known_length(batch for batch in loader)  # None
    ```
    """
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


class EpochIterator:
    """Numbered batches, one epoch at a time.

    Without `steps`, each epoch is one full pass (`iter(data)` anew). With `steps`, each epoch takes
    that many batches from one iterator that carries over between epochs, starting a new pass when a
    pass ends, as Keras does; a loader that runs dry (a generator) ends training with a warning.

    Args:
        data: an iterable of batches, e.g. a `torch.utils.data.DataLoader`.
        steps: batches per epoch (validated with `check_steps`), or None for one pass.
        name: the argument's name, for error messages.

    Example:

    ```python
    batches = EpochIterator(loader, steps=100, name="x")
    for epoch in range(epochs):
        for index, batch in batches.epoch():
            train(batch)
    ```
    """

    def __init__(self, data: Iterable[Any], steps: int | None, name: str) -> None:
        if not isinstance(data, Iterable):
            raise TypeError(
                f"{name}: expected an iterable of batches (e.g. a torch.utils.data.DataLoader), "
                f"received {type(data).__name__}"
            )
        self.data = data
        self.steps = steps
        self.name = name
        self._iterator: Iterator[Any] | None = None
        self.exhausted = False

    def epoch(self, skip: int = 0, after_skip: Callable[[], None] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield `(index, batch)` for one epoch, leaving out the first `skip` batches (a resume);
        `after_skip()` is called once they are consumed, before the next batch is fetched.

        The skipped batches are fetched (consumed), not just counted, so that the ones trained are
        the ones an uninterrupted run would have trained.

        Args:
            skip: batches of this epoch already trained; the first index yielded is `skip`.
            after_skip: called once after the skipped batches (not called when `skip` is 0).

        Example:

        ```python
        for index, batch in batches.epoch(skip=state.batch):
            train(batch)  # index runs from state.batch
        ```
        """
        if self.steps is None:
            batches = enumerate(self.data)
            if skip:
                for _ in itertools.islice(batches, skip):
                    pass
                if after_skip is not None:
                    after_skip()
            yield from batches
            return
        for index in range(self.steps):
            if index == skip and skip and after_skip is not None:
                after_skip()
            batch = self._next()
            if batch is _END:
                self.exhausted = True
                warnings.warn(
                    f"{self.name} ran out of data after {index} of {self.steps} steps in this epoch; "
                    "training stops. Make sure the loader can provide steps_per_epoch * epochs batches.",
                    stacklevel=4,
                )
                return
            if index >= skip:
                yield index, batch

    def _next(self) -> Any:
        if self._iterator is not None:
            batch = next(self._iterator, _END)
            if batch is not _END:
                return batch
        self._iterator = iter(self.data)
        return next(self._iterator, _END)


_END = object()
