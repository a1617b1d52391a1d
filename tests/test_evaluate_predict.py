"""evaluate and predict: results, hooks, stopping, nested outputs."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression

import torchcallbacks as tc


def test_evaluate_returns_keras_shapes() -> None:
    model = make_model()
    loader = make_regression(n=40, batch_size=16)
    x, y = loader.dataset.tensors
    with torch.no_grad():
        mse, mae = F.mse_loss(model(x), y).item(), F.l1_loss(model(x), y).item()
    assert tc.evaluate(model, loader, loss=F.mse_loss, verbose=0) == pytest.approx(mse, rel=1e-6)
    assert tc.evaluate(model, loader, loss=F.mse_loss, metrics=[F.l1_loss], verbose=0) == pytest.approx([mse, mae])
    result = tc.evaluate(model, loader, loss=F.mse_loss, metrics={"mae": F.l1_loss}, return_dict=True, verbose=0)
    assert result == pytest.approx({"loss": mse, "mae": mae})


def test_evaluate_hooks_params_and_stop_evaluating() -> None:
    calls = []

    class Probe(tc.Callback):
        def on_test_begin(self, logs=None):
            calls.append(("begin", dict(self.params)))

        def on_test_batch_end(self, batch, logs=None):
            calls.append(("batch", batch, float(logs["loss"])))
            if batch == 1:
                self.model.stop_evaluating = True

        def on_test_end(self, logs=None):
            calls.append(("end", sorted(logs)))

    model = make_model()
    tc.evaluate(model, make_regression(n=64, batch_size=16), loss=F.mse_loss, callbacks=[Probe()], verbose=0)
    assert calls[0] == ("begin", {"verbose": 0, "epochs": 1, "steps": 4})
    assert [c[0] for c in calls] == ["begin", "batch", "batch", "end"]
    assert calls[-1] == ("end", ["loss"])


def test_predict_concatenates_and_keeps_structure() -> None:
    model = make_model()
    loader = make_regression(n=40, batch_size=16)
    x, _ = loader.dataset.tensors
    out = tc.predict(model, loader, verbose=0)
    with torch.no_grad():
        assert torch.allclose(out, model(x))

    Pair = collections.namedtuple("Pair", "double half")

    class Nested(torch.nn.Module):
        def forward(self, x):
            return {"sum": x.sum(1), "pair": Pair(x * 2, x / 2), "list": [x]}

    out = tc.predict(Nested(), [x[:16], (x[16:],)], verbose=0)
    assert torch.equal(out["sum"], x.sum(1))
    assert isinstance(out["pair"], Pair) and torch.equal(out["pair"].double, x * 2)
    assert isinstance(out["list"], list) and torch.equal(out["list"][0], x)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    extras: dict
    label: str = "out"


def test_predict_keeps_namedtuple_dict_dataclass_and_torch_return_types_outputs() -> None:
    Pair = collections.namedtuple("Pair", "double half")
    x = torch.randn(40, 4)
    batches = [x[:16], x[16:32], x[32:]]
    cases = {
        "namedtuple": (lambda t: Pair(t * 2, t / 2), lambda out: (out.double, out.half)),
        "ordered dict": (lambda t: collections.OrderedDict(b=t * 2, a=t / 2), lambda out: (out["b"], out["a"])),
        "dataclass": (lambda t: Output(t * 2, {"half": t / 2}), lambda out: (out.logits, out.extras["half"])),
        "return_types": (lambda t: torch.max(t, dim=1), lambda out: (out.values, out.indices)),
    }
    for name, (make, fields) in cases.items():

        class Model(torch.nn.Module):
            def forward(self, t, make=make):
                return make(t)

        out = tc.predict(Model(), batches, verbose=0)
        expected = make(x)
        assert type(out) is type(expected), name
        for got, want in zip(fields(out), fields(expected), strict=True):
            assert torch.equal(got, want), name
    out = tc.predict(Model(), batches, verbose=0, predict_step=lambda t: Output(t.sum(1), {"n": t.shape[0]}))
    assert type(out) is Output and torch.equal(out.logits, x.sum(1))
    assert out.extras == {"n": [16, 16, 8]} and out.label == ["out"] * 3  # non-tensor leaves: one per batch


def test_predict_outputs_of_different_structures_raise_naming_where() -> None:
    class Changing(torch.nn.Module):
        def forward(self, t):
            return {"a": t, "b": t} if t.shape[0] == 16 else {"a": t, "b": [t]}

    x = torch.randn(24, 4)
    with pytest.raises(ValueError, match=r"at \['b'\]: element 1 is list"):
        tc.predict(Changing(), [x[:16], x[16:]], verbose=0)


def test_predict_hooks_outputs_steps_and_stop_predicting() -> None:
    outputs = []

    class Probe(tc.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            outputs.append(logs["outputs"])
            if batch == 2:
                self.model.stop_predicting = True

    model = make_model()
    result = tc.predict(model, make_regression(n=96, batch_size=16), callbacks=[Probe()], verbose=0)
    assert len(outputs) == 3 and result.shape == (48, 1)
    result = tc.predict(model, make_regression(n=96, batch_size=16), steps=2, verbose=0)
    assert result.shape == (32, 1)
    assert model.training  # the mode it had before predict


def test_custom_predict_step() -> None:
    model = make_model()
    out = tc.predict(model, make_regression(n=32, batch_size=16), predict_step=lambda batch: model(batch[0]).sigmoid(),
                     verbose=0)
    assert out.shape == (32, 1) and bool(((out > 0) & (out < 1)).all())


def test_end_hooks_run_when_evaluate_or_predict_raise() -> None:
    """Callbacks undo what their begin hook did (SwapEMAWeights swaps the EMA weights back out)."""
    seen = []

    class Probe(tc.Callback):
        def on_test_end(self, logs=None):
            seen.append(("test_end", logs, type(self.loop.exception).__name__))

        def on_predict_end(self, logs=None):
            seen.append(("predict_end", logs, type(self.loop.exception).__name__))

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x):
            raise RuntimeError("broken forward")

    model = Broken()
    ema = tc.SwapEMAWeights()
    ema.set_model(model)
    with torch.no_grad():
        ema.on_train_begin()  # builds the average from the current weights
        model.linear.weight.add_(1.0)  # the model now differs from its average
    weights = model.linear.weight.detach().clone()
    with pytest.raises(RuntimeError, match="broken forward"):
        tc.evaluate(model, make_regression(), loss=F.mse_loss, callbacks=[Probe(), ema], verbose=0)
    assert torch.equal(model.linear.weight, weights)
    with pytest.raises(RuntimeError, match="broken forward"):
        tc.predict(model, make_regression(), callbacks=[Probe(), ema], verbose=0)
    assert torch.equal(model.linear.weight, weights)
    assert seen == [("test_end", None, "RuntimeError"), ("predict_end", None, "RuntimeError")]


def test_evaluate_restores_the_model_when_a_test_begin_hook_raises() -> None:
    """An error in `on_test_begin` (after SwapEMAWeights swapped the EMA in) must not leave the model
    in eval mode with the EMA weights in it: the end hooks run and the train mode comes back."""

    class FailsAtBegin(tc.Callback):
        def on_test_begin(self, logs=None):
            raise RuntimeError("begin failed")

    model = make_model()
    ema = tc.SwapEMAWeights()
    ema.set_model(model)
    with torch.no_grad():
        ema.on_train_begin()
        model[0].weight.add_(1.0)
    weights = model[0].weight.detach().clone()
    model.train()
    with pytest.raises(RuntimeError, match="begin failed"):
        tc.evaluate(model, make_regression(), loss=F.mse_loss, callbacks=[ema, FailsAtBegin()], verbose=0)
    assert model.training
    assert torch.equal(model[0].weight, weights)
