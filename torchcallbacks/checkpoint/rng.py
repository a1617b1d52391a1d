"""Random number generator states as tensors and JSON (no pickle).

A state is a dict: `torch` (uint8 tensor of the CPU generator), `cuda` (a list of uint8 tensors, one
per visible CUDA device; empty without CUDA), `numpy` (the legacy global `np.random` MT19937 state as
JSON: `{"key": [624 ints], "pos", "has_gauss", "cached_gaussian"}`) and `python` (`random.getstate()`
as JSON: `{"version", "internal": [625 ints], "gauss_next"}`). `encode` stores the tensors as tensors.
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
            "key": np.asarray(key).tolist(),  # plain ints, in one call (not 624 numpy scalars)
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every generator to a state from `capture_rng_state` (or read back from a checkpoint).

    CUDA states are restored only when as many CUDA devices are visible as were saved (else a
    warning says they are not).

    Args:
        state: a `capture_rng_state()` dict; `numpy` and `python` may be absent (left as they are).

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
                np.asarray(numpy_state["key"], dtype=np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    python_state = state.get("python")
    if python_state is not None:
        random.setstate(
            (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
        )


def rng_state_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """A `capture_rng_state()` dict as JSON-able data (generator tensors as base64 strings), to send
    it to another process without pickle; `rng_state_from_json` is the inverse.

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
    return out


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.to(torch.uint8).cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()
