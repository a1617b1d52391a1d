"""The file format: weights-only and training-state files read back with safetensors' own readers,
tied weights, every part of the training state, RNG states without pickle, and every bad input."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_model, retype_tensor
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

import torchcallbacks as tc
from torchcallbacks.checkpoint import (
    CheckpointError,
    capture_rng_state,
    read_training_state,
    restore_rng_state,
)
from torchcallbacks.checkpoint.files import ALIASES_KEY, KIND_KEY, STATE_KEY, VERSION_KEY


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# -- weights only -----------------------------------------------------------------------------------
def test_weights_file_is_read_by_safetensors(tmp_path: Path) -> None:
    model = make_model()
    tc.save_weights(model, tmp_path / "w.safetensors", metadata={"note": "hello"})
    tensors = load_file(tmp_path / "w.safetensors")
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata[KIND_KEY] == "weights" and metadata["note"] == "hello"
    other = make_model()
    load_model(other, tmp_path / "w.safetensors")
    assert _equal_state(model, other)


def test_tied_weights_are_stored_once_and_load_everywhere(tmp_path: Path) -> None:
    model = Tied()
    tc.save_weights(model, tmp_path / "t.safetensors")  # no "tensors share memory" crash
    stored = load_file(tmp_path / "t.safetensors")
    assert set(stored) == {"embed.weight", "head.bias", "steps"}
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()[ALIASES_KEY]) == {"head.weight": "embed.weight"}
    for load in (load_model, tc.load_weights):
        other = Tied()
        load(other, tmp_path / "t.safetensors")
        assert _equal_state(model, other)
        assert other.head.weight is other.embed.weight


def test_load_weights_reads_files_written_by_safetensors_save_model(tmp_path: Path) -> None:
    model = Tied()
    save_model(model, str(tmp_path / "s.safetensors"))
    other = Tied()
    tc.load_weights(other, tmp_path / "s.safetensors")
    assert _equal_state(model, other)


def test_a_tied_weight_left_out_of_the_file_is_filled_from_its_tie(tmp_path: Path) -> None:
    """A `save_pretrained`-style file stores a tied weight once and records nothing about the other
    name (GPT-2's `lm_head.weight` is left out for `transformer.wte.weight`): it loads with strict."""
    model = Tied()
    with torch.no_grad():
        model.embed.weight.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, str(tmp_path / "hf.safetensors"), metadata={"format": "pt"})
    other = Tied()
    tc.load_weights(other, tmp_path / "hf.safetensors")
    assert _equal_state(model, other)
    assert other.head.weight is other.embed.weight
    # either name of the tie may be the one stored
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "embed.weight"}
    save_file(state, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    other = Tied()
    tc.load_weights(other, tmp_path / "other.safetensors")
    assert _equal_state(model, other)


def test_a_missing_weight_that_is_not_tied_is_still_named(tmp_path: Path) -> None:
    model = Tied()
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in ("head.weight", "head.bias")}
    save_file(state, str(tmp_path / "hf.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing in the file: head\.bias$"):
        tc.load_weights(Tied(), tmp_path / "hf.safetensors")
    untied = make_model()
    save_file({k: v for k, v in untied.state_dict().items() if k != "2.weight"}, str(tmp_path / "u.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing in the file: 2\.weight"):
        tc.load_weights(make_model(), tmp_path / "u.safetensors")


@pytest.mark.slow  # importing transformers takes a few seconds
def test_load_weights_reads_a_hugging_face_save_pretrained_file_of_a_tied_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # stored once, as wte
    torch.manual_seed(1)
    other = transformers.GPT2LMHeadModel(config)
    assert not torch.equal(other.transformer.wte.weight, model.transformer.wte.weight)
    tc.load_weights(other, tmp_path / "model.safetensors")
    assert _equal_state(model, other)
    assert other.lm_head.weight is other.transformer.wte.weight
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.eval()(tokens).logits, other.eval()(tokens).logits)


def test_load_weights_reads_the_model_part_of_a_training_state(tmp_path: Path) -> None:
    model = make_model()
    tc.save_checkpoint(model, tmp_path / "c.safetensors", torch.optim.Adam(model.parameters()))
    other = make_model()
    tc.load_weights(other, tmp_path / "c.safetensors")
    assert _equal_state(model, other)


# -- training state ---------------------------------------------------------------------------------
class Stateful(tc.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.state = {"best": float("inf"), "history": [1.5, float("nan")], "pair": (1, "a"), "count": 7}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = state_dict


def _trained() -> tuple[torch.nn.Module, list[torch.optim.Optimizer], torch.amp.GradScaler, torch.optim.lr_scheduler.StepLR]:
    model = make_model()
    first = torch.optim.Adam(model[0].parameters(), lr=0.01)
    second = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scheduler = torch.optim.lr_scheduler.StepLR(first, step_size=1, gamma=0.5)
    for _ in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(first)
        scaler.step(second)
        scaler.update()
        scheduler.step()
    return model, [first, second], scaler, scheduler


def test_training_state_round_trip(tmp_path: Path) -> None:
    model, optimizers, scaler, scheduler = _trained()
    callbacks = tc.CallbackList([Stateful()])
    path = tmp_path / "state.safetensors"
    tc.save_checkpoint(model, path, optimizers, scaler=scaler, scheduler=scheduler, callbacks=callbacks,
                       epoch=3, batch=2, global_step=14, extra={"note": "x"})

    # Read back with safetensors' own reader: tensor names, values and the JSON document.
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        document = json.loads(f.metadata()[STATE_KEY])
        exp_avg = f.get_tensor("@optimizers/0/state/0/exp_avg")
    assert set(model.state_dict()) <= names
    assert "@rng/current/torch" in names
    assert torch.equal(exp_avg, optimizers[0].state_dict()["state"][0]["exp_avg"])
    assert document["format"] == "torchcallbacks.training_state" and document["format_version"] == 3
    assert (document["epoch"], document["batch"], document["global_step"]) == (3, 2, 14)
    assert document["library_version"] == tc.__version__
    assert document["optimizers"][1]["param_groups"][0]["momentum"] == 0.9
    assert document["loop"]["scheduler/0"]["last_epoch"] == 3  # the one layout: BackupAndRestore's name
    assert "schedulers" not in document and document["world_size"] == 1 and document["extra"] == {"note": "x"}
    assert document["scaler"]["scale"] == scaler.get_scale()
    assert document["callbacks"]["Stateful"]["best"] == {"__float__": "inf"}
    assert document["rng"]["current"]["numpy"]["key"] == {"__tensor__": "@rng/current/numpy/key"}
    assert document["rng"]["current"]["python"]["internal"] == {"__tensor__": "@rng/current/python/internal"}
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # the header is strict JSON
    assert header["__metadata__"][STATE_KEY] == json.dumps(document, allow_nan=False)

    other, other_optimizers, _, _ = _trained()
    other_scaler = torch.amp.GradScaler("cpu")
    other_scheduler = torch.optim.lr_scheduler.StepLR(other_optimizers[0], step_size=1, gamma=0.5)
    other_callbacks = tc.CallbackList([Stateful()])
    other_callbacks.callbacks[0].state = {}  # type: ignore[attr-defined]
    state = tc.load_checkpoint(other, path, other_optimizers, scaler=other_scaler, scheduler=other_scheduler,
                               callbacks=other_callbacks)
    assert (state.epoch, state.batch, state.global_step, state.extra) == (3, 2, 14, {"note": "x"})
    assert _equal_state(model, other)
    for mine, theirs in zip(optimizers, other_optimizers, strict=True):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a["param_groups"] == b["param_groups"]
        for key in a["state"]:
            assert all(torch.equal(a["state"][key][n], b["state"][key][n]) for n in a["state"][key])
    assert other_scaler.state_dict() == scaler.state_dict()
    assert other_scheduler.state_dict() == scheduler.state_dict()
    restored = other_callbacks.callbacks[0].state  # type: ignore[attr-defined]
    assert restored["best"] == float("inf") and restored["pair"] == (1, "a") and np.isnan(restored["history"][1])


def test_rng_states_are_restored_without_pickle(tmp_path: Path) -> None:
    tc.save_checkpoint(make_model(), tmp_path / "c.safetensors")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn(), random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    tc.load_checkpoint(None, tmp_path / "c.safetensors")
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def _draws() -> tuple[Any, ...]:
    return (torch.rand(3), np.random.rand(3), random.random(), np.random.randn(), random.gauss(0, 1),
            np.random.randint(0, 2**31, 5), random.getrandbits(64))


def _same_draws(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:5] == b[2:5]
            and np.array_equal(a[5], b[5]) and a[6] == b[6])


def test_numpy_and_python_words_are_tensors_not_json_lists(tmp_path: Path) -> None:
    np.random.seed(5), random.seed(5)
    path = tmp_path / "c.safetensors"
    tc.save_checkpoint(make_model(), path)
    numpy_key, python_words = np.random.get_state(legacy=True)[1], random.getstate()[1]
    with safe_open(path, framework="pt") as f:
        text = f.metadata()[STATE_KEY]
        key, internal = f.get_tensor("@rng/current/numpy/key"), f.get_tensor("@rng/current/python/internal")
    assert (key.dtype, key.shape, internal.dtype, internal.shape) == (torch.int64, (624,), torch.int64, (625,))
    assert key.tolist() == numpy_key.tolist() and tuple(internal.tolist()) == python_words
    rng = json.loads(text)["rng"]["current"]
    assert rng["numpy"]["key"] == {"__tensor__": "@rng/current/numpy/key"}
    assert rng["python"]["internal"] == {"__tensor__": "@rng/current/python/internal"}
    longest = max(len(v) for v in _lists(json.loads(text)))
    assert longest < 100 and len(text) < 3000  # no 624-word lists left in the JSON


def _lists(value: Any) -> list[list[Any]]:
    """Every list inside a JSON value."""
    if isinstance(value, dict):
        return [found for v in value.values() for found in _lists(v)]
    if isinstance(value, list):
        return [value, *(found for v in value for found in _lists(v))]
    return []


def test_the_captured_words_do_not_follow_later_draws() -> None:
    state = capture_rng_state()
    key, internal = state["numpy"]["key"].clone(), state["python"]["internal"].clone()
    np.random.rand(2000), random.random()
    assert torch.equal(state["numpy"]["key"], key) and torch.equal(state["python"]["internal"], internal)


def _rewrite_state_file(path: Path, edit: Any) -> None:
    """Read a training-state file, let `edit(document, tensors)` change its state document and its
    tensors, and write it back (the file's format version as the document's)."""
    with safe_open(path, framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    document = json.loads(metadata[STATE_KEY])
    edit(document, tensors)
    save_file(tensors, str(path), metadata={**metadata, STATE_KEY: json.dumps(document),
                                            VERSION_KEY: str(document["format_version"])})


def _as_format_2(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A training state as format 2 wrote it: numpy's and Python's words as JSON lists."""
    for part, words in (("numpy", "key"), ("python", "internal")):
        name = document["rng"]["current"][part][words]["__tensor__"]
        document["rng"]["current"][part][words] = tensors.pop(name).tolist()
    document["format_version"] = 2


@pytest.mark.parametrize("layout", ["current", "format 2"])
def test_rng_states_of_either_layout_restore_the_same_streams(tmp_path: Path, layout: str) -> None:
    np.random.randn(), random.gauss(0, 1)  # with a cached gaussian in both
    path = tmp_path / "c.safetensors"
    tc.save_checkpoint(make_model(), path)
    expected = _draws()
    if layout == "format 2":
        _rewrite_state_file(path, _as_format_2)
        with safe_open(path, framework="pt") as f:
            assert isinstance(json.loads(f.metadata()[STATE_KEY])["rng"]["current"]["numpy"]["key"], list)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    tc.load_checkpoint(None, path)
    assert _same_draws(_draws(), expected)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("@rng/current/numpy/key", torch.zeros(623, dtype=torch.int64),
         r"'rng/current/numpy/key' must be 624 integers in \[0, 2\*\*32\).*shape \(623,\)"),
        ("@rng/current/numpy/key", torch.full((624,), 2**32, dtype=torch.int64),
         r"'rng/current/numpy/key' must hold integers in \[0, 2\*\*32\), found values from 4294967296"),
        ("@rng/current/numpy/key", torch.zeros(624, dtype=torch.float32),
         r"'rng/current/numpy/key' must be 624 integers.*dtype torch.float32"),
        ("@rng/current/python/internal", torch.full((625,), -1, dtype=torch.int64),
         r"'rng/current/python/internal' must hold integers in \[0, 2\*\*32\), found values from -1 to -1"),
        ("@rng/current/python/internal", torch.zeros(5, 125, dtype=torch.int64),
         r"'rng/current/python/internal' must be 625 integers.*shape \(5, 125\)"),
    ],
)
def test_damaged_rng_words_are_refused_naming_the_field(tmp_path: Path, name: str, value: torch.Tensor, message: str) -> None:
    path = tmp_path / "c.safetensors"
    tc.save_checkpoint(make_model(), path)

    def damage(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = value

    _rewrite_state_file(path, damage)
    state = np.random.get_state(legacy=True)
    with pytest.raises(CheckpointError, match=message):
        tc.load_checkpoint(None, path)
    assert np.array_equal(np.random.get_state(legacy=True)[1], state[1])  # nothing restored


def test_capture_and_restore_rng_mid_gaussian() -> None:
    np.random.randn()  # numpy caches the second gaussian
    random.gauss(0, 1)  # so does Python
    state = capture_rng_state()
    expected = (np.random.randn(), random.gauss(0, 1))
    restore_rng_state(state)
    assert (np.random.randn(), random.gauss(0, 1)) == expected


# -- bad input -------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        tc.load_weights(make_model(), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        tc.load_checkpoint(make_model(), tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [4, 50, -1])
def test_truncated_file(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "c.safetensors"
    tc.save_checkpoint(make_model(), path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(tc.CheckpointError, match=r"c\.safetensors.*not a readable safetensors file"):
        tc.load_checkpoint(make_model(), path)


def test_foreign_files(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(make_model().state_dict(), pickled)  # a pickle: must be refused, never unpickled
    text = tmp_path / "notes.safetensors"
    text.write_text('{"hello": "world"}')
    for path in (pickled, text):
        with pytest.raises(tc.CheckpointError, match=path.name):
            tc.load_weights(make_model(), path)


def test_weights_file_is_not_a_training_state(tmp_path: Path) -> None:
    tc.save_weights(make_model(), tmp_path / "w.safetensors")
    with pytest.raises(tc.CheckpointError, match=r"not a torchcallbacks training state.*weights file"):
        tc.load_checkpoint(make_model(), tmp_path / "w.safetensors")


def test_key_and_shape_mismatch_name_the_keys(tmp_path: Path) -> None:
    tc.save_weights(make_model(), tmp_path / "w.safetensors")
    with pytest.raises(tc.CheckpointError, match=r"w\.safetensors.*0\.weight: file \(8, 4\) vs model \(8, 5\)"):
        tc.load_weights(make_model(features=5), tmp_path / "w.safetensors")
    bigger = torch.nn.Sequential(*make_model(), torch.nn.Linear(1, 1))
    with pytest.raises(tc.CheckpointError, match=r"missing in the file: 3\.bias, 3\.weight"):
        tc.load_weights(bigger, tmp_path / "w.safetensors")
    smaller = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(tc.CheckpointError, match=r"not in the model: 2\.bias, 2\.weight"):
        tc.load_weights(smaller, tmp_path / "w.safetensors")
    tc.load_weights(smaller, tmp_path / "w.safetensors", strict=False)


def test_a_weight_stored_in_another_dtype_is_refused_naming_it_unless_a_cast_is_asked_for(tmp_path: Path) -> None:
    """A float32 weight whose header says int32 (the same bytes) loaded into the float parameter
    without a word, as integers cast to floats (torch's load_state_dict casts by copy_)."""
    model = make_model()
    tc.save_weights(model, tmp_path / "w.safetensors")
    retype_tensor(tmp_path / "w.safetensors", "0.weight", "I32")
    fresh = make_model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    message = r"w\.safetensors.*dtypes differ for 0\.weight: file torch\.int32 vs model torch\.float32"
    with pytest.raises(tc.CheckpointError, match=message):
        tc.load_weights(fresh, tmp_path / "w.safetensors")
    tc.save_weights(model, tmp_path / "split.safetensors", max_shard_size=64)  # split files and their index
    retype_tensor(tmp_path / "split-00001-of-00003.safetensors", "0.weight", "I32")
    with pytest.raises(tc.CheckpointError, match=r"split\.safetensors\.index\.json.*" + message.split(".*")[1]):
        tc.load_weights(fresh, tmp_path / "split.safetensors")
    # a training state, read by load_checkpoint (BackupAndRestore: tests/test_training_state.py)
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    tc.save_checkpoint(model, tmp_path / "c.safetensors", torch.optim.SGD(model.parameters(), lr=0.5))
    retype_tensor(tmp_path / "c.safetensors", "2.bias", "I32")
    with pytest.raises(tc.CheckpointError, match=r"c\.safetensors.*dtypes differ for 2\.bias: file torch\.int32 vs model torch\.float32"):
        tc.load_checkpoint(fresh, tmp_path / "c.safetensors", optimizer)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == 0.1

    # A file of another dtype on purpose (float16 weights for a float32 model): cast when asked for
    half = make_model().half()
    tc.save_weights(half, tmp_path / "half.safetensors")
    with pytest.raises(tc.CheckpointError, match=r"file torch\.float16 vs model torch\.float32 \(cast_dtypes=True casts them\)"):
        tc.load_weights(fresh, tmp_path / "half.safetensors")
    tc.load_weights(fresh, tmp_path / "half.safetensors", cast_dtypes=True)
    assert all(torch.equal(v, half.state_dict()[k].float()) for k, v in fresh.state_dict().items())
    tc.save_checkpoint(half, tmp_path / "half-state.safetensors")
    tc.load_checkpoint(make_model(), tmp_path / "half-state.safetensors", cast_dtypes=True)


def test_optimizer_count_mismatch(tmp_path: Path) -> None:
    model, optimizers, _, _ = _trained()
    tc.save_checkpoint(model, tmp_path / "c.safetensors", optimizers)
    with pytest.raises(tc.CheckpointError, match=r"'optimizers' holds 2 item\(s\), 1 expected"):
        tc.load_checkpoint(model, tmp_path / "c.safetensors", optimizers[0])


def test_unstorable_state_is_named(tmp_path: Path) -> None:
    class Bad(tc.Callback):
        def state_dict(self) -> dict:
            return {"fn": print}

    with pytest.raises(TypeError, match=r"@callbacks/Bad/fn.*builtin_function_or_method"):
        tc.save_checkpoint(make_model(), tmp_path / "c.safetensors", callbacks=tc.CallbackList([Bad()]))
    assert not list(tmp_path.iterdir())


def test_no_pickle_in_the_library() -> None:
    root = Path(tc.__file__).parent
    for source in root.rglob("*.py"):
        text = source.read_text()
        assert "torch.load(" not in text and "import pickle" not in text and "weights_only=False" not in text, source


def test_every_public_function_documents_args_and_an_example() -> None:
    """The public API's docstrings have Args (when there are arguments) and an Example, as Keras'
    do: the functions exported by `torchcallbacks` and every public function of
    `torchcallbacks.distributed`."""
    import inspect

    import torchcallbacks.distributed

    functions = {name: getattr(tc, name) for name in tc.__all__ if inspect.isfunction(getattr(tc, name))}
    functions.update(
        (f"distributed.{name}", function)
        for name, function in vars(torchcallbacks.distributed).items()
        if inspect.isfunction(function)
        and not name.startswith("_")
        and function.__module__ == "torchcallbacks.distributed"
    )
    assert "distributed.main_process_only" in functions and "distributed.print_main" in functions

    def lacks(function: Any) -> list[str]:
        doc = inspect.getdoc(function) or ""
        needed = ["Example:"]
        if inspect.signature(function).parameters:
            needed.append("Args:")
        return [part for part in needed if part not in doc]

    missing = {name: lacks(function) for name, function in functions.items() if lacks(function)}
    assert missing == {}


def test_the_model_comes_first(tmp_path: Path) -> None:
    """As in save_weights / load_weights (and torch's load_state_dict): model, then file."""
    model = make_model()
    with pytest.raises(TypeError, match=r"save_checkpoint\(model, filepath, ...\): the model comes first"):
        tc.save_checkpoint(tmp_path / "c.safetensors", model)  # type: ignore[arg-type]
    tc.save_checkpoint(model, tmp_path / "c.safetensors")
    with pytest.raises(TypeError, match=r"load_checkpoint\(model, filepath, ...\): the model comes first"):
        tc.load_checkpoint(tmp_path / "c.safetensors", model)  # type: ignore[arg-type]


def test_a_training_state_of_a_newer_format_is_refused_naming_the_file_and_both_versions(tmp_path: Path) -> None:
    from torchcallbacks.checkpoint.files import FORMAT_VERSION

    path = tmp_path / "future.safetensors"
    tc.save_checkpoint(make_model(), path)

    def newer(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        document["format_version"] = FORMAT_VERSION + 1

    _rewrite_state_file(path, newer)
    message = rf"{re.escape(repr(str(path)))} has format version {FORMAT_VERSION + 1}; this torchcallbacks reads up to {FORMAT_VERSION}"
    with pytest.raises(tc.CheckpointError, match=message):
        read_training_state(path)
    with pytest.raises(tc.CheckpointError, match=message):
        tc.load_checkpoint(make_model(), path)
