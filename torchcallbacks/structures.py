"""Nested structures of tensors: the one set of rules for walking a batch or a model's outputs.

Moving a batch to the device, finding its batch size, concatenating predict outputs and gathering
them over processes all walk the same structures, by the same rules:

* A tensor (any `torch.Tensor`, subclasses and parameters included) is a leaf.
* A tuple, a list, a mapping or a dataclass instance is a container; its children are walked in
  order: by position, by key in the mapping's iteration order, by field in declaration order
  (`dataclasses.fields`, `init=False` fields included).
* Anything else (None, numbers, strings, other objects) is a leaf that is not a tensor.

A container is rebuilt with its own type, so a structure keeps its type through every walk:

* a plain tuple or list: a new one; a namedtuple: `cls._make(children)`; another tuple or list
  subclass (e.g. `torch.return_types.max`): `cls(children)`;
* a dict: a new dict with the same keys; a `defaultdict` keeps its `default_factory`; another
  mapping type: `cls(dict_of_children)`, or a plain dict when that raises `TypeError` or
  `ValueError` (a mapping whose constructor takes no dict);
* a dataclass instance: a shallow copy (`copy.copy`, so neither `__init__` nor `__post_init__` runs,
  and frozen dataclasses work) with its fields replaced.

The walkers do not follow reference cycles; batches and outputs have none.

Why not `torch.utils._pytree`: it is a private module, and it walks a dataclass or a mapping type
other than dict / OrderedDict / defaultdict only after that type is registered, globally, for the
whole process; a user's batch type should work without that.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import torch

_Rebuild = Callable[[list[Any]], Any]


def _rebuild_mapping(value: Mapping[Any, Any], keys: list[Any]) -> _Rebuild:
    cls: Any = type(value)
    if cls is dict:
        return lambda children: dict(zip(keys, children, strict=True))
    if isinstance(value, defaultdict):
        return lambda children: cls(value.default_factory, zip(keys, children, strict=True))

    def rebuild(children: list[Any]) -> Any:
        items = dict(zip(keys, children, strict=True))
        try:
            return cls(items)
        except (TypeError, ValueError):  # its constructor does not take a dict
            return items

    return rebuild


def _rebuild_dataclass(value: Any, names: list[str]) -> _Rebuild:
    def rebuild(children: list[Any]) -> Any:
        new = copy.copy(value)
        for name, child in zip(names, children, strict=True):
            object.__setattr__(new, name, child)
        return new

    return rebuild


def node(value: Any) -> tuple[list[Any], list[Any], _Rebuild] | None:
    """How to walk `value`: `(keys, children, rebuild)` for a container, None for a leaf.

    `keys` name the children (positions, mapping keys or field names), and `rebuild(new_children)`
    makes a container of `value`'s type holding `new_children` in place of `children`.

    Args:
        value: anything.

    Example:

    ```python
    keys, children, rebuild = node({"a": x, "b": y})  # ["a", "b"], [x, y], ...
    rebuild([x.cuda(), y.cuda()])  # {"a": ..., "b": ...}
    node(torch.zeros(3))  # None: a leaf
    ```
    """
    cls = type(value)
    if cls is tuple or cls is list:
        return list(range(len(value))), list(value), cls
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, tuple):
        make = getattr(cls, "_make", None)  # a namedtuple
        return list(range(len(value))), list(value), make if make is not None else cls
    if isinstance(value, list):
        return list(range(len(value))), list(value), cls
    if isinstance(value, Mapping):
        keys = list(value)
        return keys, [value[key] for key in keys], _rebuild_mapping(value, keys)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [field.name for field in dataclasses.fields(value)]
        return names, [getattr(value, name) for name in names], _rebuild_dataclass(value, names)
    return None


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """`value` with `fn(tensor)` in place of every tensor, every container keeping its type and
    every other leaf kept as it is.

    Args:
        fn: applied to each tensor.
        value: a tensor, or a structure of them (see the module's rules).

    Example:

    ```python
    Target = collections.namedtuple("Target", "value weight")
    halves = map_tensors(lambda t: t.half(), Target(torch.zeros(4), torch.ones(4)))  # still a Target
    ```
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    # Plain tuples, lists and dicts (what batches mostly are) are walked without `node`'s
    # bookkeeping; the result is the one `node` would rebuild.
    cls = type(value)
    tensor = torch.Tensor
    if cls is tuple:
        return tuple([fn(child) if isinstance(child, tensor) else map_tensors(fn, child) for child in value])
    if cls is list:
        return [fn(child) if isinstance(child, tensor) else map_tensors(fn, child) for child in value]
    if cls is dict:
        return {
            key: fn(child) if isinstance(child, tensor) else map_tensors(fn, child) for key, child in value.items()
        }
    spec = node(value)
    if spec is None:
        return value
    _, children, rebuild = spec
    return rebuild([map_tensors(fn, child) for child in children])


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor of a structure in walk order (depth first, children in order), or None.

    Args:
        value: a tensor, or a structure of them.

    Example:

    ```python
    first_tensor({"ids": ids, "mask": mask})  # ids
    first_tensor(("no tensors", 3))  # None
    ```
    """
    if isinstance(value, torch.Tensor):
        return value
    cls = type(value)
    if cls is tuple or cls is list:
        children: Any = value
    elif cls is dict:
        children = value.values()
    else:
        spec = node(value)
        if spec is None:
            return None
        children = spec[1]
    for child in children:
        found = child if isinstance(child, torch.Tensor) else first_tensor(child)
        if found is not None:
            return found
    return None


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors of a structure, in walk order (depth first, children in order).

    Args:
        value: a tensor, or a structure of them.

    Example:

    ```python
    list(iter_tensors({"ids": ids, "extra": (mask, None)}))  # [ids, mask]
    ```
    """
    if isinstance(value, torch.Tensor):
        yield value
        return
    spec = node(value)
    if spec is not None:
        for child in spec[1]:
            yield from iter_tensors(child)


def map_leaves_of_many(fn: Callable[[list[Any]], Any], values: Sequence[Any]) -> Any:
    """Combine structures of the same shape leaf by leaf: the result has the structure (and types)
    of `values[0]`, with `fn([leaf of values[0], leaf of values[1], ...])` at each leaf, tensor or not.

    Containers must match: the same type and length or fields; mappings the same keys, in any order
    (the result follows the first's). Where `values[0]` has a tensor every value must have one;
    other leaves are passed to `fn` as they are.

    Args:
        fn: receives the list of corresponding leaves, one per value, in order.
        values: at least one structure, all of the same structure.

    Raises:
        ValueError: when a value's structure differs from the first's (the message names where).

    Example:

    ```python
    map_leaves_of_many(torch.cat, [{"logits": a}, {"logits": b}])  # {"logits": torch.cat([a, b])}
    ```
    """
    return _map_many(fn, list(values), "")


def _map_many(fn: Callable[[list[Any]], Any], values: list[Any], where: str) -> Any:
    first = values[0]
    spec = None if isinstance(first, torch.Tensor) else node(first)
    if spec is None:  # a leaf; where the first is a tensor, so must the others be
        if isinstance(first, torch.Tensor):
            for index, other in enumerate(values[1:], start=1):
                if not isinstance(other, torch.Tensor):
                    _mismatch(where, index, other, first)
        return fn(values)
    keys, children, rebuild = spec
    columns: list[list[Any]] = [[child] for child in children]
    is_mapping = isinstance(first, Mapping)
    for index, other in enumerate(values[1:], start=1):
        other_spec = node(other) if type(other) is type(first) else None
        if other_spec is not None and is_mapping and set(other_spec[0]) == set(keys):
            other_children = [other[key] for key in keys]  # mappings match by key, in the first's order
        elif other_spec is not None and not is_mapping and other_spec[0] == keys:
            other_children = other_spec[1]
        else:
            _mismatch(where, index, other, first)
        for column, child in zip(columns, other_children, strict=True):
            column.append(child)
    return rebuild([_map_many(fn, column, f"{where}[{key!r}]") for key, column in zip(keys, columns, strict=True)])


def _mismatch(where: str, index: int, other: Any, first: Any) -> NoReturn:
    raise ValueError(
        f"structure at {where or 'the top'}: element {index} is {_shape(other)}, element 0 is "
        f"{_shape(first)}; every element must have the same structure"
    )


def _shape(value: Any) -> str:
    spec = node(value)
    if spec is None:
        return "a tensor" if isinstance(value, torch.Tensor) else f"a leaf of type {type(value).__name__}"
    return f"{type(value).__name__} with keys {spec[0]}"
