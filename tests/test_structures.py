"""structures: the one walker's rules (leaves, containers, rebuilt types, order, mismatches)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch

from torchcallbacks.structures import first_tensor, iter_tensors, map_leaves_of_many, map_tensors, node

Pair = collections.namedtuple("Pair", "left right")


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    name: str = "frozen"
    derived: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "derived", self.derived + 1)  # counts __post_init__ calls


@dataclasses.dataclass(slots=True)
class Slotted:
    a: torch.Tensor
    b: Any = None


class Tagged(tuple):
    """A tuple subclass that is not a namedtuple: built from one iterable."""


class ReadOnly(Mapping):
    """A mapping whose constructor does not take a dict."""

    def __init__(self, *pairs: tuple[str, Any]) -> None:
        self._data = dict(pairs)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _double(tensor: torch.Tensor) -> torch.Tensor:
    return tensor * 2


def test_containers_come_back_with_their_own_types() -> None:
    t = torch.ones(2)
    pair = map_tensors(_double, Pair(t, t))
    assert type(pair) is Pair and torch.equal(pair.left, t * 2) and torch.equal(pair.right, t * 2)

    maxima = map_tensors(_double, torch.max(torch.ones(3, 2), dim=0))
    assert type(maxima) is torch.return_types.max and torch.equal(maxima.values, torch.full((2,), 2.0))

    tagged = map_tensors(_double, Tagged([t, t]))
    assert type(tagged) is Tagged and torch.equal(tagged[1], t * 2)

    ordered = map_tensors(_double, collections.OrderedDict([("b", t), ("a", t)]))
    assert type(ordered) is collections.OrderedDict and list(ordered) == ["b", "a"]

    factory = map_tensors(_double, collections.defaultdict(list, {"a": t}))
    assert type(factory) is collections.defaultdict and factory.default_factory is list
    assert factory["missing"] == []

    read_only = map_tensors(_double, ReadOnly(("a", t)))  # cannot be built from a dict: a plain dict
    assert type(read_only) is dict and torch.equal(read_only["a"], t * 2)

    nested = map_tensors(_double, {"pair": Pair([t], (t,)), "slotted": Slotted(t)})
    assert type(nested["pair"]) is Pair and type(nested["pair"].left) is list and type(nested["pair"].right) is tuple
    assert type(nested["slotted"]) is Slotted and torch.equal(nested["slotted"].a, t * 2)


def test_dataclasses_are_copied_with_their_fields_replaced_without_running_init() -> None:
    t = torch.ones(2)
    original = Frozen(t, "kept")
    assert original.derived == 1
    moved = map_tensors(_double, original)
    assert type(moved) is Frozen and moved is not original
    assert torch.equal(moved.x, t * 2) and moved.name == "kept"
    assert moved.derived == 1  # __post_init__ did not run again
    assert torch.equal(original.x, t)  # the original is untouched


def test_other_leaves_are_kept_as_they_are() -> None:
    marker = object()
    result = map_tensors(_double, (None, 3, "text", marker, [torch.ones(1)]))
    assert result[:4] == (None, 3, "text", marker) and result[3] is marker
    assert torch.equal(result[4][0], torch.full((1,), 2.0))
    assert node("a string is a leaf") is None and node(torch.ones(1)) is None


def test_walk_order_is_depth_first_by_position_key_and_field() -> None:
    a, b, c, d, e = (torch.full((1,), float(i)) for i in range(5))
    value = {"z": (a, Slotted(b, [c])), "y": Pair(d, {"k": e}), "none": None}
    assert [float(t) for t in iter_tensors(value)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert first_tensor(value) is a
    assert first_tensor(("no tensor", 3, [None])) is None
    assert first_tensor(["text", Frozen(b)]) is b


def test_map_leaves_of_many_combines_leaf_by_leaf_keeping_the_first_structure() -> None:
    first = {"pair": Pair(torch.zeros(2), 1), "extra": Frozen(torch.zeros(1))}
    second = {"extra": Frozen(torch.ones(3)), "pair": Pair(torch.ones(1), 2)}  # keys in another order
    result = map_leaves_of_many(lambda leaves: leaves, [first, second])
    assert list(result) == ["pair", "extra"] and type(result["pair"]) is Pair and type(result["extra"]) is Frozen
    assert [t.shape[0] for t in result["pair"].left] == [2, 1] and result["pair"].right == [1, 2]
    assert [t.shape[0] for t in result["extra"].x] == [1, 3]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"a": torch.ones(1), "c": torch.ones(1)}, r"at the top: element 1 is dict with keys \['a', 'c'\]"),
        ({"a": torch.ones(1), "b": [torch.ones(1)]}, r"at \['b'\]: element 1 is list with keys \[0\], element 0 is a tensor"),
        ({"a": torch.ones(1), "b": None}, r"at \['b'\]: element 1 is a leaf of type NoneType"),
        ([torch.ones(1), torch.ones(1)], r"at the top: element 1 is list"),
    ],
)
def test_structures_that_differ_raise_naming_where(second: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        map_leaves_of_many(lambda leaves: leaves, [{"a": torch.ones(1), "b": torch.ones(1)}, second])
