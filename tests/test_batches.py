"""batches: moving nested batches to the device (keeping their types) and their batch size."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from conftest import OffDeviceTensor, off_device

from torchcallbacks.training.batches import batch_size, to_device

CPU = torch.device("cpu")
Target = collections.namedtuple("Target", "value weight")


@dataclasses.dataclass
class Features:
    tokens: torch.Tensor
    mask: torch.Tensor
    source: str = "corpus"


def _plain(value: object) -> bool:
    return type(value) is torch.Tensor and value.device == CPU


def test_to_device_moves_every_tensor_and_keeps_namedtuples_dataclasses_and_dicts() -> None:
    moves: list[torch.device | None] = []
    batch = (
        Features(off_device(torch.zeros(4, 3), moves), off_device(torch.ones(4, 3), moves)),
        Target(off_device(torch.zeros(4), moves), off_device(torch.ones(4), moves)),
        {"extra": [off_device(torch.zeros(4), moves), None]},
    )
    features, target, extra = to_device(batch, CPU)
    assert moves == [CPU] * 5
    assert type(features) is Features and features.source == "corpus"
    assert _plain(features.tokens) and _plain(features.mask) and torch.equal(features.mask, torch.ones(4, 3))
    assert type(target) is Target and _plain(target.value) and _plain(target.weight)
    assert type(extra) is dict and _plain(extra["extra"][0]) and extra["extra"][1] is None


@pytest.mark.parametrize("container", [tuple, list, lambda items: dict(enumerate(items))])
def test_to_device_fast_paths_give_the_walkers_result(container) -> None:
    moves: list[torch.device | None] = []
    plain = torch.zeros(2)
    batch = container([off_device(torch.zeros(2), moves), plain, off_device(torch.ones(2), moves)])
    moved = to_device(batch, CPU)
    assert type(moved) is type(batch) and moves == [CPU, CPU]
    values = list(moved.values()) if isinstance(moved, dict) else list(moved)
    assert all(_plain(v) for v in values) and values[1] is plain  # already there: not copied
    mixed = to_device(container([off_device(torch.zeros(2), moves), "label"]), CPU)
    mixed_values = list(mixed.values()) if isinstance(mixed, dict) else list(mixed)
    assert type(mixed) is type(batch) and _plain(mixed_values[0]) and mixed_values[1] == "label"


def test_tensors_already_on_the_device_are_returned_as_they_are() -> None:
    x = torch.zeros(3)
    assert to_device(x, CPU) is x
    assert to_device(Target(x, x), CPU).value is x


def test_batch_size_is_the_length_of_the_first_tensor_in_walk_order() -> None:
    assert batch_size(torch.zeros(5, 2)) == 5
    assert batch_size(torch.tensor(3.0)) == 1  # a 0-d tensor: one sample
    assert batch_size({"tokens": torch.zeros(16, 128), "mask": torch.ones(16, 128)}) == 16
    assert batch_size((Features(torch.zeros(7, 3), torch.zeros(7, 3)), torch.zeros(2))) == 7
    assert batch_size(Target(torch.zeros(6), torch.zeros(6))) == 6
    assert batch_size(("ids come first", None, [torch.zeros(9, 1)])) == 9  # non-tensor leaves are skipped
    assert batch_size({"meta": {"lengths": [3, 4]}, "x": torch.zeros(2, 4)}) == 2
    assert batch_size(("no tensors", 3)) == 1
    assert batch_size((torch.zeros(3, 2), torch.zeros(5))) == 3  # a multi-input x
    assert batch_size([torch.tensor(1.0), torch.zeros(5)]) == 1


def test_an_off_device_tensor_cannot_be_computed_with_before_it_is_moved() -> None:
    """The test double above: what the other tests' observations rest on."""
    moves: list[torch.device | None] = []
    tensor = off_device(torch.ones(2, 3), moves)
    assert isinstance(tensor, OffDeviceTensor) and tensor.device.type == "meta" and tensor.shape == (2, 3)
    with pytest.raises(RuntimeError, match="never moved"):
        tensor.sum()
    assert _plain(tensor.to(CPU)) and moves == [CPU]
