"""Full weights of FSDP2 models under real torchrun (gloo, CPU): `save_weights`, `load_weights`,
`export_full_weights`, `ModelCheckpoint(save_weights_only=True)` and `TensorBoard` histograms.

Two launches of fsdp_weights_worker.py, shared by module-scoped fixtures, each with a timeout (a
process left waiting in a collective fails the test instead of hanging CI). The worker writes the
state it gathered by hand next to what the library wrote; the tests read the library's files with
safetensors' own reader, TensorBoard's own reader and transformers' `from_pretrained`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TIMEOUT = 150
SMALL = 600  # the worker's small max_shard_size

pytestmark = pytest.mark.slow


def torchrun(workdir: Path, mode: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "fsdp_weights_worker.py"), str(workdir), mode]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("fsdp_weights")
    torchrun(workdir, "weights")
    return workdir


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("fsdp_hf")
    torchrun(workdir, "hf")
    return workdir


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different


def _plain() -> torch.nn.Module:
    sys.path.insert(0, str(HERE))
    try:
        from fsdp_weights_worker import Net
    finally:
        sys.path.remove(str(HERE))
    return Net()


def _merged(directory: Path, index_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    index = json.loads((directory / index_name).read_text())
    merged: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        part = load_file(directory / name)
        assert all(index["weight_map"][k] == name for k in part)
        assert not set(part) & set(merged)
        merged.update(part)
    return merged, index


def test_save_weights_of_a_sharded_model_writes_the_full_state_under_plain_keys(run: Path) -> None:
    expected = load_file(run / "expected.safetensors")
    assert expected["body.0.weight"].shape == (33, 16) and "scale" in expected
    _same(load_file(run / "w" / "one.safetensors"), expected)
    with safe_open(run / "w" / "one.safetensors", "pt") as file:
        assert file.metadata()["format"] == "pt" and file.metadata()["torchcallbacks.kind"] == "weights"
    _same(load_file(run / "export" / "model.safetensors"), expected)
    assert sorted(os.listdir(run / "export")) == ["model.safetensors"]
    # an unsharded model loads it
    import torchcallbacks as tc

    plain = _plain()
    tc.load_weights(plain, run / "w" / "one.safetensors")
    _same(dict(plain.state_dict()), expected)


def test_above_max_shard_size_split_files_and_an_index_in_hugging_faces_layout(run: Path) -> None:
    import torchcallbacks as tc

    expected = load_file(run / "expected.safetensors")
    export, index = _merged(run / "export_small", "model.safetensors.index.json")
    names = sorted(os.listdir(run / "export_small"))
    count = len(names) - 1
    assert count >= 3 and names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)] + [
        "model.safetensors.index.json"]
    _same(export, expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for name in names[:-1]:  # at most SMALL bytes of tensors in a file, unless one tensor is larger
        part = load_file(run / "export_small" / name)
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= SMALL
    saved, _ = _merged(run / "w", "split.safetensors.index.json")
    _same(saved, expected)
    assert sorted(os.listdir(run / "w")) == ["one.safetensors"] + [
        f"split-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)] + ["split.safetensors.index.json"]
    for source in (run / "export_small", run / "export_small" / "model.safetensors.index.json", run / "w" / "split.safetensors"):
        plain = _plain()
        tc.load_weights(plain, source)
        _same(dict(plain.state_dict()), expected)


def test_the_saves_hold_one_gathered_tensor_at_a_time(run: Path) -> None:
    for rank in range(2):
        gathered = json.loads((run / f"report_{rank}.json").read_text())["gathered"]
        assert gathered["total"] == 4 * 5  # 4 saves of 5 parameters (the buffer is not sharded)
        assert gathered["peak"] == 1 and gathered["alive"] == 0  # not the model, not a file's worth


def test_load_weights_into_a_sharded_model_gives_each_process_its_shard_of_the_file(run: Path) -> None:
    expected = load_file(run / "expected.safetensors")
    for name in ("split", "export", "one"):  # loaded into models with other initial weights, then gathered
        _same(load_file(run / f"loaded_{name}.safetensors"), expected)


def test_a_bad_max_shard_size_is_refused_naming_the_argument(run: Path) -> None:
    for rank in range(2):
        report = json.loads((run / f"report_{rank}.json").read_text())
        assert report["bad_max_shard_size"].startswith("max_shard_size: expected None or a positive integer")
    assert not (run / "w" / "bad.safetensors").exists()


def test_a_save_rank_0_cannot_write_fails_on_every_process_instead_of_hanging(run: Path) -> None:
    for rank in range(2):
        report = json.loads((run / f"report_{rank}.json").read_text())
        assert report["unwritable"].startswith("writing the weights") and "process 0:" in report["unwritable"]


def _model_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("grad/")}


def test_model_checkpoint_weights_only_of_a_sharded_model_keeps_max_to_keep_and_the_best(run: Path) -> None:
    reports = [json.loads((run / f"report_{rank}.json").read_text()) for rank in range(2)]
    assert all(reports[0][k] == reports[1][k] for k in ("loss", "every", "best", "first"))  # the same decisions
    report = reports[0]
    losses = report["loss"]
    assert len(losses) == 4 and losses == sorted(losses, reverse=True)
    ckpt = run / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["best-03.safetensors", "best-04.safetensors", "every-03.safetensors",
                                        "every-04.safetensors", "first-01.safetensors"]
    for name in ("every", "best"):
        assert report[name]["best_path"] == report[name]["last_path"] == str(ckpt / f"{name}-04.safetensors")
        assert [p for p, _ in report[name]["kept"]] == [str(ckpt / f"{name}-03.safetensors"), str(ckpt / f"{name}-04.safetensors")]
    assert report["first"]["best_path"] == report["first"]["last_path"] == str(ckpt / "first-01.safetensors")
    for epoch, names in ((0, ["first-01"]), (2, ["every-03", "best-03"]), (3, ["every-04", "best-04"])):
        state = _model_part(load_file(run / f"epoch_{epoch}.safetensors"))
        for name in names:
            _same(load_file(ckpt / f"{name}.safetensors"), state)


def _histograms(run: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run / "tb" / "train"), size_guidance={"histograms": 0, "images": 0, "tensors": 0}).Reload()


def test_tensorboard_histograms_of_a_sharded_model_are_of_the_full_parameters(run: Path) -> None:
    train = _histograms(run)
    names = [n for n, _ in _plain().named_parameters()]
    assert sorted(train.Tags()["histograms"]) == sorted([f"{n}/histogram" for n in names] + [f"{n}/gradient" for n in names])
    for name in names:
        for tag, key in ((f"{name}/histogram", name), (f"{name}/gradient", f"grad/{name}")):
            events = train.Histograms(tag)
            assert [e.step for e in events] == [0, 1, 2, 3]
            for event in events:
                full = load_file(run / f"epoch_{event.step}.safetensors")[key].numpy().astype(float)
                histogram = event.histogram_value
                assert histogram.num == full.size  # the whole tensor, not a shard
                assert (histogram.min, histogram.max) == (full.min(), full.max())
                assert histogram.sum == float(full.sum())  # computed as TensorBoard's writer does (float64 numpy)
                assert histogram.sum_squares == float(np.dot(full.ravel(), full.ravel()))
    from torchcallbacks.callbacks.tensorboard import _weight_image

    last = load_file(run / "epoch_3.safetensors")
    drawn = {f"{n}/image" for n in names if _weight_image(last[n]) is not None}  # a 1-element bias is not drawn
    assert set(train.Tags()["images"]) == drawn and len(drawn) == len(names) - 1
    assert train.Images("body.0.weight/image")[-1].width == 33  # drawn from the full (33, 16) matrix, lying down
    # the projector's embedding: the full (5, 3) weight of each epoch
    for epoch in range(4):
        rows = (run / "tb" / "train" / f"{epoch:05d}" / "emb" / "tensors.tsv").read_text().splitlines()
        values = torch.tensor([[float(v) for v in row.split("\t")] for row in rows])
        assert torch.allclose(values, load_file(run / f"epoch_{epoch}.safetensors")["emb.weight"])
    reports = [json.loads((run / f"report_{rank}.json").read_text()) for rank in range(2)]
    assert [len(r["warnings"]) for r in reports] == [1, 0] and "write_graph is skipped" in reports[0]["warnings"][0]


def test_an_export_of_a_sharded_hugging_face_model_loads_with_from_pretrained(hf_run: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import torchcallbacks as tc

    expected = load_file(hf_run / "hf_expected.safetensors")
    assert "lm_head.weight" in expected and "transformer.wte.weight" in expected  # tied: both names written
    merged, index = _merged(hf_run / "hf", "model.safetensors.index.json")
    _same(merged, expected)
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_run / "hf")
    _same(dict(model.state_dict()), expected)
    plain = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(hf_run / "hf"))
    tc.load_weights(plain, hf_run / "hf")
    _same(dict(plain.state_dict()), expected)
