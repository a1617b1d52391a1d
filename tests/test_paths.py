"""Paths that are URLs: `file://` is a local path; a URL of another scheme goes to fsspec for single
files (tests/test_remote_storage.py) and is refused, naming the argument, for what only the local
protocol writes (sharded states, split weights, `export_full_weights`), before anything is written
(instead of a local folder named `s3:`)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression
from safetensors.torch import load_file

import torchcallbacks as tc
from torchcallbacks.checks import check_local_path, check_path

URLS = ["s3://bucket/run/m.safetensors", "gs://bucket/m.safetensors", "memory://m.safetensors",
        "az://container/m.safetensors"]


@pytest.mark.parametrize("url", URLS)
def test_sharded_and_split_saves_to_a_url_are_refused_naming_the_argument_and_nothing_is_written(
        url: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    scheme = url.split(":", 1)[0]
    model = make_model()
    with pytest.raises(ValueError, match=rf"^export_full_weights: directory: '{url}' is a '{scheme}' URL; sharded remote "
                                         "states are not supported yet"):
        tc.export_full_weights(model, url)
    with pytest.raises(ValueError, match=r"^check: .*sharded remote states are not supported yet"):
        check_local_path(url, "check")
    assert os.listdir(tmp_path) == []  # no folder named "s3:" (or any other)


def test_split_weights_to_a_url_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^save_weights: filepath 'memory://w.safetensors' is a URL; split"):
        tc.save_weights(make_model(), "memory://w.safetensors", max_shard_size=64)
    with pytest.raises(ValueError, match=r"^ModelCheckpoint: filepath 'memory://c/w.safetensors' is a URL; split"):
        tc.ModelCheckpoint("memory://c/w.safetensors", save_weights_only=True, max_shard_size=64)


def test_check_path_keeps_urls_for_fsspec() -> None:
    for url in URLS:
        assert check_path(url, "x") == url
    assert check_path("file:///tmp/a", "x") == "/tmp/a"


def test_a_file_url_is_its_local_path(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = make_model()
    tc.save_weights(model, f"file://{tmp_path}/w.safetensors")
    assert torch.equal(load_file(tmp_path / "w.safetensors")["0.weight"], model.state_dict()["0.weight"])
    tc.load_weights(make_model(), f"file://{tmp_path}/w.safetensors")

    model = make_model()
    checkpoint = tc.ModelCheckpoint(f"file://{tmp_path}/ckpt/m-{{epoch}}.safetensors", save_weights_only=True)
    tc.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss=F.mse_loss,
           epochs=2, verbose=0, callbacks=[checkpoint, tc.BackupAndRestore(f"file://{tmp_path}/backup", delete_checkpoint=False)])
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["m-1.safetensors", "m-2.safetensors"]
    assert os.listdir(tmp_path / "backup")  # the backup kept there
    assert sorted(os.listdir(tmp_path)) == ["backup", "ckpt", "w.safetensors"]  # no folder "file:"


def test_check_local_path_keeps_plain_paths_and_refuses_what_is_not_a_path() -> None:
    assert check_local_path("ckpt/m.safetensors", "x") == "ckpt/m.safetensors"
    assert check_local_path("C:\\ckpt\\m.safetensors", "x") == "C:\\ckpt\\m.safetensors"  # a drive, not a scheme
    assert check_local_path("file:///tmp/a", "x") == "/tmp/a"
    with pytest.raises(TypeError, match=r"^x must be a str or path, received bytes"):
        check_local_path(b"ckpt", "x")  # type: ignore[arg-type]


def test_export_full_weights_is_importable_from_the_package_root() -> None:
    from torchcallbacks.checkpoint.sharded import export_full_weights

    assert tc.export_full_weights is export_full_weights
    assert "export_full_weights" in tc.__all__
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        tc.nope  # noqa: B018
