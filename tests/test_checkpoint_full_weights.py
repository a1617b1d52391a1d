"""Split weights files (`checkpoint/full_weights.py`) in one process: `save_weights(max_shard_size=...)`,
reading an index, an export directory or `X.safetensors`' index with `load_weights`, the tied-weights
rule, stale files, and bad input. The FSDP2 side is in tests/distributed/test_fsdp_weights.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchcallbacks as tc
from torchcallbacks.checkpoint import CheckpointError
from torchcallbacks.checkpoint.sharded import export_full_weights


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_above_max_shard_size_the_weights_are_split_with_an_index(tmp_path: Path) -> None:
    model = _model()
    tc.save_weights(model, tmp_path / "w.safetensors", max_shard_size=280)  # 0.weight (512 B) alone, 0.bias (64 B), then 272 B
    names = sorted(os.listdir(tmp_path))
    assert names == ["w-00001-of-00003.safetensors", "w-00002-of-00003.safetensors", "w-00003-of-00003.safetensors",
                     "w.safetensors.index.json"]
    index = json.loads((tmp_path / "w.safetensors.index.json").read_text())
    assert index["weight_map"] == {"0.weight": "w-00001-of-00003.safetensors", "0.bias": "w-00002-of-00003.safetensors",
                                   "2.weight": "w-00003-of-00003.safetensors", "2.bias": "w-00003-of-00003.safetensors"}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    merged = {k: v for n in names[:-1] for k, v in load_file(tmp_path / n).items()}
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items()) and len(merged) == 4
    for source in ("w.safetensors", "w.safetensors.index.json"):
        other = _model(1)
        tc.load_weights(other, tmp_path / source)
        assert _same(model, other)


def test_weights_that_fit_are_one_file_and_stale_files_of_the_other_layout_go(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "w.safetensors"
    tc.save_weights(model, path, max_shard_size=280)
    tc.save_weights(model, path, max_shard_size=10**6)  # fits: one file, the split ones removed
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    assert load_file(path).keys() == model.state_dict().keys()
    tc.save_weights(model, path, max_shard_size=600)  # split again: the single file goes, after the index is written
    assert sorted(os.listdir(tmp_path)) == ["w-00001-of-00002.safetensors", "w-00002-of-00002.safetensors",
                                            "w.safetensors.index.json"]
    (tmp_path / "x-00001-of-00002.safetensors").write_bytes(b"another save's")
    tc.save_weights(model, tmp_path / "y.safetensors", max_shard_size=600, delete_after=[str(path)])
    assert sorted(os.listdir(tmp_path)) == ["x-00001-of-00002.safetensors", "y-00001-of-00002.safetensors",
                                            "y-00002-of-00002.safetensors", "y.safetensors.index.json"]


def test_tied_weights_are_stored_once_in_the_file_of_the_kept_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10), torch.nn.Linear(10, 3))
    model[1].weight = model[0].weight
    tc.save_weights(model, tmp_path / "t.safetensors", max_shard_size=100)
    index = json.loads((tmp_path / "t.safetensors.index.json").read_text())
    assert "1.weight" not in index["weight_map"]  # stored once, as in a single file
    kept = index["weight_map"]["0.weight"]
    tensors, metadata = tc.checkpoint.read_file(tmp_path / kept)
    assert json.loads(metadata["torchcallbacks.aliases"]) == {"1.weight": "0.weight"} and "1.weight" in tensors
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10), torch.nn.Linear(10, 3))
    tc.load_weights(other, tmp_path / "t.safetensors")
    assert _same(model, other)


def test_an_export_directory_is_hugging_faces_layout_and_loads(tmp_path: Path) -> None:
    model = _model()
    assert export_full_weights(model, tmp_path / "e") == ["model.safetensors"]
    names = export_full_weights(model, tmp_path / "e", max_shard_size=280)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    assert sorted(os.listdir(tmp_path / "e")) == sorted(names)
    other = _model(1)
    tc.load_weights(other, tmp_path / "e")
    assert _same(model, other)
    assert export_full_weights(model, tmp_path / "e") == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path / "e")) == ["model.safetensors"]


def test_without_max_shard_size_a_plain_model_is_written_as_before(tmp_path: Path) -> None:
    model = _model()
    writer = tc.checkpoint.CheckpointWriter(async_save=True)
    tc.save_weights(model, tmp_path / "a.safetensors", writer=writer)
    writer.close()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    assert load_file(tmp_path / "a.safetensors").keys() == model.state_dict().keys()


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "1GB"])
def test_a_bad_max_shard_size_is_refused_naming_the_argument(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match=r"max_shard_size: expected None or a positive integer \(bytes\), received"):
        tc.save_weights(_model(), tmp_path / "w.safetensors", max_shard_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_shard_size"):
        export_full_weights(_model(), tmp_path / "e", max_shard_size=bad)  # type: ignore[arg-type]
    assert not os.listdir(tmp_path)


def test_a_damaged_or_foreign_index_is_refused_naming_it(tmp_path: Path) -> None:
    model = _model()
    tc.save_weights(model, tmp_path / "w.safetensors", max_shard_size=280)
    index_path = tmp_path / "w.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (tmp_path / "w-00002-of-00003.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match=r"w.safetensors.index.json.*lacks: \['w-00002-of-00003.safetensors'\]"):
        tc.load_weights(_model(1), tmp_path / "w.safetensors")
    (tmp_path / "moved.safetensors").rename(tmp_path / "w-00002-of-00003.safetensors")
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], "0.bias": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"'weight_map/0.bias' names '../elsewhere.safetensors', not a file beside"):
        tc.load_weights(_model(1), index_path)
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], "0.bias": "w-00001-of-00003.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"puts tensors in 'w-00001-of-00003.safetensors' that it lacks: \['0.bias'\]"):
        tc.load_weights(_model(1), index_path)
    index_path.write_text('{"weight_map": NaN}')
    with pytest.raises(CheckpointError, match="NaN is not allowed"):
        tc.load_weights(_model(1), index_path)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        tc.load_weights(_model(1), tmp_path / "nothing.safetensors")
    other = torch.nn.Linear(3, 3)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not fit Linear"):
        tc.load_weights(other, tmp_path / "w.safetensors")
