"""Logs: what hooks receive, and the one place where tensor values become Python numbers.

Batch logs inside `fit` are `LazyLogs`: their values (0-d tensors on the training device) are computed
only when a callback reads them, so a batch whose logs nobody reads costs no device work and no
host-device synchronisation. Converting to Python floats happens in `to_floats`, one transfer for all
values at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch


class LazyLogs(MutableMapping[str, Any]):
    """A logs mapping whose values are computed on first access.

    `compute` returns the values (typically 0-d tensors still on the device) as they were when the
    logs were created; it runs at most once. Keys set by callbacks are kept beside them.
    """

    __slots__ = ("_compute", "_values")

    def __init__(self, compute: Callable[[], dict[str, Any]]) -> None:
        self._compute: Callable[[], dict[str, Any]] | None = compute
        self._values: dict[str, Any] = {}

    def _materialize(self) -> dict[str, Any]:
        if self._compute is not None:
            computed, self._compute = self._compute(), None
            computed.update(self._values)
            self._values = computed
        return self._values

    def __getitem__(self, key: str) -> Any:
        return self._materialize()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._materialize()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._materialize())

    def __len__(self) -> int:
        return len(self._materialize())

    def __repr__(self) -> str:
        return f"LazyLogs({self._materialize()!r})"


def float_dtype(device: torch.device) -> torch.dtype:
    """The dtype running sums and logged values are kept in on `device`: float64, except on MPS,
    which has none (float32 there).

    Args:
        device: where the values live.

    Example:

    ```python
    total = torch.zeros((), dtype=float_dtype(loss.device), device=loss.device)
    ```
    """
    return torch.float32 if device.type == "mps" else torch.float64


def to_floats(logs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of `logs` with every tensor value turned into a Python float.

    All tensors on one device are moved in a single transfer (one synchronisation per device, not
    one per value). Values that are not tensors are kept as they are.
    """
    if not logs:
        return {}
    out = dict(logs)
    by_device: dict[torch.device, list[str]] = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"logs[{key!r}] must be a number or a one-element tensor, got shape {tuple(value.shape)}")
            by_device.setdefault(value.device, []).append(key)
    for device, keys in by_device.items():
        dtype = float_dtype(device)
        stacked = torch.stack([out[k].detach().reshape(()).to(dtype) for k in keys])
        for key, number in zip(keys, stacked.tolist(), strict=True):
            out[key] = number
    return out


def to_float(value: Any) -> float:
    """`value` (a number or a one-element tensor) as a Python float."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).to(float_dtype(value.device)).item())
    return float(value)
