"""The training-state protocol: one owner (LoopState), the restore phase, stable keys, validation of
everything read from a file before anything is applied, and files of formats 1 and 2."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Crash, make_model, make_regression
from safetensors import safe_open
from safetensors.torch import save_file

import torchcallbacks as tc
from torchcallbacks.checkpoint import read_training_state, restore_rng_state, write_training_state
from torchcallbacks.checkpoint.files import FORMAT_VERSION, STATE_KEY

DATA = Path(__file__).resolve().parent / "data"


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _fit(callbacks: list[tc.Callback], seed: int = 0, epochs: int = 4) -> torch.nn.Module:
    model, optimizer = _setup(seed)
    tc.fit(model, make_regression(shuffle=True), optimizer=optimizer, loss=torch.nn.functional.mse_loss,
           epochs=epochs, verbose=0, callbacks=callbacks)
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# -- formats 1 and 2 ----------------------------------------------------------------------------------
def _draws(rng_state: Any) -> tuple[torch.Tensor, float, float]:
    """What the global generators draw next from a saved random state (of any format)."""
    restore_rng_state(rng_state)
    return torch.rand(4), float(np.random.rand()), random.random()


def _resume_from(backup_dir: Path) -> tuple[torch.nn.Module, tc.BackupAndRestore, tc.EarlyStopping]:
    backup = tc.BackupAndRestore(backup_dir, save_freq=3)
    stopper = tc.EarlyStopping(monitor="loss", patience=5)
    return _fit([stopper, backup], seed=7), backup, stopper


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_format_mid_epoch_backup_resumes_as_the_same_state_in_todays_format(tmp_path: Path, version: int) -> None:
    """tests/data/backup_format1.safetensors was written by torchcallbacks 0.1.0 (format 1, EarlyStopping's
    state keyed by position), backup_format2.safetensors by the format-2 writer (numpy's key and Python's
    words as JSON lists of ints): each a backup at global step 6 (epoch 1, batch 2) of the run `_fit` makes.

    Their weights were computed on another machine, whose floating point may differ in the last bits: so
    the run resumed from the old file is compared with a run resumed, here, from the same state re-saved
    in today's format, and what the file holds besides computed numbers (the position, the data position
    and the random states) with this machine's own backup of the same run at the same step."""
    fixture = DATA / f"backup_format{version}.safetensors"
    if version == 2:
        with safe_open(fixture, framework="pt") as f:
            document = json.loads(f.metadata()[STATE_KEY])
        assert document["format_version"] == 2 and len(document["loop"]["data"]["pass_rng"]["global"]["numpy"]["key"]) == 624
    old, new, fresh = tmp_path / "old", tmp_path / "new", tmp_path / "fresh"
    old.mkdir()
    shutil.copy(fixture, old / "latest.safetensors")
    write_training_state(new / "latest.safetensors", read_training_state(fixture))
    with safe_open(new / "latest.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()[STATE_KEY])["format_version"] == FORMAT_VERSION > version

    from_old, old_backup, old_stopper = _resume_from(old)
    from_new, new_backup, new_stopper = _resume_from(new)
    for backup in (old_backup, new_backup):
        assert backup.restored is not None and (backup.restored.epoch, backup.restored.batch) == (1, 2)
    assert _same(from_old, from_new)
    assert old_stopper.state_dict() == new_stopper.state_dict() and old_stopper.best_epoch >= 1

    # What the old file holds is this run at step 6: the same data position and random states as the
    # backup that this machine writes at that step (crash at step 7, before the next backup).
    with pytest.raises(RuntimeError, match="crash"):
        _fit([tc.EarlyStopping(monitor="loss", patience=5), tc.BackupAndRestore(fresh, save_freq=3), Crash(7)])
    saved, here = read_training_state(fixture), read_training_state(fresh / "latest.safetensors")
    assert [saved[k] for k in ("epoch", "batch", "global_step")] == [here[k] for k in ("epoch", "batch", "global_step")]
    for name in ("consumed", "epoch_batch"):
        assert saved["loop"]["data"][name] == here["loop"]["data"][name]
    for a, b in [(saved["rng"]["current"], here["rng"]["current"]),
                 (saved["loop"]["data"]["pass_rng"]["global"], here["loop"]["data"]["pass_rng"]["global"])]:
        (torch_a, numpy_a, python_a), (torch_b, numpy_b, python_b) = _draws(a), _draws(b)
        assert torch.equal(torch_a, torch_b) and numpy_a == numpy_b and python_a == python_b


# -- the restore phase and stable keys -----------------------------------------------------------------
def test_a_callback_inserted_in_front_keeps_the_others_states_and_the_gaps_are_named(tmp_path: Path) -> None:
    stopper = tc.EarlyStopping(monitor="loss", patience=10)
    with pytest.raises(RuntimeError):
        _fit([stopper, tc.BackupAndRestore(tmp_path), Crash(13)])
    saved_wait = stopper.wait
    inserted = tc.ReduceLROnPlateau(monitor="loss")
    resumed_stopper = tc.EarlyStopping(monitor="loss", patience=10)
    seen: dict[str, Any] = {}

    class Peek(tc.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            seen["wait"], seen["best"] = resumed_stopper.wait, resumed_stopper.best

    with pytest.warns(UserWarning, match=r"callbacks that get no saved state.*ReduceLROnPlateau\[monitor=loss\]"):
        _fit([inserted, Peek(), resumed_stopper, tc.BackupAndRestore(tmp_path)], seed=3)
    assert seen["wait"] == saved_wait - 0 and seen["best"] == stopper.best  # restored before any on_train_begin


def test_a_saved_state_nothing_takes_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _fit([tc.EarlyStopping(monitor="loss"), tc.BackupAndRestore(tmp_path), Crash(6)])
    with pytest.warns(UserWarning, match=r"saved states that no callback takes: EarlyStopping\[monitor=loss\]"):
        _fit([tc.BackupAndRestore(tmp_path)])


def test_state_key_is_overridable_and_repeats_are_numbered() -> None:
    first, second = tc.EarlyStopping(monitor="loss"), tc.EarlyStopping(monitor="loss")
    callbacks = tc.CallbackList([first, second])
    assert set(callbacks.state_dict()) == {"EarlyStopping[monitor=loss]", "EarlyStopping[monitor=loss]#2"}
    second.state_key = "late"
    assert set(callbacks.state_dict()) == {"EarlyStopping[monitor=loss]", "late"}
    with pytest.raises(TypeError, match="state_key"):
        second.state_key = ""


# -- nothing half-restored --------------------------------------------------------------------------
def _backup(tmp_path: Path, double: bool = False) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """A real mid-epoch backup (with ModelCheckpoint's state), and its tensors and metadata."""
    ckpt = tc.ModelCheckpoint(str(tmp_path / "ckpt" / "m-{epoch}.safetensors"), monitor="loss", max_to_keep=1)
    with pytest.raises(RuntimeError):
        _fit([ckpt, tc.BackupAndRestore(tmp_path / "b", save_freq=3, double_checkpoint=double), Crash(10)])
    path = tmp_path / "b" / "latest.safetensors"
    with safe_open(path, framework="pt") as f:
        return path, {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], edit: Any = None,
             text: str | None = None) -> None:
    document = json.loads(metadata[STATE_KEY])
    if edit is not None:
        edit(document, tensors)
    save_file(tensors, str(path), metadata={**metadata, STATE_KEY: text if text is not None else json.dumps(document)})


def _set(path: str, value: Any) -> Any:
    def edit(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        *parents, last = path.split("/")
        node = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


def _rng_tensor(size: int) -> Any:
    def edit(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        tensors[document["rng"]["current"]["torch"]["__tensor__"]] = torch.zeros(size, dtype=torch.uint8)
    return edit


def _words(field: str, value: torch.Tensor) -> Any:
    """Replace the word tensor of the random state at `rng/<field>` (or `<field>` under `loop/`)."""
    def edit(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        node: Any = document
        for key in (field if field.startswith("loop/") else f"rng/{field}").split("/"):
            node = node[key]
        tensors[node["__tensor__"]] = value
    return edit


def _kept_elsewhere(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """An edited backup listing a file outside the checkpoint directory: with max_to_keep=1 the next
    rotation would delete it."""
    key = next(k for k in document["callbacks"] if k.startswith("ModelCheckpoint"))
    document["callbacks"][key]["kept"] = [["/etc/passwd.safetensors", 1.0]]


def _kept_as(rename: Any) -> Any:
    """ModelCheckpoint's `kept` entry replaced by `rename(entry)` (an edited backup)."""
    def edit(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in document["callbacks"] if k.startswith("ModelCheckpoint"))
        kept = document["callbacks"][key]["kept"]
        kept[0][0] = rename(kept[0][0])
    return edit


def _exp_avg_shape(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    name = "@optimizers/0/state/0/exp_avg"
    tensors[name] = torch.zeros(3, 3)


def _state_tensor(name: str, make: Any) -> Any:
    """The stored tensor `name` replaced by `make(tensor)` (the same name in the document)."""
    def edit(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = make(tensors[name])
    return edit


def _listed_twice(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Parameter 0 listed twice in its group (and the last one's state left out): torch would give
    parameter 1 parameter 0's state."""
    optimizer = document["optimizers"][0]
    optimizer["param_groups"][0]["params"] = [0, 0, 1, 2]
    optimizer["state"]["__dict__"] = optimizer["state"]["__dict__"][:3]


#: Parameter 0's Adam state in the document (optimizer state is a `__dict__` list of [index, entries]).
_ADAM_0 = "optimizers/0/state/__dict__/0/1"

#: Damaged or edited optimizer states and model tensors that loaded without a word before (and crashed
#: at the first optimizer step, or trained from wrong values): each refused naming the field.
OPTIMIZER_HOSTILE = {
    "exp_avg of another dtype": (_state_tensor("@optimizers/0/state/0/exp_avg", lambda t: t.double()),
                                 r"'optimizers/0/state/0/exp_avg' has dtype torch.float64, its parameter torch.float32"),
    "exp_avg as int32 bytes": (_state_tensor("@optimizers/0/state/0/exp_avg", lambda t: t.view(torch.int32)),
                               r"'optimizers/0/state/0/exp_avg' has dtype torch.int32, its parameter torch.float32"),
    "step not a number": (_set(f"{_ADAM_0}/step", "x"), r"'optimizers/0/state/0/step' must be a number >= 0"),
    "step a vector": (_state_tensor("@optimizers/0/state/0/step", lambda t: torch.zeros(3)),
                      r"'optimizers/0/state/0/step' must be a number >= 0 .*shape \(3,\)"),
    "state entries a list": (_set(f"{_ADAM_0}", [1, 2]), r"'optimizers/0/state/0' must be a dict of the parameter's state"),
    "exp_avg names parameter 1's": (_set(f"{_ADAM_0}/exp_avg", {"__tensor__": "@optimizers/0/state/1/exp_avg"}),
                                    r"'optimizers/0/state/1/exp_avg' is the same tensor as 'optimizers/0/state/0/exp_avg'"),
    "exp_avg names a weight": (_set(f"{_ADAM_0}/exp_avg", {"__tensor__": "0.0.weight"}),
                               r"'optimizers/0/state/0/exp_avg' is the same tensor as 'model/0.0.weight'"),
    "lr a string": (_set("optimizers/0/param_groups/0/lr", "x"),
                    r"'optimizers/0/param_groups/0/lr' must be a finite number \(Adam reads it\), found 'x'"),
    "lr a bool": (_set("optimizers/0/param_groups/0/lr", True), r"'optimizers/0/param_groups/0/lr' must be a finite number"),
    "eps null": (_set("optimizers/0/param_groups/0/eps", None), r"'optimizers/0/param_groups/0/eps' must be a finite number"),
    "betas one number": (_set("optimizers/0/param_groups/0/betas", {"__tuple__": [0.9]}),
                         r"'optimizers/0/param_groups/0/betas' must be 2 finite numbers"),
    "betas strings": (_set("optimizers/0/param_groups/0/betas", {"__tuple__": ["a", "b"]}),
                      r"'optimizers/0/param_groups/0/betas' must be 2 finite numbers"),
    "amsgrad a string": (_set("optimizers/0/param_groups/0/amsgrad", "yes"),
                         r"'optimizers/0/param_groups/0/amsgrad' must be true or false"),
    "a parameter listed twice": (_listed_twice, r"'optimizers/0/param_groups/0/params' holds 0, listed twice"),
    "step negative": (_state_tensor("@optimizers/0/state/0/step", lambda t: -t), r"'optimizers/0/state/0/step' must be a number >= 0"),
    # refused before as well (kept: the same table, the same fallback)
    "state of a parameter index no group lists": (_set("optimizers/0/state/__dict__/0/0", 99),
                                                  r"has state for parameter 99, which no parameter group lists"),
    "weight as int32 bytes": (_state_tensor("0.0.weight", lambda t: t.view(torch.int32)),
                              r"dtypes differ for 0.0.weight: file torch.int32 vs model torch.float32"),
}

HOSTILE = {
    **OPTIMIZER_HOSTILE,
    "negative epoch": (_set("epoch", -1), r"'epoch' must be an integer >= 0"),
    "bool batch": (_set("batch", True), r"'batch' must be an integer >= 0"),
    "string global step": (_set("global_step", "7"), r"'global_step' must be an integer >= 0"),
    "short torch rng": (_rng_tensor(10), r"'rng/current/torch' must be a uint8 tensor of 5056 bytes"),
    "numpy key": (_set("rng/current/numpy/key", [1, 2, 3]), r"'rng/current/numpy/key' must be 624 integers in"),
    "numpy key tensor": (_words("current/numpy/key", torch.zeros(600, dtype=torch.int64)),
                         r"'rng/current/numpy/key' must be 624 integers in .*shape \(600,\)"),
    "numpy algorithm": (_set("rng/current/numpy/algorithm", "PCG64"), r"'rng/current/numpy' must be numpy's MT19937"),
    "python state": (_set("rng/current/python/internal", "x"), r"'rng/current/python/internal' must be 625 integers"),
    "python word range": (_words("current/python/internal", torch.full((625,), 2**40)),
                          r"'rng/current/python/internal' must hold integers in \[0, 2\*\*32\)"),
    "data position key": (_words("loop/data/rng/global/numpy/key", torch.full((624,), -3)),
                          r"'rng/global/numpy/key' must hold integers in \[0, 2\*\*32\), found values from -3"),
    "optimizer state shape": (_exp_avg_shape, r"optimizers/0 \(Adam\) state 'exp_avg' of parameter 0 has shape \(3, 3\)"),
    "optimizer type": (_set("optimizer_types/0", "torch.optim.sgd.SGD"), r"holds the state of a torch.optim.sgd.SGD"),
    "optimizer groups": (_set("optimizers/0/param_groups/0/params", [0, 1]), r"group 0 has 4 parameters, the file holds 2"),
    "kept file elsewhere": (
        _kept_elsewhere, r"callbacks/ModelCheckpoint.*names '/etc/passwd.safetensors', which is not a checkpoint file under"
    ),
    "kept file of another run": (  # under the checkpoint directory, but not a name the template gives
        _kept_as(lambda entry: os.path.join(os.path.dirname(entry), "other_run", "model.safetensors")),
        r"names '.*/ckpt/other_run/model.safetensors', which is not a checkpoint file under .* that filepath",
    ),
    "kept name beside the template": (
        _kept_as(lambda entry: os.path.join(os.path.dirname(entry), "model.safetensors")),
        r"names '.*/ckpt/model.safetensors', which is not a checkpoint file under",
    ),
    "metric sums": (_set("loop/metrics/means/loss", "lots"), r"'loop/metrics' does not fit"),
    "data position": (_set("loop/data/consumed", -2), r"'consumed' must be an integer >= 0"),
    "history": (_set("callbacks/History/epoch", 3), r"'callbacks/History' does not fit"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_value_is_refused_naming_file_and_field_and_changes_nothing(tmp_path: Path, case: str) -> None:
    path, tensors, metadata = _backup(tmp_path)
    edit, message = HOSTILE[case]
    _rewrite(path, tensors, metadata, edit)
    model, optimizer = _setup(5)
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    ckpt = tc.ModelCheckpoint(str(tmp_path / "ckpt" / "m-{epoch}.safetensors"), monitor="loss", max_to_keep=1)
    callbacks = tc.CallbackList([ckpt, tc.History(), tc.BackupAndRestore(tmp_path / "b", save_freq=3)],
                                model=model, optimizer=optimizer)
    data = tc.EpochIterator(make_regression(shuffle=True))
    callbacks.loop.track("data", data)
    from torchcallbacks.training.metrics import MetricTracker

    callbacks.loop.track("metrics", MetricTracker({}))
    with pytest.raises(tc.CheckpointError, match=message) as error:
        callbacks.on_train_begin()
    assert str(path) in str(error.value)
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), model.state_dict().values(), strict=True))
    assert optimizer.state_dict() == before[1]
    assert ckpt.best_path is None and ckpt._kept == []  # the callbacks got nothing either


def test_a_backup_cannot_make_model_checkpoint_delete_or_overwrite_what_it_never_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a template without a directory: its files are in the working directory
    other = tmp_path / "other_run" / "m-1.safetensors"
    other.parent.mkdir()
    other.write_bytes(b"another run's weights")
    (tmp_path / "m-9.safetensors").mkdir()  # a directory where a file of the template would be
    for entry, message in [
        ("other_run/m-1.safetensors", r"names 'other_run/m-1.safetensors', which is not a checkpoint file"),
        ("notes.safetensors", r"names 'notes.safetensors', which is not a checkpoint file"),
        ("m-9.safetensors", r"names 'm-9.safetensors', which is not a regular file"),
        ("m-1", r"names 'm-1', which is not a sharded checkpoint directory of ours"),
    ]:
        if entry == "m-1":
            (tmp_path / "m-1").mkdir(exist_ok=True)  # a directory, but not one of our sharded states
        checkpoint = tc.ModelCheckpoint("m-{epoch}.safetensors", monitor="loss", max_to_keep=1)
        with pytest.raises(ValueError, match=message):
            checkpoint.load_state_dict({"best": None, "best_path": None, "last_path": None, "kept": [[entry, 1.0]]})
        assert checkpoint._kept == []
    checkpoint.load_state_dict({"best": 1.0, "best_path": "m-3.safetensors", "last_path": "m-3.safetensors",
                                "kept": [["m-3.safetensors", 1.0]]})  # the template's names are taken
    assert checkpoint._kept == [["m-3.safetensors", 1.0]]
    assert other.read_bytes() == b"another run's weights" and (tmp_path / "m-9.safetensors").is_dir()


@pytest.mark.parametrize("text", ['{"format_version": 2, "epoch": NaN}', '{"format_version": 2, "format_version": 2}'])
def test_metadata_that_is_not_strict_json_is_refused(tmp_path: Path, text: str) -> None:
    path, tensors, metadata = _backup(tmp_path)
    _rewrite(path, tensors, metadata, text=text)
    with pytest.raises(tc.CheckpointError, match=r"the training-state metadata: (NaN is not allowed|duplicate key .format_version.)"):
        read_training_state(path)


def _nested(depth: int) -> Any:
    def edit(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        document["extra"] = {"x": json.loads("[" * depth + "]" * depth)}
    return edit


def _replace_file(make: Any) -> Any:
    """latest.safetensors replaced by what `make(path)` puts there."""
    def damage(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        path.unlink()
        make(path)
    return damage


DAMAGED = {  # (damage, what the CheckpointError says after the file's name)
    "rng a number": (lambda p, t, m: _rewrite(p, t, m, _set("rng", 5)), "field 'rng' must be a dict"),
    "callbacks a list of ints": (lambda p, t, m: _rewrite(p, t, m, _set("callbacks", [1, 2])), "field 'callbacks' must be a dict"),
    "ranks a list of ints": (lambda p, t, m: _rewrite(p, t, m, _set("ranks", [1])), "field 'ranks/0' must be a dict"),
    "world size a string": (lambda p, t, m: _rewrite(p, t, m, _set("world_size", "two")), "field 'world_size' must be an integer >= 1"),
    "optimizer types too few": (lambda p, t, m: _rewrite(p, t, m, _set("optimizer_types", [])), "field 'optimizer_types' holds 0"),
    "JSON nested 600 deep": (lambda p, t, m: _rewrite(p, t, m, _nested(600)), "JSON nested more than 100 deep"),
    "batch beyond the epoch": (lambda p, t, m: _rewrite(p, t, m, _set("batch", 10**9)), "field 'batch' is 1000000000, beyond the 4 batches"),
    "a FIFO": (_replace_file(lambda path: os.mkfifo(path)), "is not a regular file"),
    "a link to /dev/zero": (_replace_file(lambda path: path.symlink_to("/dev/zero")), "is not a regular file"),
    "a link to nothing": (_replace_file(lambda path: path.symlink_to(path.parent / "gone")), "is not a regular file"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_latest_backup_is_a_checkpoint_error_naming_it_and_falls_back(tmp_path: Path, case: str) -> None:
    path, tensors, metadata = _backup(tmp_path, double=True)
    damage, message = DAMAGED[case]
    damage(path, tensors, metadata)
    with pytest.raises(tc.CheckpointError, match=re.escape(repr(str(path))) + ".*" + message):
        _fit([tc.BackupAndRestore(tmp_path / "b", save_freq=3)])  # no previous backup to fall back to
    backup = tc.BackupAndRestore(tmp_path / "b", save_freq=3, double_checkpoint=True)
    with pytest.warns(UserWarning, match=rf"{re.escape(repr(str(path)))}.*falling back to .*previous.safetensors"):
        _fit([backup, tc.ModelCheckpoint(str(tmp_path / "ckpt" / "m-{epoch}.safetensors"), monitor="loss", max_to_keep=1)])
    assert backup.restored is not None and backup.restored.path.endswith("previous.safetensors")


def test_a_directory_in_place_of_the_backup_file_is_named_before_training(tmp_path: Path) -> None:
    (tmp_path / "latest.safetensors").mkdir()
    (tmp_path / "latest.safetensors" / "mine").write_text("kept")
    model = make_model()
    with pytest.raises(IsADirectoryError, match="latest.safetensors"):
        tc.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               loss=torch.nn.functional.mse_loss, epochs=1, verbose=0, callbacks=[tc.BackupAndRestore(tmp_path)])
    assert (tmp_path / "latest.safetensors" / "mine").read_text() == "kept"
    with pytest.raises(IsADirectoryError, match="a directory is where the file goes"):
        write_training_state(tmp_path / "latest.safetensors", tc.CallbackList([], model=model).loop.state_dict())


def test_a_backup_of_an_epoch_beyond_epochs_says_nothing_is_left_to_train(tmp_path: Path) -> None:
    _fit([tc.BackupAndRestore(tmp_path, delete_checkpoint=False)], epochs=4)
    with pytest.warns(UserWarning, match=r"saved at epoch 4, beyond this run's epochs=2: nothing is left to train"):
        _fit([tc.BackupAndRestore(tmp_path)], epochs=2)


def test_double_checkpoint_keeps_a_complete_latest_at_every_instant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill at any rename of a save leaves latest.safetensors complete (it was moved to previous
    first, and 3 of 60 kills found no latest)."""
    import torchcallbacks.checkpoint.writer as writer

    latest = tmp_path / "latest.safetensors"
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        renames.append((os.path.basename(src), os.path.basename(dst)))
        if renames[0][1] == latest.name:  # from the first backup's commit on
            assert latest.is_file(), f"no {latest.name} after renaming {src} to {dst}"

    monkeypatch.setattr(writer.os, "replace", replace)
    _fit([tc.BackupAndRestore(tmp_path, save_freq=2, double_checkpoint=True, delete_checkpoint=False)], epochs=2)
    assert ("previous", "previous.safetensors") in renames  # the previous copy was kept as well
    first, second = read_training_state(latest), read_training_state(tmp_path / "previous.safetensors")
    assert (first["global_step"], second["global_step"]) == (8, 6)  # the last two backups


def test_every_refusal_falls_back_to_the_previous_backup(tmp_path: Path) -> None:
    path, tensors, metadata = _backup(tmp_path, double=True)
    _rewrite(path, tensors, metadata, _set("optimizer_types/0", "torch.optim.sgd.SGD"))
    backup = tc.BackupAndRestore(tmp_path / "b", save_freq=3, double_checkpoint=True)
    with pytest.warns(UserWarning, match="falling back to .*previous.safetensors"):
        _fit([backup, tc.ModelCheckpoint(str(tmp_path / "ckpt" / "m-{epoch}.safetensors"), monitor="loss", max_to_keep=1)])
    assert backup.restored is not None and backup.restored.path.endswith("previous.safetensors")


@pytest.mark.parametrize("case", sorted(OPTIMIZER_HOSTILE))
def test_a_hostile_optimizer_state_or_weight_dtype_falls_back_to_the_previous_backup(tmp_path: Path, case: str) -> None:
    """Before, these loaded and the resume crashed at the first optimizer step (or trained on): the
    previous backup was never tried."""
    path, tensors, metadata = _backup(tmp_path, double=True)
    edit, message = OPTIMIZER_HOSTILE[case]
    _rewrite(path, tensors, metadata, edit)
    backup = tc.BackupAndRestore(tmp_path / "b", save_freq=3, double_checkpoint=True)
    with pytest.warns(UserWarning, match=re.escape(repr(str(path))) + ".*" + message + ".*falling back to .*previous"):
        _fit([backup, tc.ModelCheckpoint(str(tmp_path / "ckpt" / "m-{epoch}.safetensors"), monitor="loss", max_to_keep=1)])
    assert backup.restored is not None and backup.restored.path.endswith("previous.safetensors")
    assert backup.restored.global_step == 6  # the backup before latest's (9), trained on from there


def test_switching_adam_to_sgd_names_the_optimizer(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _fit([tc.BackupAndRestore(tmp_path, save_freq=2), Crash(5)])
    model, _ = _setup()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(tc.CheckpointError, match=r"optimizers/0 \(SGD\) holds the state of a torch.optim.adam.Adam"):
        tc.fit(model, make_regression(), optimizer=sgd, loss=torch.nn.functional.mse_loss, epochs=2, verbose=0,
               callbacks=[tc.BackupAndRestore(tmp_path, save_freq=2)])


# -- the hand-written loop ------------------------------------------------------------------------------
def _hand_written(backup_dir: Path, crash_at: int | None, seed: int = 0) -> torch.nn.Module:
    model, optimizer = _setup(seed)
    loader = make_regression(shuffle=True)
    callbacks = tc.CallbackList([tc.BackupAndRestore(backup_dir, save_freq=3)], model=model, optimizer=optimizer,
                                epochs=3, steps=len(loader))
    batches = tc.EpochIterator(loader)
    callbacks.loop.track("data", batches)
    callbacks.on_train_begin()
    try:
        for epoch in range(callbacks.loop.initial_epoch, 3):
            callbacks.on_epoch_begin(epoch)
            for i, (x, y) in batches.epoch():
                callbacks.on_train_batch_begin(i)
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                callbacks.on_train_batch_end(i, {"loss": loss.detach()})
                if callbacks.loop.global_step == crash_at:
                    raise RuntimeError("crash")
            callbacks.on_epoch_end(epoch, {})
    except BaseException as exc:
        callbacks.end_after_error("on_train_end", exc)
        raise
    callbacks.on_train_end()
    return model


def test_a_hand_written_loop_resumes_exactly_through_the_same_state(tmp_path: Path) -> None:
    reference = _hand_written(tmp_path / "ref", None)
    with pytest.raises(RuntimeError):
        _hand_written(tmp_path / "b", 7)
    assert _same(reference, _hand_written(tmp_path / "b", None, seed=4))


# -- the model carries no loop, a CallbackList is reused, errors do not leak ----------------------------
def test_deep_copies_of_the_model_during_and_after_fit(tmp_path: Path) -> None:
    copies: list[torch.nn.Module] = []

    class CopyModel(tc.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            copies.append(copy.deepcopy(self.model))  # a TensorBoard in the list holds thread locks

    model = _fit([tc.TensorBoard(str(tmp_path / "tb")), CopyModel()], epochs=2)
    assert len(copies) == 2
    after = copy.deepcopy(model)

    def reachable(value: Any, seen: set[int]) -> bool:
        if id(value) in seen:
            return False
        seen.add(id(value))
        if isinstance(value, torch.optim.Optimizer | tc.Callback):
            return True
        children = value.values() if isinstance(value, dict) else vars(value).values() if hasattr(value, "__dict__") else []
        return any(reachable(child, seen) for child in children if not isinstance(child, torch.Tensor))

    assert not reachable(after, set())
    assert after.history.history["loss"] == model.history.history["loss"]


def test_a_callback_list_passed_to_fit_is_the_one_used() -> None:
    callbacks = tc.CallbackList([tc.EarlyStopping(monitor="loss")])
    loop = callbacks.loop
    model, optimizer = _setup()
    history = tc.fit(model, make_regression(), optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=2,
                     verbose=0, callbacks=callbacks)
    assert callbacks.history is history and callbacks.loop is loop and callbacks.optimizer is optimizer
    assert callbacks.loop.global_step == 8


def test_the_exception_of_a_failed_evaluate_does_not_leak_into_the_next() -> None:
    seen: list[Any] = []
    spy = tc.LambdaCallback(on_test_end=lambda logs: seen.append(spy.loop.exception))
    model, _ = _setup()

    def broken(batch: Any) -> Any:
        raise RuntimeError("broken")

    callbacks = tc.CallbackList([spy])
    with pytest.raises(RuntimeError):
        tc.evaluate(model, make_regression(), test_step=broken, verbose=0, callbacks=callbacks)
    tc.evaluate(model, make_regression(), loss=torch.nn.functional.mse_loss, verbose=0, callbacks=callbacks)
    assert isinstance(seen[0], RuntimeError) and seen[1] is None


def test_loop_state_round_trip_without_a_file() -> None:
    model, optimizer = _setup()
    callbacks = tc.CallbackList([tc.EarlyStopping(monitor="loss")], model=model, optimizer=optimizer)
    tc.fit(model, make_regression(), optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=1, verbose=0,
           callbacks=callbacks)
    state = callbacks.loop.state_dict()
    other, other_optimizer = _setup(3)
    fresh = tc.CallbackList([tc.EarlyStopping(monitor="loss"), tc.History()], model=other, optimizer=other_optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.loop.load_state_dict(state, "memory")
    assert _same(model, other) and fresh.loop.resumed and fresh.loop.position == (1, 0)
    assert fresh.callbacks[0].state_dict()["best"] == callbacks.callbacks[0].state_dict()["best"]


# -- fast resume --------------------------------------------------------------------------------------
class Counting(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True)
        self.loaded = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.loaded += 1
        return self.x[i] + 0.01 * torch.randn(4), self.y[i]  # augmentation from the global generator


def test_a_resumed_epoch_skips_its_trained_batches_without_loading_them(tmp_path: Path) -> None:
    def run(callbacks: list[tc.Callback], seed: int = 0) -> tuple[torch.nn.Module, Counting]:
        model, optimizer = _setup(seed)
        dataset = Counting()
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
        tc.fit(model, loader, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=2, verbose=0,
               callbacks=callbacks)
        return model, dataset

    reference, _ = run([])
    with pytest.raises(RuntimeError):
        run([tc.BackupAndRestore(tmp_path, save_freq=5), Crash(6)])  # backup after batch 5 of epoch 0
    resumed, dataset = run([tc.BackupAndRestore(tmp_path, save_freq=5)], seed=2)
    assert dataset.loaded == 64 * 2 - 5 * 8  # the 5 trained batches were skipped by index, not loaded
    assert _same(reference, resumed)  # and the augmentation drawn after them is the same


# -- every optimizer ------------------------------------------------------------------------------------
def test_callbacks_see_every_optimizer_and_lr_callbacks_act_on_all_of_them() -> None:
    model = make_model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.Adam(model[2].parameters(), lr=0.01)
    seen: list[Any] = []
    spy = tc.LambdaCallback(on_train_begin=lambda logs: seen.append((spy.optimizer, list(spy.optimizers))))
    reduce = tc.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, mode="max")  # "max": reduces every epoch
    schedule = tc.LearningRateScheduler(lambda epoch, lr: lr * 0.1 if epoch == 1 else lr)
    only_first = tc.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, mode="max", optimizer=first)
    only_first.state_key = "only-first"
    tc.fit(model, make_regression(), optimizer=[first, second], loss=torch.nn.functional.mse_loss, epochs=2,
           verbose=0, callbacks=[spy, reduce, schedule, only_first])
    assert seen == [(first, [first, second])]
    # epoch 1: x0.1 (schedule, both), x0.5 (reduce: the loss fell, "max" sees no improvement), x0.5 (first only)
    assert first.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1 * 0.5 * 0.5)
    assert second.param_groups[0]["lr"] == pytest.approx(0.01 * 0.1 * 0.5)
    with pytest.raises(TypeError, match="optimizer must be None"):
        tc.ReduceLROnPlateau(optimizer="first")


@pytest.mark.parametrize("cls", [tc.ReduceLROnPlateau, tc.LearningRateScheduler])
def test_the_old_name_optimizers_still_works_with_a_future_warning(cls: Any) -> None:
    first = torch.optim.SGD(make_model().parameters(), lr=0.1)
    args = () if cls is tc.ReduceLROnPlateau else (lambda epoch, lr: lr,)
    with pytest.warns(FutureWarning, match=rf"{cls.__name__}: optimizers= is deprecated, pass optimizer="):
        callback = cls(*args, optimizers=first)
    assert callback.chosen_optimizers == [first]
    with pytest.raises(TypeError, match="optimizers is the old name of optimizer; pass optimizer only"):
        cls(*args, optimizer=first, optimizers=first)


def test_a_scheduler_of_another_optimizer_is_named() -> None:
    model = make_model()
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    callback = tc.LearningRateScheduler(torch.optim.lr_scheduler.StepLR(other, step_size=1))
    with pytest.raises(ValueError, match="built on an optimizer that is not one of the loop's"):
        tc.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               loss=torch.nn.functional.mse_loss, epochs=1, verbose=0, callbacks=[callback])


def test_a_backup_never_names_a_checkpoint_whose_asynchronous_write_is_unfinished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, ModelCheckpoint(async_save=True) recorded best_path as soon as the write was handed to
    its thread: a backup taken then, and a kill before the write ended, resumed with a best_path
    that never appeared."""
    from torchcallbacks.checkpoint import writer

    real_save, real_flush = writer.atomic_save_file, writer.CheckpointWriter.flush
    # A best-file write stays in flight until somebody waits for it (flush) or the check below is
    # done: a backup that does not wait sees it unfinished, every time.
    permits = threading.Semaphore(0)

    def held(tensors: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if "best" in str(path):
            assert permits.acquire(timeout=60), "the write was never released"
        real_save(tensors, path, *args, **kwargs)

    def flush(self: Any) -> None:
        if self._thread is not None:  # this writer has a write in flight: waiting for it lets it end
            permits.release()
        real_flush(self)

    monkeypatch.setattr(writer, "atomic_save_file", held)
    monkeypatch.setattr(writer.CheckpointWriter, "flush", flush)
    found: list[bool] = []

    class AfterTheBackup(tc.Callback):
        dispatch_order = 3  # after BackupAndRestore (2): what a kill right after the backup leaves

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            state = read_training_state(tmp_path / "b" / "latest.safetensors")
            key = next(k for k in state["callbacks"] if k.startswith("ModelCheckpoint"))
            best = state["callbacks"][key]["best_path"]
            found.append(best is not None and Path(best).exists())
            permits.release()

    ckpt = tc.ModelCheckpoint(str(tmp_path / "best-{epoch}.safetensors"), monitor="loss", save_best_only=True,
                              save_weights_only=True, async_save=True)
    _fit([AfterTheBackup(), ckpt, tc.BackupAndRestore(tmp_path / "b")], epochs=2)
    assert found == [True, True]


# -- stateful metrics without torchmetrics -------------------------------------------------------------
class MeanError:
    """An update/compute/reset metric whose state is plain attributes (a list of tensors included)."""

    mode = "min"

    def reset(self) -> None:
        self.errors: list[torch.Tensor] = []
        self.count = 0

    def update(self, y_pred: torch.Tensor, y: torch.Tensor) -> None:
        self.errors.append((y_pred - y).abs().sum())
        self.count += y.numel()

    def compute(self) -> torch.Tensor:
        return torch.stack(self.errors).sum() / max(self.count, 1)


class Opaque(MeanError):
    def reset(self) -> None:
        super().reset()
        self.helper = object()  # nothing a checkpoint can hold


def _fit_metric(metric: Any, callbacks: list[tc.Callback], seed: int = 0) -> tc.History:
    model, optimizer = _setup(seed)
    return tc.fit(model, make_regression(shuffle=True), optimizer=optimizer, loss=torch.nn.functional.mse_loss,
                  metrics={"err": metric}, epochs=3, verbose=0, callbacks=callbacks)


def test_a_plain_stateful_metric_resumes_with_the_batches_before_the_crash(tmp_path: Path) -> None:
    reference = _fit_metric(MeanError(), [])
    with pytest.raises(RuntimeError):
        _fit_metric(MeanError(), [tc.BackupAndRestore(tmp_path, save_freq=2), Crash(7)])
    resumed = _fit_metric(MeanError(), [tc.BackupAndRestore(tmp_path, save_freq=2)], seed=4)
    assert resumed.history["err"] == reference.history["err"]  # epoch 1 includes its 2 batches before the crash


def test_a_metric_whose_state_cannot_be_saved_warns_and_backups_still_work(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="the state of metric Opaque is not saved"), pytest.raises(RuntimeError):
        _fit_metric(Opaque(), [tc.BackupAndRestore(tmp_path, save_freq=2), Crash(7)])
    assert (tmp_path / "latest.safetensors").exists()
