"""A file's tensors against a model: keys (tied names filled in), shapes and dtypes, with errors
that name the file and the keys that differ; and loading them into the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.tensor_files import tensor_view


def tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """`name -> the other names of the same tensor` among a model's state-dict entries: tied weights
    (one Parameter under two names, as GPT-2's `lm_head.weight` and `transformer.wte.weight`), found as
    entries that are the same view of the same memory.

    Args:
        state: a model's `state_dict(keep_vars=True)`.

    Example:

    ```python
    tied_names(gpt2.state_dict())  # {'lm_head.weight': ['transformer.wte.weight'], ...}
    ```
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        groups.setdefault(tensor_view(tensor), []).append(name)
    return {name: [other for other in names if other != name] for names in groups.values() if len(names) > 1 for name in names}


def check_keys(
    path: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], strict: bool,
    *, cast_dtypes: bool = False,
) -> None:
    """Fill in tied names, then compare keys, shapes and (unless `cast_dtypes`) dtypes with the model,
    raising a CheckpointError that names the keys that differ.

    A dtype that differs from the model's (a float32 weight stored as int32 with the same bytes, a
    float16 file for a float32 model) is refused by default: torch's `load_state_dict` would cast it
    silently, and a changed dtype in a file is a sign of damage; `cast_dtypes=True` lets it be cast.

    Tied names are filled from the way `safetensors.torch.save_model` records them (metadata
    `alias -> kept`), and from the model itself: a key missing from the file whose tensor is tied in
    the model to one the file has gets that one's value (a Hugging Face `save_pretrained` file stores a
    tied weight once, e.g. GPT-2's `lm_head.weight` is left out for `transformer.wte.weight`). Keys
    missing otherwise stay missing.

    Args:
        path: the file, for the message.
        model: the module loaded into.
        tensors: the file's tensors by name (completed in place with tied names).
        metadata: the file's header metadata.
        strict: require exactly the model's keys.
        cast_dtypes: accept other dtypes (cast when loaded).

    Example:

    ```python
    check_keys("model.safetensors", model, tensors, metadata, strict=True)
    ```
    """
    expected = model.state_dict(keep_vars=True)
    tied: dict[str, list[str]] | None = None
    for name in expected:
        if name in tensors:
            continue
        kept = metadata.get(name)
        if kept in tensors:
            tensors[name] = tensors[kept]
            continue
        if tied is None:
            tied = tied_names(expected)
        present = [other for other in tied.get(name, ()) if other in tensors]
        if present:
            tensors[name] = tensors[present[0]]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    )
    dtypes = [] if cast_dtypes else sorted(
        f"{k}: file {tensors[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) == tuple(v.shape) and tensors[k].dtype != v.dtype
    )
    problems = []
    if shapes:
        problems.append("shapes differ for " + "; ".join(shapes))
    if dtypes:
        problems.append("dtypes differ for " + "; ".join(dtypes) + " (cast_dtypes=True casts them)")
    if strict and missing:
        problems.append("missing in the file: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("not in the model: " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(f"{path!r} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_model_tensors(
    path: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], strict: bool,
    cast_dtypes: bool = False,
) -> None:
    """`check_keys`, then load the model's entries of `tensors` into `model`.

    Args:
        path: the file, for messages.
        model: the module.
        tensors: the file's model tensors by name.
        metadata: the file's header metadata.
        strict: require exactly the model's keys.
        cast_dtypes: cast tensors of another dtype.

    Example:

    ```python
    load_model_tensors(path, model, model_tensors(tensors), metadata, strict=True)
    ```
    """
    check_keys(path, model, tensors, metadata, strict, cast_dtypes=cast_dtypes)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=strict)
