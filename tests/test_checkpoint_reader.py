"""Strict, bounded reading: a header larger than the limit is refused from its length field alone,
before anything parses it; truncated headers; strict JSON (no NaN/Infinity, no repeated keys) in the
metadata entries."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import save_file

import torchcallbacks as tc
from torchcallbacks.checkpoint import read_file, reader
from torchcallbacks.checkpoint.files import ALIASES_KEY

ROOT = Path(__file__).resolve().parent.parent


def _header_file(path: Path, entries: int) -> int:
    """A well-formed safetensors file with `entries` one-float tensors: a long, valid header (about
    100 bytes per entry). Returns the header length."""
    header = {
        f"@optimizer/0/state/{i}/exp_avg_sq": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(entries)
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.write(b"\x00" * (4 * entries))
    return len(encoded)


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A valid safetensors file whose header (~20 MiB) is over the limit."""
    path = tmp_path_factory.mktemp("huge") / "huge.safetensors"
    return path, _header_file(path, 220_000)


def test_the_limit_is_documented() -> None:
    assert reader.MAX_HEADER_BYTES == 16 * 1024 * 1024
    assert "MAX_HEADER_BYTES" in (reader.__doc__ or "") and "16 MiB" in Path(reader.__file__).read_text()


def test_a_header_over_the_limit_is_refused_before_it_is_read(huge: tuple[Path, int]) -> None:
    path, size = huge
    assert size > reader.MAX_HEADER_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(tc.CheckpointError) as info:
            tc.load_weights(make_model(), path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "huge.safetensors" in message and f"{size} bytes" in message and f"limit of {reader.MAX_HEADER_BYTES}" in message
    assert peak < 1024 * 1024, peak  # nothing of the header was read into Python objects


def test_a_foreign_file_announcing_a_huge_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2**62))
        f.truncate(8 + 2**30)  # sparse: claims more than it holds, and far more than the limit
    with pytest.raises(tc.CheckpointError, match=rf"sparse\.safetensors.*says {2**62} bytes, more than the limit"):
        read_file(path)


def _refused_and_grown(reader_name: str, path: Path, message: str) -> tuple[bool, int]:
    """In a fresh interpreter, `torchcallbacks.checkpoint.<reader_name>(path)`: whether it was refused
    with a CheckpointError saying `message`, and how many bytes its peak resident memory grew by
    (tracemalloc does not see safetensors' Rust allocations)."""
    code = (
        "import resource, sys\n"
        "import torchcallbacks as tc\n"
        f"from torchcallbacks.checkpoint import {reader_name} as read\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    read(sys.argv[1])\n"
        "except tc.CheckpointError as exc:\n"
        f"    refused = {message!r} in str(exc)\n"
        "else:\n"
        "    refused = False\n"
        "print(refused, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    refused, grown_kib = out.stdout.split()
    return refused == "True", int(grown_kib) * 1024  # ru_maxrss is in KiB on Linux


def test_refusing_a_huge_header_costs_no_memory(huge: tuple[Path, int]) -> None:
    """tracemalloc does not see safetensors' (Rust) allocations, so this measures the process's peak
    resident memory around read_file in a fresh interpreter: parsing this header would cost far more
    than the header's own size; refusing it must cost next to nothing."""
    path, size = huge
    refused, grown = _refused_and_grown("read_file", path, "limit of")
    assert refused
    assert grown < size / 4, (grown, size)


def test_a_header_at_the_limit_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "many.safetensors"
    size = _header_file(path, 1000)
    monkeypatch.setattr(reader, "MAX_HEADER_BYTES", size)
    tensors, _ = read_file(path)
    assert len(tensors) == 1000
    monkeypatch.setattr(reader, "MAX_HEADER_BYTES", size - 1)
    with pytest.raises(tc.CheckpointError, match=f"says {size} bytes, more than the limit of {size - 1}"):
        read_file(path)


@pytest.mark.parametrize("keep", [0, 5, 8, 40])
def test_a_truncated_header_is_refused(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "cut.safetensors"
    tc.save_weights(make_model(), path)
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:keep])
    if keep < 8:
        expected = rf"cut\.safetensors.*has {keep} bytes, fewer than the 8 of the header length field"
    else:
        expected = rf"cut\.safetensors.*truncated header \(its header length field says {header_size} bytes, only {keep - 8} follow\)"
    with pytest.raises(tc.CheckpointError, match=expected):
        read_file(path)


def _with_aliases(path: Path, aliases: str) -> Path:
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": "pt", ALIASES_KEY: aliases})
    return path


