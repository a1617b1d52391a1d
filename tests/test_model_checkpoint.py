"""ModelCheckpoint: Keras' arguments and messages, safetensors files, max_to_keep, best/last paths,
state_dict, and the bad inputs (template, missing keys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_model, make_regression
from safetensors import safe_open
from safetensors.torch import load_file

import torchcallbacks as tc
from torchcallbacks.checkpoint.files import STATE_KEY


class Feed(tc.Callback):
    """Overrides the epoch's `val_loss` with a scripted sequence."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs["val_loss"] = self.values[epoch]


def _fit(callbacks: list[tc.Callback], epochs: int = 3, model: torch.nn.Module | None = None) -> torch.nn.Module:
    model = model or make_model()
    tc.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
           loss=torch.nn.functional.mse_loss, epochs=epochs, verbose=0, callbacks=callbacks)
    return model


def test_epoch_files_from_the_template(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "sub" / "m-{epoch:02d}-{loss:.3f}.safetensors"), save_weights_only=True)
    model = _fit([ckpt])
    names = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert [n[:4] for n in names] == ["m-01", "m-02", "m-03"]
    assert ckpt.last_path is not None and ckpt.last_path.endswith(names[-1])
    last = load_file(ckpt.last_path)
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())


def test_full_state_is_the_default(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "m.safetensors"), monitor="loss")
    model = _fit([ckpt], epochs=2)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        document = json.loads(f.metadata()[STATE_KEY])
    assert (document["epoch"], document["batch"], document["global_step"]) == (2, 0, 8)
    assert document["callbacks"][ckpt.state_key]["last_path"] == str(tmp_path / "m.safetensors")
    other = make_model()
    tc.load_weights(other, tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))


def test_save_best_only_messages_and_best_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "b-{epoch}.safetensors"), save_best_only=True, verbose=1,
                              save_weights_only=True)
    _fit([Feed([0.5, 0.7, 0.3, 0.3]), ckpt], epochs=4)
    out = capsys.readouterr().out
    assert "Epoch 1: val_loss improved from inf to 0.50000, saving model to" in out
    assert "Epoch 2: val_loss did not improve from 0.50000" in out
    assert "Epoch 3: val_loss improved from 0.50000 to 0.30000" in out
    assert "Epoch 4: val_loss did not improve from 0.30000" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-1.safetensors", "b-3.safetensors"]
    assert ckpt.best == 0.3 and ckpt.best_path == str(tmp_path / "b-3.safetensors")


def test_initial_value_threshold_and_mode(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "b-{epoch}.safetensors"), save_best_only=True, mode="max",
                              initial_value_threshold=0.6, save_weights_only=True)
    _fit([Feed([0.5, 0.7, 0.65]), ckpt])
    assert [p.name for p in tmp_path.iterdir()] == ["b-2.safetensors"]


def test_max_to_keep_keeps_the_best_when_monitoring(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "b-{epoch}.safetensors"), save_best_only=True, max_to_keep=2,
                              save_weights_only=True)
    _fit([Feed([0.9, 0.8, 0.7, 0.6, 0.5]), ckpt], epochs=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-4.safetensors", "b-5.safetensors"]
    assert [Path(p).name for p, _ in ckpt.state_dict()["kept"]] == ["b-4.safetensors", "b-5.safetensors"]


def test_max_to_keep_keeps_the_newest_otherwise(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "e-{epoch}.safetensors"), max_to_keep=2, save_weights_only=True)
    _fit([Feed([0.1, 0.9, 0.8, 0.95]), ckpt], epochs=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e-3.safetensors", "e-4.safetensors"]
    assert ckpt.best == 0.1 and ckpt.best_path is None  # the best file was deleted


def test_int_save_freq_counts_across_epochs_and_names_batches(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "s-{epoch}-{batch}.safetensors"), save_freq=3, save_weights_only=True)
    _fit([ckpt])  # 4 batches per epoch, 12 in all: saves at global steps 3, 6, 9, 12
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["s-1-3.safetensors", "s-2-2.safetensors", "s-3-1.safetensors", "s-3-4.safetensors"]
    )


def test_int_save_freq_with_save_best_only_and_a_batch_monitor(tmp_path: Path) -> None:
    # Keras crashes here (TypeError): its comparison is set up only at epoch end.
    ckpt = tc.ModelCheckpoint(str(tmp_path / "s-{batch}.safetensors"), monitor="loss", save_freq=1,
                              save_best_only=True, save_weights_only=True)
    _fit([ckpt], epochs=1)
    assert ckpt.best is not None and ckpt.best_path is not None and Path(ckpt.best_path).exists()


def test_missing_monitor_warns_and_saves(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "m.safetensors"), save_best_only=True, save_weights_only=True)
    with pytest.warns(UserWarning, match="'val_loss' is not in the logs; available keys: loss"):
        _fit([ckpt], epochs=1)
    assert (tmp_path / "m.safetensors").exists()


