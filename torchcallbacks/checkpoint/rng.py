"""Random number generator states as tensors and JSON (no pickle).

A state is a dict: `torch` (uint8 tensor of the CPU generator), `cuda` (a list of uint8 tensors, one
per visible CUDA device; empty without CUDA), `numpy` (the legacy global `np.random` MT19937 state:
`{"algorithm", "key": <int64 tensor of 624 words>, "pos", "has_gauss", "cached_gaussian"}`) and `python`
(`random.getstate()`: `{"version", "internal": <int64 tensor of 625 words>, "gauss_next"}`). `encode`
stores the tensors as tensors, so the long word sequences go into a file's tensor data rather than
its JSON. `restore_rng_state` also takes `key` and `internal` as lists of ints (files of format 2 and
earlier).
"""

from __future__ import annotations

import base64
import random
import warnings
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The current state of torch's CPU and CUDA generators, numpy's global one and Python's `random`.

    Example:

    ```python
    state = capture_rng_state()
    a = torch.rand(3)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    ```
    """
    algorithm, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "numpy": {
            "algorithm": str(algorithm),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),  # its own memory: a uint32 -> int64 copy
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": torch.from_numpy(np.array(internal, dtype=np.int64)),
                   "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every generator to a state from `capture_rng_state` (or read back from a checkpoint).

    CUDA states are restored only when as many CUDA devices are visible as were saved (else a
    warning says they are not).

    Args:
        state: a `capture_rng_state()` dict; `numpy` and `python` may be absent (left as they are), and
            their `key` / `internal` may be lists of ints instead of tensors (files of format 2 and earlier).

    Example:

    ```python
    saved = torchcallbacks.load_checkpoint(model, "state.safetensors", restore_rng=False)
    ...  # e.g. build the data loaders first
    restore_rng_state(saved.rng["current"])
    ```
    """
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda])
        else:
            warnings.warn(
                f"the checkpoint has CUDA random states for {len(cuda)} device(s) but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are visible; "
                "CUDA random states are not restored",
                stacklevel=2,
            )
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        np.random.set_state(
            (
                numpy_state["algorithm"],
                np.asarray(_words(numpy_state["key"]), dtype=np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    python_state = state.get("python")
    if python_state is not None:
        random.setstate(
            (python_state["version"], tuple(_words(python_state["internal"])), python_state["gauss_next"])
        )


#: The word sequence of each generator state that is stored as an int64 tensor.
_WORDS = {"numpy": "key", "python": "internal"}


def _words(value: torch.Tensor | list[int]) -> list[int]:
    """A state's word sequence as plain ints: a tensor (current layout) or a list (older files)."""
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def rng_state_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """A `capture_rng_state()` dict as JSON-able data (generator tensors as base64 strings, numpy's
    key and Python's words as lists of ints), to send it to another process without pickle;
    `rng_state_from_json` is the inverse.

    Args:
        state: a `capture_rng_state()` dict.

    Example:

    ```python
    text = json.dumps(rng_state_to_json(capture_rng_state()))
    restore_rng_state(rng_state_from_json(json.loads(text)))
    ```
    """
    out = dict(state)
    out["torch"] = _b64(state["torch"])
    out["cuda"] = [_b64(s) for s in state.get("cuda") or []]
    for part, words in _WORDS.items():
        if state.get(part) is not None:
            out[part] = {**state[part], words: _words(state[part][words])}
    return out


def rng_state_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `rng_state_to_json`.

    Args:
        data: a `rng_state_to_json()` dict (e.g. read back with `json.loads`).

    Example:

    ```python
    text = json.dumps(rng_state_to_json(capture_rng_state()))
    restore_rng_state(rng_state_from_json(json.loads(text)))
    ```
    """
    out = dict(data)
    out["torch"] = _unb64(data["torch"])
    out["cuda"] = [_unb64(s) for s in data.get("cuda") or []]
    for part, words in _WORDS.items():
        if data.get(part) is not None:
            out[part] = {**data[part], words: torch.tensor(data[part][words], dtype=torch.int64)}
    return out


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.to(torch.uint8).cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()
