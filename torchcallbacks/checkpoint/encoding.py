"""Nested Python state (dicts, lists, numbers, tensors) <-> a JSON document plus named tensors.

This is how every non-model part of a training state is stored without pickle: optimizer, scheduler
and GradScaler `state_dict()`s and callback states are walked once; each tensor found is stored as a
safetensors tensor named after its path (e.g. `optimizer/0/state/3/exp_avg`) and replaced in the JSON
by `{"__tensor__": name}`. Values that JSON cannot hold exactly are tagged (see docs/checkpoint-format.md):

- `{"__tensor__": name}`: the tensor `name` of the file;
- `{"__tuple__": [...]}`: a tuple (e.g. Adam's `betas`);
- `{"__dict__": [[key, value], ...]}`: a dict whose keys are not all strings (e.g. optimizer `state`,
  keyed by parameter index);
- `{"__float__": "nan" | "inf" | "-inf"}`: a non-finite float (strict JSON has none).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any

import torch

_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON-able data; tensors go into `tensors` under names that start with `path`.

    Args:
        value: tensors, numbers, strings, None, and lists, tuples and dicts of them (nested).
        path: the name prefix of the tensors found in `value`, e.g. `"optimizer/0"`.
        tensors: where the tensors found are put (name -> tensor); a name already there is an error.

    Example:

    ```python
    tensors = {}
    data = encode({"step": 3, "betas": (0.9, 0.999), "w": torch.ones(2)}, "opt", tensors)
    # data == {"step": 3, "betas": {"__tuple__": [0.9, 0.999]}, "w": {"__tensor__": "opt/w"}}
    # tensors == {"opt/w": tensor([1., 1.])}
    ```
    """
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two values of the state would be stored as tensor {path!r}")
        tensors[path] = value
        return {"__tensor__": path}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        return encode(value.item(), path, tensors)  # numpy scalars
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        if all(type(v) is int for v in value):  # e.g. a random state's 624 words: nothing to walk
            return list(value)
        return [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not any(tag in value for tag in _TAGS):
            return {k: encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {
            "__dict__": [[encode(k, f"{path}/key{i}", tensors), encode(v, f"{path}/{k}", tensors)]
                         for i, (k, v) in enumerate(value.items())]
        }
    raise TypeError(
        f"cannot store {path!r} of type {type(value).__name__} in a checkpoint: expected tensors, numbers, "
        "strings, None, lists, tuples or dicts"
    )


def decode(value: Any, tensors: Mapping[str, torch.Tensor], *, in_place: bool = False) -> Any:
    """The inverse of `encode`: tagged values become tensors, tuples, dicts and floats again.

    Args:
        value: JSON data from `encode` (e.g. read back with `json.loads`).
        tensors: the tensors it refers to, by name (a missing one is a `KeyError`).
        in_place: reuse `value`'s lists and untagged dicts (JSON just parsed, read once) instead of
            building copies: half the memory at the peak.

    Example:

    ```python
    tensors = {}
    data = encode({"betas": (0.9, 0.999), "w": torch.ones(2)}, "opt", tensors)
    state = decode(json.loads(json.dumps(data)), tensors)
    # state == {"betas": (0.9, 0.999), "w": tensors["opt/w"]}
    ```
    """
    if isinstance(value, list):
        if not in_place:
            return [decode(v, tensors) for v in value]
        for i, item in enumerate(value):
            value[i] = decode(item, tensors, in_place=True)
        return value
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tensor__":
            if inner not in tensors:
                raise KeyError(f"the state refers to tensor {inner!r}, which the file does not have")
            return tensors[inner]
        if tag == "__tuple__":
            return tuple(decode(v, tensors) for v in inner)
        if tag == "__dict__":
            return {decode(k, tensors): decode(v, tensors) for k, v in inner}
        if tag == "__float__":
            return float(inner)
    if not in_place:
        return {k: decode(v, tensors) for k, v in value.items()}
    for key, item in value.items():
        value[key] = decode(item, tensors, in_place=True)
    return value


def to_json(value: Any) -> Any:
    """`value` as plain JSON data, tensors included (as base64 bytes with dtype and shape), to send
    it to another process without pickle; `from_json` is the inverse.

    Args:
        value: what `encode` takes.

    Example:

    ```python
    text = json.dumps(to_json({"w": torch.ones(2), "step": 3}))
    from_json(json.loads(text))  # {"w": tensor([1., 1.]), "step": 3}
    ```
    """
    tensors: dict[str, torch.Tensor] = {}
    document = encode(value, "t", tensors)
    return {
        "document": document,
        "tensors": {
            name: [str(t.dtype).removeprefix("torch."), list(t.shape),
                   base64.b64encode(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).decode("ascii")]
            for name, t in tensors.items()
        },
    }


def from_json(data: Any) -> Any:
    """The inverse of `to_json`.

    Args:
        data: what `to_json` returned (e.g. read back with `json.loads`).

    Example:

    ```python
    from_json(to_json({"w": torch.ones(2)}))["w"]  # tensor([1., 1.])
    ```
    """
    tensors = {
        name: torch.frombuffer(bytearray(base64.b64decode(raw)), dtype=torch.uint8)
        .view(getattr(torch, dtype)).reshape(shape).clone()
        for name, (dtype, shape, raw) in data["tensors"].items()
    }
    return decode(data["document"], tensors)
