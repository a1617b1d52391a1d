"""The streaming safetensors writer (`checkpoint/stream.py`): the files are what
`safetensors.torch.save_file` writes, byte for byte, for every dtype and shape."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from torchcallbacks.checkpoint.stream import StreamPlan, TensorSpec, specs_of, write_stream


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=generator)
    tensors = {
        "f32": floats, "f64": floats.double(), "f16": floats.half(), "bf16": floats.bfloat16(),
        "i64": torch.arange(-6, 6).reshape(3, 4), "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.arange(5, dtype=torch.int16), "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.int32).to(torch.uint8), "bool": torch.tensor([True, False, True]),
        "u16": torch.arange(4).to(torch.uint16), "u32": torch.arange(4).to(torch.uint32), "u64": torch.arange(4).to(torch.uint64),
        "c64": torch.randn(4, generator=generator, dtype=torch.complex64),
        "f8_e4m3": floats.to(torch.float8_e4m3fn), "f8_e5m2": floats.to(torch.float8_e5m2),
        "f8_e4m3fnuz": floats.to(torch.float8_e4m3fnuz), "f8_e5m2fnuz": floats.to(torch.float8_e5m2fnuz),
        "scalar": torch.tensor(2.5), "scalar_i64": torch.tensor(7), "empty": torch.zeros(0), "empty_2d": torch.zeros(3, 0, 2),
        "empty_bf16": torch.zeros(0, 4, dtype=torch.bfloat16), "big": torch.randn(64, 33, generator=generator),
        "a.b/ünï": torch.ones(2), "z_last": torch.zeros(1, 1, 1, 1),
    }
    if hasattr(torch, "float8_e8m0fnu"):
        tensors["f8_e8m0"] = torch.tensor([0.25, 1.0, 8.0]).to(torch.float8_e8m0fnu)
    return tensors


def _stream(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> StreamPlan:
    plan = StreamPlan(specs_of(tensors), metadata)
    write_stream(path, plan, (tensors[name] for name in plan.order))
    return plan


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_the_file_is_save_files_byte_for_byte(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    _stream(tmp_path / "streamed.safetensors", tensors, metadata)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


@pytest.mark.parametrize("name", list(_tensors()))
def test_each_dtype_and_shape_alone_is_save_files_byte_for_byte(tmp_path: Path, name: str) -> None:
    tensor = _tensors()[name]
    save_file({name: tensor}, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    _stream(tmp_path / "streamed.safetensors", {name: tensor}, {"format": "pt"})
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_views_conjugates_and_more_metadata_read_back_tensor_for_tensor(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    tensors = {"transposed": base.t(), "strided": base[::2, 1::3], "conj": torch.randn(3, dtype=torch.complex64).conj(),
               "neg": torch.randn(3, dtype=torch.complex64).conj().imag, "grad": torch.ones(3, requires_grad=True) * 2}
    metadata = {"format": "pt", "b": "two", "a": "é one"}  # more than one entry: safetensors orders them arbitrarily
    plan = _stream(tmp_path / "s.safetensors", tensors, metadata)
    loaded = load_file(tmp_path / "s.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k].detach().resolve_conj().resolve_neg()) for k in tensors)
    with safe_open(tmp_path / "s.safetensors", "pt") as file:
        assert file.metadata() == metadata
    data = (tmp_path / "s.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    assert size % 8 == 0 and plan.header == data[: 8 + size] and len(data) == 8 + size + plan.data_size


def test_a_tensor_that_differs_from_its_spec_fails_and_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"old": torch.ones(1)}, path)
    plan = StreamPlan([TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (3,))], {"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'b' is \(4,\) torch.float32; the header says \(3,\)"):
        write_stream(path, plan, iter([torch.ones(2), torch.ones(4)]))
    with pytest.raises(ValueError, match="tensor 'b' never came"):
        write_stream(path, plan, iter([torch.ones(2)]))
    with pytest.raises(ValueError, match=r"tensor 'a' is \(2,\) torch.float64"):
        write_stream(path, plan, iter([torch.ones(2, dtype=torch.float64), torch.ones(3)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temp file left
    assert list(load_file(path)) == ["old"]


def test_bad_plans_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"tensor 'z': dtype torch.complex128 cannot be stored"):
        StreamPlan([TensorSpec("ok", torch.float32, (1,)), TensorSpec("z", torch.complex128, (2,))])
    with pytest.raises(ValueError, match=r"unique; repeated: \['a'\]"):
        StreamPlan([TensorSpec("a", torch.float32, (1,)), TensorSpec("a", torch.float32, (1,))])
    with pytest.raises(ValueError, match="reserved"):
        StreamPlan([TensorSpec("__metadata__", torch.float32, (1,))])
    with pytest.raises(TypeError, match="string -> string"):
        StreamPlan([TensorSpec("a", torch.float32, (1,))], {"format": 1})  # type: ignore[dict-item]