@pytest.mark.parametrize(
    ("aliases", "expected"),
    [
        ('{"v": "w", "v": "w"}', r"duplicate key 'v'"),
        ('{"v": "w", "x": NaN}', r"NaN is not allowed"),
        ('{"v": Infinity}', r"Infinity is not allowed"),
        ('{"v": [-Infinity]}', r"-Infinity is not allowed"),
        ('{"v": 1e999}', r"the number 1e999 does not fit a float"),
        ('{"v": "w"', r"not valid JSON"),
    ],
)
def test_the_aliases_entry_must_be_strict_json(tmp_path: Path, aliases: str, expected: str) -> None:
    path = _with_aliases(tmp_path / "a.safetensors", aliases)
    with pytest.raises(tc.CheckpointError, match=rf"a\.safetensors': metadata 'torchcallbacks\.aliases': {expected}"):
        read_file(path)


def test_the_aliases_entry_must_map_names_to_names(tmp_path: Path) -> None:
    for aliases in ('["w"]', '{"v": 1}'):
        path = _with_aliases(tmp_path / "a.safetensors", aliases)
        with pytest.raises(tc.CheckpointError, match=r"'torchcallbacks\.aliases' is not a JSON object of tensor names"):
            read_file(path)
    tensors, _ = read_file(_with_aliases(tmp_path / "ok.safetensors", '{"v": "w"}'))
    assert tensors["v"] is tensors["w"]


def test_loads_strict() -> None:
    assert reader.loads_strict('{"a": [1, 2.5, -3e2, {"b": null}], "c": "NaN"}', "doc") == {
        "a": [1, 2.5, -300.0, {"b": None}],
        "c": "NaN",  # a string, not a token
    }
    with pytest.raises(tc.CheckpointError, match=r"^state: duplicate key 'k' in a JSON object$"):
        reader.loads_strict('{"outer": {"k": 1, "k": 2}}', "state")
    with pytest.raises(ValueError, match=r"^state: NaN is not allowed"):
        reader.loads_strict('{"best": NaN}', "state")
    with pytest.raises(tc.CheckpointError, match=r"^state: not valid JSON"):
        reader.loads_strict("[" * 100_000, "state")  # too deep for the parser
    with pytest.raises(tc.CheckpointError, match=r"^state: not valid JSON"):
        reader.loads_strict("1" * 5000, "state")  # more digits than int() takes


def test_json_of_more_containers_than_a_state_holds_is_refused_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty object or array is 2 bytes of JSON and some 60 once parsed: a header of them would
    cost 30 times its size, so they are counted in the text (outside strings) first."""
    limit = reader.MAX_JSON_CONTAINERS
    assert limit == 1_000_000
    many = "[" + ",".join(["{}"] * (limit // 2) + ["[]"] * (limit // 2 + 1)) + "]"

    def no_parse(*args: object, **kwargs: object) -> object:
        raise AssertionError("parsed")

    monkeypatch.setattr(reader.json, "loads", no_parse)
    with pytest.raises(tc.CheckpointError, match=rf"^doc: JSON with {limit + 2} objects and arrays, more than the {limit}"):
        reader.loads_strict(many, "doc")
    monkeypatch.undo()
    brackets = json.dumps({"text": "[{" * limit})  # brackets inside a string are not containers
    assert reader.loads_strict(brackets, "doc") == {"text": "[{" * limit}
    assert len(reader.loads_strict("[" + ",".join(["{}"] * (limit - 1)) + "]", "doc")) == limit - 1


@pytest.mark.slow  # a fresh interpreter, to read its peak memory
def test_a_training_state_of_millions_of_empty_containers_costs_no_memory(tmp_path: Path) -> None:
    """A 14 MB state document of 3.5 million empty objects (under the header limit) took 512 MB and
    8 s to parse: it is refused from its text, costing little more than the text itself."""
    from torchcallbacks.checkpoint.files import KIND_KEY, STATE_KEY, TRAINING_STATE

    path = tmp_path / "many.safetensors"
    text = json.dumps({"format_version": 3, "epoch": 0, "batch": 0, "global_step": 0, "extra": [{}] * 3_500_000})
    save_file({"model/w": torch.zeros(1)}, str(path), metadata={STATE_KEY: text, KIND_KEY: TRAINING_STATE})
    refused, grown = _refused_and_grown("read_training_state", path, "objects and arrays, more than")
    assert refused
    assert grown < 6 * len(text), (grown, len(text))  # the text and safetensors' copies of it


def test_decode_in_place_gives_what_a_copy_gives_and_reuses_the_containers() -> None:
    from torchcallbacks.checkpoint.encoding import decode, encode

    tensors: dict[str, torch.Tensor] = {}
    data = json.loads(json.dumps(encode({"a": [1, (2, 3), {"w": torch.ones(2)}], "f": float("inf")}, "s", tensors)))
    copied = decode(json.loads(json.dumps(data)), tensors)
    decoded = decode(data, tensors, in_place=True)
    assert decoded is data and decoded["a"] is data["a"]
    assert decoded["a"][:2] == copied["a"][:2] == [1, (2, 3)] and decoded["f"] == copied["f"] == float("inf")
    assert decoded["a"][2]["w"] is copied["a"][2]["w"] is tensors["s/a/2/w"]
