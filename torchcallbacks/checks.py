"""Argument checks shared by every layer, with errors that name the argument and what was expected."""

from __future__ import annotations

import numbers


def check_count(value: object, name: str, minimum: int = 0, note: str = "") -> int:
    """`value` when it is an integer >= `minimum` (not a bool), else a ValueError naming the argument.

    Args:
        value: the argument as given.
        name: its name, for the message.
        minimum: the smallest accepted value.
        note: added after "expected an integer >= minimum" in the message, e.g. "(0 turns it off)".

    Example:

    ```python
    patience = check_count(patience, "patience")
    epochs = check_count(epochs, "epochs", minimum=1)
    ```
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}{note}, received {value!r}")
    return value


def check_number(value: object, name: str) -> float:
    """`value` as a float when it is a real number (not a bool), else a TypeError naming the argument.

    Args:
        value: the argument as given.
        name: its name, for the message.

    Example:

    ```python
    min_delta = check_number(min_delta, "min_delta")
    ```
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, received {type(value).__name__} ({value!r})")
    return float(value)