def test_state_dict_round_trip(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "b-{epoch}.safetensors"), save_best_only=True, max_to_keep=1,
                              save_weights_only=True)
    _fit([Feed([0.5, 0.4, 0.6]), ckpt])
    again = tc.ModelCheckpoint(str(tmp_path / "b-{epoch}.safetensors"), save_best_only=True, max_to_keep=1,
                               save_weights_only=True)
    again.load_state_dict(json.loads(json.dumps(ckpt.state_dict())))
    assert again.state_dict() == ckpt.state_dict()
    assert again.best == 0.4


def test_async_save_writes_the_same_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _fit([tc.ModelCheckpoint(str(tmp_path / "s" / "{epoch}.safetensors"), save_weights_only=True)])
    torch.manual_seed(0)
    _fit([tc.ModelCheckpoint(str(tmp_path / "a" / "{epoch}.safetensors"), save_weights_only=True, async_save=True)])
    for epoch in (1, 2, 3):
        a, b = load_file(tmp_path / "s" / f"{epoch}.safetensors"), load_file(tmp_path / "a" / f"{epoch}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("filepath", "message"),
    [
        ("m-{val_loss:.3q}.safetensors", "not a valid template"),
        ("m-{epoch:02z}.safetensors", "not a valid template"),
        ("m-{}.safetensors", "positional field"),
        ("m-{epoch.safetensors", "not a valid template"),
        ("m-{batch}.safetensors", "only for batch-level saves"),
        ("m.pt", "must end with '.safetensors'"),
    ],
)
def test_bad_filepath_fails_at_construction(filepath: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tc.ModelCheckpoint(filepath)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="save_freq"):
        tc.ModelCheckpoint("m.safetensors", save_freq=False)
    with pytest.raises(ValueError, match="max_to_keep"):
        tc.ModelCheckpoint("m.safetensors", max_to_keep=0)


def test_missing_key_fails_at_first_save_listing_available_keys(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "m-{val_acc:.2f}.safetensors"))
    with pytest.raises(KeyError, match=r"\{val_acc\}, which is not in the logs; available keys: epoch, loss"):
        _fit([ckpt], epochs=1)


@pytest.mark.parametrize("save_freq", [False, True, 0, -1, "batch", 2.0, None])
def test_bad_save_freq_message_begins_as_keras(save_freq: object) -> None:
    with pytest.raises(ValueError, match=r"^Unrecognized save_freq: "):
        tc.ModelCheckpoint("m.safetensors", save_freq=save_freq)


def test_unwritable_directory_fails_at_train_begin(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint directory should be")
    epochs: list[int] = []
    ckpt = tc.ModelCheckpoint(str(blocker / "ckpt" / "m-{epoch}.safetensors"))
    with pytest.raises(OSError, match=r"ModelCheckpoint: filepath: cannot write to the directory '.*not_a_dir/ckpt'"):
        _fit([tc.LambdaCallback(on_epoch_end=lambda epoch, logs: epochs.append(epoch)), ckpt])
    assert epochs == []  # before the first epoch, not after it


def test_directory_is_created_and_probed_at_train_begin(tmp_path: Path) -> None:
    ckpt = tc.ModelCheckpoint(str(tmp_path / "a" / "run-{epoch}" / "m.safetensors"))
    ckpt.set_model(make_model())
    ckpt.on_train_begin()
    assert (tmp_path / "a").is_dir() and list((tmp_path / "a").iterdir()) == []  # the probe file is gone


def test_max_shard_size_splits_weights_into_hugging_face_files_and_rotates_them(tmp_path: Path) -> None:
    model = make_model()
    checkpoint = tc.ModelCheckpoint(tmp_path / "model-{epoch}.safetensors", monitor="loss", save_weights_only=True,
                                    max_to_keep=1, max_shard_size=64)
    tc.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
           loss=torch.nn.functional.mse_loss, epochs=2, verbose=0, callbacks=[checkpoint])
    index = json.loads((tmp_path / "model-2.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-2-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, "model-2.safetensors.index.json"])  # epoch 1's went
    stored = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    fresh = make_model()
    tc.load_weights(fresh, checkpoint.last_path)  # the index beside the path is read
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="ModelCheckpoint: max_shard_size: expected None or a positive integer"):
        tc.ModelCheckpoint(tmp_path / "m.safetensors", save_weights_only=True, max_shard_size=0)
    with pytest.raises(ValueError, match="max_shard_size applies to weights files"):
        tc.ModelCheckpoint(tmp_path / "m.safetensors", max_shard_size=1000)


def test_a_per_epoch_checkpoint_has_no_batch_hook_and_a_per_batch_one_has(tmp_path: Path) -> None:
    per_epoch = tc.ModelCheckpoint(tmp_path / "epoch-{epoch}.safetensors")
    per_batch = tc.ModelCheckpoint(tmp_path / "batch-{epoch}-{batch}.safetensors", save_freq=2)
    for checkpoint, expected in ((per_epoch, False), (per_batch, True)):
        callbacks = tc.CallbackList([checkpoint], model=make_model())
        callbacks.on_train_begin()
        callbacks.on_epoch_begin(0)
        assert callbacks.has_hook("on_train_batch_end") is expected  # fit builds batch logs only for the second
