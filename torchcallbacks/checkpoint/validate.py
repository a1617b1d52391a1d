"""Checks of a training state read from a file, made before any of it is applied.

Every function raises a `CheckpointError` that names the file (`where`) and the field at fault, so that
a bad file changes nothing: the caller checks every part first and applies afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.checkpoint.errors import CheckpointError

#: Bytes of torch's CPU generator state (the Mersenne Twister: 624 words, position, seed).
TORCH_RNG_BYTES = torch.get_rng_state().numel()


def check_counter(value: Any, where: str, field: str) -> int:
    """`value` when it is an integer >= 0 (not a bool), else a `CheckpointError` naming `field`.

    Args:
        value: the value read from the file.
        where: the file, for the message.
        field: the field's path in the state, e.g. `"epoch"`.

    Example:

    ```python
    epoch = check_counter(document["epoch"], "backup/latest.safetensors", "epoch")
    ```
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: field {field!r} must be an integer >= 0, found {value!r}")
    return value


def _fail(where: str, field: str, expected: str, found: Any) -> CheckpointError:
    shown = f"a tensor of shape {tuple(found.shape)} and dtype {found.dtype}" if isinstance(found, torch.Tensor) else repr(found)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return CheckpointError(f"{where}: field {field!r} must be {expected}, found {shown}")


def _ints(value: Any, count: int, low: int, high: int) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(v, int) and not isinstance(v, bool) and low <= v < high for v in value)
    )


def _check_words(value: Any, count: int, where: str, field: str) -> None:
    """A generator's word sequence: a 1-d integer tensor (current files) or a list of ints (format 2
    and earlier) of `count` values in [0, 2**32)."""
    if isinstance(value, torch.Tensor):
        integer = value.dtype != torch.bool and not value.is_floating_point() and not value.is_complex()
        words = value.to(torch.int64) if integer and value.shape == (count,) else None
        if words is not None and not bool(((words >= 0) & (words < 2**32)).all()):
            raise CheckpointError(
                f"{where}: field {field!r} must hold integers in [0, 2**32), found values from "
                f"{int(words.min())} to {int(words.max())}"
            )
        ok = words is not None
    else:
        ok = _ints(value, count, 0, 2**32)
    if not ok:
        raise _fail(where, field, f"{count} integers in [0, 2**32) (a 1-d integer tensor or a list)", value)


def check_generator_state(value: Any, where: str, field: str) -> torch.Tensor:
    """A `torch.Generator` state: a 1-d uint8 tensor of torch's CPU generator size.

    Args:
        value: the value read from the file.
        where: the file, for the message.
        field: the field's path in the state.

    Example:

    ```python
    check_generator_state(torch.Generator().get_state(), "file", "generators/0")
    ```
    """
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == (TORCH_RNG_BYTES,)):
        raise _fail(where, field, f"a uint8 tensor of {TORCH_RNG_BYTES} bytes (a torch generator state)", value)
    return value


def check_rng_state(state: Any, where: str, field: str) -> None:
    """A random state as `capture_rng_state()` makes it: torch's CPU state, CUDA states, numpy's
    legacy MT19937 state and Python's `random` state, each of its type and size.

    Args:
        state: the value read from the file.
        where: the file, for the message.
        field: the field's path in the state, e.g. `"rng/current"`.

    Example:

    ```python
    check_rng_state(capture_rng_state(), "file", "rng/current")
    ```
    """
    if not isinstance(state, Mapping):
        raise _fail(where, field, "a random state (a dict)", state)
    check_generator_state(state.get("torch"), where, f"{field}/torch")
    cuda = state.get("cuda") or []
    if not isinstance(cuda, list) or not all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 and s.ndim == 1 for s in cuda):
        raise _fail(where, f"{field}/cuda", "a list of uint8 tensors (CUDA generator states)", cuda)
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        if isinstance(numpy_state, Mapping):
            _check_words(numpy_state.get("key"), 624, where, f"{field}/numpy/key")
        ok = (
            isinstance(numpy_state, Mapping)
            and numpy_state.get("algorithm") == "MT19937"
            and _ints([numpy_state.get("pos")], 1, 0, 625)
            and numpy_state.get("has_gauss") in (0, 1)
            and isinstance(numpy_state.get("cached_gaussian"), (int, float))
        )
        if not ok:
            raise _fail(where, f"{field}/numpy", "numpy's MT19937 state (algorithm, key, pos, gauss)", numpy_state)
    python_state = state.get("python")
    if python_state is not None:
        gauss = python_state.get("gauss_next") if isinstance(python_state, Mapping) else None
        if isinstance(python_state, Mapping):
            _check_words(python_state.get("internal"), 625, where, f"{field}/python/internal")
        ok = (
            isinstance(python_state, Mapping)
            and python_state.get("version") == 3
            and (gauss is None or (isinstance(gauss, float) and math.isfinite(gauss)))
        )
        if not ok:
            raise _fail(where, f"{field}/python", "Python's random state (version 3, internal, gauss_next)", python_state)


def optimizer_type(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class as `module.QualName`, as stored next to its state.

    Args:
        optimizer: the optimizer.

    Example:

    ```python
    optimizer_type(torch.optim.Adam(model.parameters()))  # "torch.optim.adam.Adam"
    ```
    """
    kind = type(optimizer)
    return f"{kind.__module__}.{kind.__qualname__}"


def check_optimizer_type(optimizer: torch.optim.Optimizer, saved_type: Any, where: str, field: str) -> None:
    """A `CheckpointError` naming `field` when the state was saved from another type of optimizer
    (`saved_type`, an `optimizer_type()` string; None when the file does not say).

    Args:
        optimizer: the optimizer the state is for.
        saved_type: the type recorded with the state.
        where: the file, for the message.
        field: the field's path in the state, e.g. `"optimizers/0"`.

    Example:

    ```python
    check_optimizer_type(optimizer, state["optimizer_types"][0], "ckpt/state-03", "optimizers/0")
    ```
    """
    if saved_type is not None and saved_type != optimizer_type(optimizer):
        raise CheckpointError(
            f"{where}: {field} ({type(optimizer).__name__}) holds the state of a {saved_type}, but the optimizer "
            f"is a {optimizer_type(optimizer)}"
        )


def _is_number(value: Any) -> bool:
    """A finite real number (not a bool), or a one-element real tensor holding one (e.g. a tensor `lr`)."""
    if isinstance(value, torch.Tensor):
        return (
            value.numel() == 1 and value.dtype != torch.bool and not value.is_complex() and value.device.type != "meta"
            and bool(torch.isfinite(value).all())
        )
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hyperparameter_kind(value: Any) -> str | None:
    """What a hyper-parameter holds, as far as it can be checked: "bool", "number", "<n> numbers"
    (e.g. Adam's `betas`); None for anything else (None, strings, mixed tuples), which is not checked."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)) or _is_number(value):
        return "number"
    if isinstance(value, (tuple, list)) and value and all(_hyperparameter_kind(v) == "number" for v in value):
        return f"{len(value)} numbers"
    return None


_KIND_TEXT = {"bool": "true or false", "number": "a finite number"}


def check_hyperparameters(
    optimizer: torch.optim.Optimizer, group: Mapping[str, Any], saved_group: Mapping[str, Any], where: str, field: str
) -> None:
    """Each hyper-parameter of a saved parameter group has the kind of value the optimizer reads there:
    a finite number (not a bool) where the optimizer's default (or the running group's value) is a
    number, true or false where it is a bool, as many finite numbers where it is a tuple of numbers
    (Adam's `betas`). Values whose default is something else (None, a string) are not checked.

    Args:
        optimizer: the optimizer to load into (its `defaults`).
        group: the running parameter group the saved one replaces.
        saved_group: the saved group, as read from the file.
        where: the file, for the message.
        field: the group's path, e.g. `"optimizers/0/param_groups/0"`.

    Example:

    ```python
    check_hyperparameters(optimizer, optimizer.param_groups[0], {"lr": "x", "params": [0]}, "file",
                          "optimizers/0/param_groups/0")  # CheckpointError: ... 'optimizers/0/param_groups/0/lr' ...
    ```
    """
    for key, current in group.items():
        if key in ("params", "param_names") or key not in saved_group:
            continue
        default = optimizer.defaults.get(key)
        kind = _hyperparameter_kind(default) or _hyperparameter_kind(current)
        if kind is None:
            continue
        value = saved_group[key]
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "number":
            ok = _is_number(value)
        else:
            count = int(kind.split()[0])
            ok = isinstance(value, (tuple, list)) and len(value) == count and all(_is_number(v) for v in value)
        if not ok:
            expected = _KIND_TEXT.get(kind) or f"{kind.split()[0]} finite numbers (like {default!r})"
            raise _fail(where, f"{field}/{key}", f"{expected} ({type(optimizer).__name__} reads it)", value)


def _check_step(value: Any, where: str, field: str) -> None:
    """An optimizer's `step` count: a number, or a one-element real tensor."""
    if not _is_number(value) or float(value) < 0:
        raise _fail(where, field, "a number >= 0 (or a one-element real tensor)", value)


def check_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: Any, saved_type: str | None, where: str, field: str, *,
    tensors: bool = True, cast_dtypes: bool = False,
) -> None:
    """The saved state fits `optimizer`: the same type (when the file records it), the same parameter
    groups with the same number of parameters (each listed once), the hyper-parameters this optimizer
    reads, each of its kind (`check_hyperparameters`), a dict of state per listed parameter, `step`
    a number, and state tensors shaped like their parameters, those of a floating parameter's own shape
    (Adam's `exp_avg`, SGD's `momentum_buffer`) of its dtype too.

    Args:
        optimizer: the optimizer to load into.
        saved: its `state_dict()` as read from the file.
        saved_type: the class recorded with it (`optimizer_type`), or None (format 1 files).
        where: the file, for the message.
        field: the field's path, e.g. `"optimizers/1"`.
        tensors: check the state tensors as well (False: a sharded state whose tensors are not read
            yet, or are read into templates of the right shapes; its tensors may be None).
        cast_dtypes: accept state tensors of another dtype than their parameter's (they are cast).

    Example:

    ```python
    check_optimizer_state(optimizer, optimizer.state_dict(), optimizer_type(optimizer), "file", "optimizers/0")
    ```
    """
    name = f"{field} ({type(optimizer).__name__})"
    check_optimizer_type(optimizer, saved_type, where, field)
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list) or not isinstance(saved.get("state"), Mapping):
        raise _fail(where, field, "an optimizer state_dict (state, param_groups)", saved)
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if len(groups) != len(saved_groups):
        raise CheckpointError(
            f"{where}: {name} has {len(groups)} parameter group(s), the file holds {len(saved_groups)}"
        )
    params: dict[Any, torch.Tensor] = {}
    for g, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
        ids = saved_group.get("params") if isinstance(saved_group, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            found = len(ids) if isinstance(ids, list) else ids
            raise CheckpointError(
                f"{where}: {name} group {g} has {len(group['params'])} parameters, the file holds {found}"
            )
        for pid, param in zip(ids, group["params"], strict=True):  # indices (state_dict) or names (FSDP2's)
            if isinstance(pid, bool) or not isinstance(pid, (int, str)) or pid in params:
                what = "not an index or a name" if isinstance(pid, bool) or not isinstance(pid, (int, str)) else "listed twice"
                raise CheckpointError(f"{where}: field '{field}/param_groups/{g}/params' holds {pid!r}, {what}")
            params[pid] = param
        missing = sorted(k for k in group if k != "params" and k not in saved_group)
        if missing:
            raise CheckpointError(
                f"{where}: {name} group {g} lacks {', '.join(missing)} in the file (the state of another optimizer type?)"
            )
        check_hyperparameters(optimizer, group, saved_group, where, f"{field}/param_groups/{g}")
    for pid, entries in saved["state"].items():
        if isinstance(pid, bool) or not isinstance(pid, (int, str)) or pid not in params:
            raise CheckpointError(f"{where}: {name} has state for parameter {pid!r}, which no parameter group lists")
        param = params[pid]
        if not isinstance(entries, Mapping) or not all(isinstance(k, str) for k in entries):
            raise _fail(where, f"{field}/state/{pid}", "a dict of the parameter's state (string keys)", entries)
        for key, value in entries.items():
            if value is None and not tensors:
                continue  # a tensor not read yet
            if key == "step":
                _check_step(value, where, f"{field}/state/{pid}/step")
            if not (tensors and isinstance(value, torch.Tensor)):
                continue
            if value.ndim == param.ndim and value.ndim > 0 and any(
                d != p and d != 1 for d, p in zip(value.shape, param.shape, strict=True)
            ):
                raise CheckpointError(
                    f"{where}: {name} state {key!r} of parameter {pid} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )
            if (
                not cast_dtypes and key != "step" and value.ndim > 0 and value.shape == param.shape
                and param.is_floating_point() and value.dtype != param.dtype
            ):
                raise CheckpointError(
                    f"{where}: field '{field}/state/{pid}/{key}' has dtype {value.dtype}, its parameter "
                    f"{param.dtype} (a damaged file; load_checkpoint(..., cast_dtypes=True) casts it)"
                )


def check_distinct_tensors(state: Mapping[str, Any], where: str) -> None:
    """No tensor of an optimizer's state is also another value of the tree: a file (or an edited
    `{"__tensor__": ...}` reference) that names one stored tensor twice would give two state entries,
    or a state entry and a weight, the same memory (or the shape of another). Tensors shared within
    the model (tied weights) are fine.

    Args:
        state: the tree, its tensors read.
        where: the file, for the message.

    Example:

    ```python
    check_distinct_tensors(read_training_state("backup/latest.safetensors"), "'backup/latest.safetensors'")
    ```
    """
    owners: dict[int, str] = {}

    def walk(value: Any, path: str, distinct: bool) -> None:
        if isinstance(value, torch.Tensor):
            other = owners.get(id(value))
            if distinct and other is not None:
                raise CheckpointError(
                    f"{where}: field {path!r} is the same tensor as {other!r} (one stored tensor named twice: "
                    "a damaged or edited file)"
                )
            owners.setdefault(id(value), path)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{path}/{key}", distinct)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}/{i}", distinct)

    for key, value in state.items():
        if key != "optimizers":
            walk(value, key, False)
    for i, saved in enumerate(state.get("optimizers") or []):
        entries = saved.get("state") if isinstance(saved, Mapping) else None
        if isinstance(entries, Mapping):
            for pid, entry in entries.items():
                walk(entry, f"optimizers/{i}/state/{pid}", True)
        if isinstance(saved, Mapping):
            walk(saved.get("param_groups"), f"optimizers/{i}/param_groups", True)


def check_optimizer_states(
    optimizers: Sequence[torch.optim.Optimizer], state: Mapping[str, Any], where: str, *, tensors: bool = True,
    cast_dtypes: bool = False,
) -> Sequence[Any]:
    """Every optimizer's saved state in `state` (a training-state tree) fits it (`check_optimizer_state`):
    as many states as optimizers, each of the same type (when recorded), with the same groups, their
    hyper-parameters of their kinds, and, with `tensors`, state tensors of their parameters' shapes and
    dtypes, none of them the same tensor as another value of the tree (`check_distinct_tensors`).
    Returns the states.

    Args:
        optimizers: the optimizers the states go into, in order.
        state: the tree (its `optimizers` and `optimizer_types` fields).
        where: the file or directory, for messages.
        tensors: check the state tensors too (False for a sharded state: its tensors are not read yet,
            or were read into templates of their shapes and dtypes).
        cast_dtypes: accept state tensors of another dtype than their parameter's.

    Example:

    ```python
    saved = check_optimizer_states([optimizer], read_training_state("state.safetensors"), "'state.safetensors'")
    ```
    """
    saved = check_list(state.get("optimizers"), where, "optimizers", len(optimizers))
    types = state.get("optimizer_types") or [None] * len(saved)
    for i, (optimizer, optimizer_state) in enumerate(zip(optimizers, saved, strict=True)):
        check_optimizer_state(optimizer, optimizer_state, types[i], where, f"optimizers/{i}", tensors=tensors,
                              cast_dtypes=cast_dtypes)
    if tensors and saved:
        check_distinct_tensors(state, where)
    return saved


def check_list(value: Any, where: str, field: str, count: int | None = None) -> Sequence[Any]:
    """`value` when it is a list (of `count` items, if given), else a `CheckpointError`.

    Args:
        value: the value read from the file.
        where: the file, for the message.
        field: the field's path.
        count: the number of items expected, if known.

    Example:

    ```python
    states = check_list(document["optimizers"], "file", "optimizers", count=len(optimizers))
    ```
    """
    if not isinstance(value, list):
        raise _fail(where, field, "a list", value)
    if count is not None and len(value) != count:
        raise CheckpointError(f"{where}: field {field!r} holds {len(value)} item(s), {count} expected")
    return value


#: The type each top-level field of a training-state tree must have when it is present (not None).
_FIELD_TYPES: dict[str, tuple[type, str]] = {
    "rng": (Mapping, "a dict of random states"),
    "callbacks": (Mapping, "a dict callback state key -> state"),
    "loop": (Mapping, "a dict of the loop's parts"),
    "extra": (Mapping, "a dict"),
    "model": (Mapping, "a dict of tensors"),
    "scaler": (Mapping, "a GradScaler state (a dict)"),
    "optimizers": (list, "a list"),
    "optimizer_types": (list, "a list of class names"),
    "ranks": (list, "a list, one entry per process"),
    "callbacks_by_position": (bool, "true or false"),
}


def check_state_fields(state: Mapping[str, Any], where: str) -> None:
    """The type of every top-level field of a training-state tree, and of what each process's entry
    in `ranks` holds, before anything reads inside them: a damaged or edited file is a
    `CheckpointError` naming the field, never an AttributeError or TypeError of the reader.

    Args:
        state: the tree (e.g. `read_training_state`'s).
        where: the file, for messages.

    Example:

    ```python
    check_state_fields(read_training_state("backup/latest.safetensors"), "'backup/latest.safetensors'")
    ```
    """
    for name, (kind, expected) in _FIELD_TYPES.items():
        value = state.get(name)
        if value is not None and not isinstance(value, kind):
            raise _fail(where, name, expected, value)
    keys = [key for key in state.get("callbacks") or {} if not isinstance(key, str)]
    if keys:
        raise _fail(where, "callbacks", "a dict with string keys", keys[0])
    types = state.get("optimizer_types")
    if types is not None and not all(t is None or isinstance(t, str) for t in types):
        raise _fail(where, "optimizer_types", "a list of class names", types)
    if types is not None and len(types) != len(state.get("optimizers") or []):
        raise CheckpointError(
            f"{where}: field 'optimizer_types' holds {len(types)} item(s), one per optimizer "
            f"({len(state.get('optimizers') or [])}) expected"
        )
    world = state.get("world_size")
    if world is not None and (isinstance(world, bool) or not isinstance(world, int) or world < 1):
        raise _fail(where, "world_size", "an integer >= 1", world)
    for i, rank in enumerate(state.get("ranks") or []):
        if not isinstance(rank, Mapping):
            raise _fail(where, f"ranks/{i}", "a dict (one process's random states and loop parts)", rank)
        for name in ("rng", "loop"):
            if rank.get(name) is not None and not isinstance(rank[name], Mapping):
                raise _fail(where, f"ranks/{i}/{name}", "a dict", rank[name])
