"""Keras' `fit(model, x, y, ...)` habit: tensors and numpy arrays in place of a loader."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Crash, make_arrays, make_model, seeded_model
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc
from torchcallbacks.training.arrays import class_weights_to_sample_weights

PER_SAMPLE_MSE = functools.partial(F.mse_loss, reduction="none")
PER_SAMPLE_CE = functools.partial(F.cross_entropy, reduction="none")


def _data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return make_arrays(n, seed)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _fit(model: torch.nn.Module, *args: Any, **kwargs: Any) -> tc.History:
    kwargs.setdefault("loss", F.mse_loss)
    kwargs.setdefault("verbose", 0)
    return tc.fit(model, *args, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), **kwargs)


class Recorder(tc.Callback):
    """Records the inputs of every training batch (through a model forward pre-hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[list[torch.Tensor]] = []
        self.validation: list[torch.Tensor] = []

    def on_train_begin(self, logs: Any = None) -> None:
        self.model.register_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        target = self.epochs[-1] if module.training else self.validation
        target.append(args[0].detach().clone())

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append([])


# -- the same training as a loader --------------------------------------------------------------------
def test_fit_on_tensors_equals_fit_on_the_loader_of_them() -> None:
    x, y = _data()
    by_loader, by_arrays = seeded_model(), seeded_model()
    _fit(by_loader, DataLoader(TensorDataset(x, y), batch_size=8), epochs=2)
    history = _fit(by_arrays, x, y, batch_size=8, shuffle=False, epochs=2)
    assert _same_weights(by_loader, by_arrays)
    assert len(history.history["loss"]) == 2


def test_default_batch_size_is_32_and_the_last_batch_is_partial() -> None:
    x, y = _data(70)
    recorder = Recorder()
    _fit(seeded_model(), x, y, shuffle=False, callbacks=[recorder])
    assert [len(batch) for batch in recorder.epochs[0]] == [32, 32, 6]
    assert torch.equal(torch.cat(recorder.epochs[0]), x)


def test_numpy_arrays_float64_become_float32_and_train_like_tensors() -> None:
    x, y = _data()
    by_tensors, by_numpy = seeded_model(), seeded_model()
    _fit(by_tensors, x, y, batch_size=8, shuffle=False)
    _fit(by_numpy, x.double().numpy(), y.double().numpy(), batch_size=8, shuffle=False)
    for a, b in zip(by_tensors.parameters(), by_numpy.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_integer_numpy_targets_reach_cross_entropy_as_int64() -> None:
    x, _ = _data()
    labels = np.arange(40) % 3
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    history = _fit(model, x.numpy(), labels, loss=F.cross_entropy, batch_size=8)
    assert np.isfinite(history.history["loss"][0])


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 1)
        self.b = torch.nn.Linear(2, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


@pytest.mark.parametrize("as_dict", [False, True])
def test_multi_input_tuple_and_dict_of_arrays(as_dict: bool) -> None:
    x, y = _data()
    extra = torch.randn(40, 2)
    torch.manual_seed(0)
    by_hand, by_fit = TwoInputs(), TwoInputs()
    by_fit.load_state_dict(by_hand.state_dict())
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.05)
    for start in range(0, 40, 10):
        optimizer.zero_grad()
        F.mse_loss(by_hand(x[start:start + 10], extra[start:start + 10]), y[start:start + 10]).backward()
        optimizer.step()
    inputs: Any = {"a": x.numpy(), "b": extra.numpy()} if as_dict else (x, extra.numpy())
    _fit(by_fit, inputs, y, batch_size=10, shuffle=False)
    for p, q in zip(by_hand.parameters(), by_fit.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    predicted = tc.predict(by_fit, inputs, batch_size=7, verbose=0)
    assert torch.allclose(predicted, by_fit(x, extra), atol=1e-6)


# -- shuffle and validation_split ---------------------------------------------------------------------
def test_shuffle_reshuffles_every_epoch_and_covers_every_sample() -> None:
    x, y = _data()
    recorder = Recorder()
    _fit(seeded_model(), x, y, batch_size=8, epochs=3, callbacks=[recorder])
    orders = [torch.cat(epoch) for epoch in recorder.epochs]
    for order in orders:
        assert torch.equal(order[order[:, 0].argsort()], x[x[:, 0].argsort()])  # a permutation of x
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert not torch.equal(orders[0], x)


def test_validation_split_holds_out_the_last_samples_before_shuffling() -> None:
    x, y = _data(40)
    recorder = Recorder()
    history = _fit(seeded_model(), x, y, batch_size=8, epochs=2, validation_split=0.25, callbacks=[recorder])
    held_out = x[30:]
    for epoch in recorder.epochs:  # training sees exactly the first 30 samples, shuffled
        seen = torch.cat(epoch)
        assert torch.equal(seen[seen[:, 0].argsort()], x[:30][x[:30, 0].argsort()])
    validation = torch.cat(recorder.validation)
    assert torch.equal(validation, torch.cat([held_out, held_out]))  # in order, once per epoch
    assert len(history.history["val_loss"]) == 2


def test_validation_split_val_loss_is_the_loss_of_the_held_out_samples() -> None:
    x, y = _data(40)
    model = seeded_model()
    history = _fit(model, x, y, batch_size=8, validation_split=0.2, validation_batch_size=3)
    with torch.no_grad():
        expected = F.mse_loss(model(x[32:]), y[32:]).item()
    assert history.history["val_loss"][0] == pytest.approx(expected, rel=1e-5)


def test_validation_data_as_a_tuple_of_arrays() -> None:
    x, y = _data(40)
    x_val, y_val = _data(12, seed=5)
    model = seeded_model()
    history = _fit(model, x, y, validation_data=(x_val.numpy(), y_val.numpy()), batch_size=8)
    with torch.no_grad():
        expected = F.mse_loss(model(x_val), y_val).item()
    assert history.history["val_loss"][0] == pytest.approx(expected, rel=1e-5)


# -- sample and class weights --------------------------------------------------------------------------
def test_sample_weight_array_equals_a_loader_of_weighted_batches() -> None:
    x, y = _data()
    weights = torch.rand(40, generator=torch.Generator().manual_seed(3))
    by_loader, by_arrays = seeded_model(), seeded_model()
    _fit(by_loader, DataLoader(TensorDataset(x, y, weights), batch_size=8), loss=PER_SAMPLE_MSE)
    _fit(by_arrays, x, y, sample_weight=weights.numpy(), batch_size=8, shuffle=False, loss=PER_SAMPLE_MSE)
    for a, b in zip(by_loader.parameters(), by_arrays.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)


@pytest.mark.parametrize("one_hot", [False, True])
def test_class_weight_becomes_per_sample_weights(one_hot: bool) -> None:
    x, _ = _data()
    labels = torch.arange(40) % 3
    class_weight = {0: 0.5, 2: 4.0}  # class 1 is missing: weight 1
    weights = torch.tensor([class_weight.get(int(c), 1.0) for c in labels])
    torch.manual_seed(0)
    by_loader = torch.nn.Linear(4, 3)
    by_arrays = torch.nn.Linear(4, 3)
    by_arrays.load_state_dict(by_loader.state_dict())
    targets = F.one_hot(labels, 3).float() if one_hot else labels
    loss = PER_SAMPLE_CE
    _fit(by_loader, DataLoader(TensorDataset(x, targets, weights), batch_size=8), loss=loss)
    _fit(by_arrays, x, targets, class_weight=class_weight, batch_size=8, shuffle=False, loss=loss)
    for a, b in zip(by_loader.parameters(), by_arrays.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def _three_classes(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(7))
    return x, torch.arange(n) % 3


def test_class_weight_does_not_weigh_the_validation_split() -> None:
    # Keras 3 applies class_weight to training only: val_loss is the plain mean loss of the held-out
    # samples. lr=0 keeps the model as it is, so the expected value is computed with the same weights.
    x, labels = _three_classes()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    history = tc.fit(
        model, x, labels, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=PER_SAMPLE_CE,
        class_weight={0: 1.0, 1: 3.0, 2: 0.5}, validation_split=0.25, batch_size=8, verbose=0,
    )
    with torch.no_grad():
        per_sample = PER_SAMPLE_CE(model(x[30:]), labels[30:])
    assert history.history["val_loss"][0] == pytest.approx(per_sample.mean().item(), rel=1e-6)
    weighted = per_sample * torch.tensor([1.0, 3.0, 0.5])[labels[30:]]
    assert abs(weighted.mean().item() - per_sample.mean().item()) > 1e-3  # the test tells them apart


def test_class_weight_trains_on_the_training_split_weighted_by_class() -> None:
    # the training samples (the first 30) still weigh their class's weight
    x, labels = _three_classes()
    class_weight = {0: 1.0, 1: 3.0, 2: 0.5}
    torch.manual_seed(0)
    by_loader, by_arrays = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    by_arrays.load_state_dict(by_loader.state_dict())
    weights = torch.tensor([class_weight[int(c)] for c in labels[:30]])
    _fit(by_loader, DataLoader(TensorDataset(x[:30], labels[:30], weights), batch_size=8), loss=PER_SAMPLE_CE)
    _fit(by_arrays, x, labels, class_weight=class_weight, validation_split=0.25, batch_size=8, shuffle=False,
         loss=PER_SAMPLE_CE)
    assert _same_weights(by_loader, by_arrays)


def test_sample_weight_is_split_along_for_validation_and_a_tuple_without_weights_is_unweighted() -> None:
    x, labels = _three_classes()
    weights = torch.rand(40, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    history = tc.fit(
        model, x, labels, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=PER_SAMPLE_CE,
        sample_weight=weights, validation_split=0.25, batch_size=40, verbose=0,
    )
    with torch.no_grad():
        per_sample = PER_SAMPLE_CE(model(x[30:]), labels[30:])
    assert history.history["val_loss"][0] == pytest.approx((per_sample * weights[30:]).mean().item(), rel=1e-6)
    for given in ({"class_weight": {1: 3.0}}, {"sample_weight": weights[:30]}):
        history = tc.fit(
            model, x[:30], labels[:30], optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=PER_SAMPLE_CE,
            validation_data=(x[30:], labels[30:]), batch_size=40, verbose=0, **given,
        )
        assert history.history["val_loss"][0] == pytest.approx(per_sample.mean().item(), rel=1e-6), given


def test_class_weights_to_sample_weights_follows_keras() -> None:
    assert torch.equal(class_weights_to_sample_weights(np.array([0, 1, 1, 2]), {1: 3.0}), torch.tensor([1.0, 3.0, 3.0, 1.0]))
    assert torch.equal(class_weights_to_sample_weights(torch.tensor([[0.0], [2.0]]), {2: 5.0}), torch.tensor([1.0, 5.0]))
    one_hot = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert torch.equal(class_weights_to_sample_weights(one_hot, {0: 2.0}), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="single target"):
        class_weights_to_sample_weights((torch.zeros(2), torch.zeros(2)), {0: 1.0})


def test_class_weight_with_a_mean_loss_names_the_per_sample_requirement() -> None:
    x, _ = _data()
    with pytest.raises(ValueError, match="^loss: class_weight was given, so .* one value per sample"):
        _fit(torch.nn.Linear(4, 3), x, torch.arange(40) % 3, loss=F.cross_entropy, class_weight={0: 2.0})
    with pytest.raises(ValueError, match="^loss: sample_weight was given, so .* one value per sample"):
        _fit(torch.nn.Linear(4, 3), x, torch.arange(40) % 3, loss=F.cross_entropy, sample_weight=torch.ones(40))
    with pytest.raises(ValueError, match="^loss: sample_weight was given, so .* one value per sample"):
        tc.evaluate(torch.nn.Linear(4, 3), x, torch.arange(40) % 3, loss=F.cross_entropy, sample_weight=torch.ones(40),
                    verbose=0)
    loader = DataLoader(TensorDataset(x, torch.arange(40) % 3, torch.ones(40)), batch_size=8)
    with pytest.raises(ValueError, match="^loss: the batch has sample_weight, so .* one value per sample"):
        _fit(torch.nn.Linear(4, 3), loader, loss=F.cross_entropy)


# -- dtypes: arrays are cast to the model's, a loader's batches are not --------------------------------
def test_floating_arrays_are_cast_to_the_model_dtype() -> None:
    x, y = _data()
    for model in (seeded_model(), seeded_model().double()):
        dtype = next(model.parameters()).dtype
        for given_x, given_y in ((x.double().numpy(), y.double().numpy()), (x.double(), y.double()), (x, y)):
            history = _fit(model, given_x, given_y, validation_split=0.25, batch_size=8)
            assert len(history.history["val_loss"]) == 1
            assert tc.evaluate(model, given_x, given_y, loss=F.mse_loss, verbose=0) > 0
            assert tc.predict(model, given_x, verbose=0).dtype == dtype
    same = x.numpy()
    assert _fit(seeded_model(), same, y.numpy()) is not None and same.dtype == np.float32  # shared, not cast


def test_a_loader_of_another_floating_dtype_is_a_type_error_naming_x_and_the_dtypes() -> None:
    x, y = _data()
    model = seeded_model()
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(TensorDataset(x.double(), y), batch_size=8)
    message = r"^x: the batches' inputs are torch.float64 but the model's parameters are torch.float32"
    with pytest.raises(TypeError, match=message) as raised:
        _fit(model, loader)
    assert isinstance(raised.value.__cause__, RuntimeError)  # torch's error stays chained
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # nothing trained
    with pytest.raises(TypeError, match=r"^validation_data: the batches' inputs are torch.float64"):
        _fit(model, DataLoader(TensorDataset(x, y), batch_size=8), validation_data=loader)
    with pytest.raises(TypeError, match=message):
        tc.evaluate(model, loader, loss=F.mse_loss, verbose=0)
    with pytest.raises(TypeError, match=message):
        tc.predict(model, DataLoader(TensorDataset(x.double()), batch_size=8), verbose=0)
    with pytest.raises(TypeError, match=message):  # the weighted path, and under autocast
        _fit(model, DataLoader(TensorDataset(x.double(), y, torch.ones(40)), batch_size=8), loss=PER_SAMPLE_MSE)
    with pytest.raises(TypeError, match=r"^x: the batches' inputs are torch.float64 but the model's parameters are"):
        _fit(model, loader, amp_dtype=torch.bfloat16)


def test_other_errors_of_the_forward_pass_through_unchanged() -> None:
    x, y = _data()
    with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied"):
        _fit(seeded_model(), DataLoader(TensorDataset(torch.zeros(8, 3), torch.zeros(8, 1)), batch_size=8))


    class CastsWrongly(torch.nn.Module):  # a dtype error of the model's own making: x is not to blame
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.linear(inputs.double())

    with pytest.raises(RuntimeError, match="^mat1 and mat2 must have the same dtype"):
        _fit(CastsWrongly(), DataLoader(TensorDataset(x, y), batch_size=8))


# -- evaluate and predict --------------------------------------------------------------------------------
def test_evaluate_and_predict_on_arrays_equal_the_loader_results() -> None:
    x, y = _data(45)
    model = seeded_model()
    on_loader = tc.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=32), loss=F.mse_loss, verbose=0)
    on_arrays = tc.evaluate(model, x.numpy(), y.numpy(), loss=F.mse_loss, verbose=0)
    assert on_arrays == pytest.approx(on_loader, rel=1e-6)
    assert tc.evaluate(model, x, y, batch_size=4, loss=F.mse_loss, verbose=0) == pytest.approx(on_loader, rel=1e-5)
    weights = torch.zeros(45)
    weights[:5] = 1.0
    weighted = tc.evaluate(model, x, y, sample_weight=weights, batch_size=45, loss=PER_SAMPLE_MSE, verbose=0)
    with torch.no_grad():
        assert weighted == pytest.approx((PER_SAMPLE_MSE(model(x), y)[:5].sum() / 45).item(), rel=1e-5)
    predicted = tc.predict(model, x, batch_size=4, verbose=0)
    with torch.no_grad():
        assert torch.allclose(predicted, model(x))


# -- errors ------------------------------------------------------------------------------------------------
def test_a_loader_with_y_or_array_options_is_a_type_error_naming_them() -> None:
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(TypeError, match=r"fit: y given, but x is DataLoader"):
        _fit(seeded_model(), loader, y)
    with pytest.raises(TypeError, match=r"fit: batch_size, validation_split given"):
        _fit(seeded_model(), loader, batch_size=8, validation_split=0.2)
    with pytest.raises(TypeError, match=r"fit: class_weight given"):
        _fit(seeded_model(), loader, class_weight={0: 1.0})
    with pytest.raises(TypeError, match=r"evaluate: y given, but x is DataLoader"):
        tc.evaluate(seeded_model(), loader, y, loss=F.mse_loss, verbose=0)
    with pytest.raises(TypeError, match=r"predict: batch_size given, but x is DataLoader"):
        tc.predict(seeded_model(), loader, batch_size=4, verbose=0)


def test_argument_errors_of_array_data() -> None:
    x, y = _data()
    with pytest.raises(TypeError, match=r"y \(the targets\) is required"):
        _fit(seeded_model(), x)
    with pytest.raises(ValueError, match="class_weight and sample_weight"):
        _fit(seeded_model(), x, y, class_weight={0: 1.0}, sample_weight=torch.ones(40))
    with pytest.raises(ValueError, match="validation_split and validation_data"):
        _fit(seeded_model(), x, y, validation_split=0.2, validation_data=(x, y))
    with pytest.raises(ValueError, match="validation_split: expected a fraction"):
        _fit(seeded_model(), x, y, validation_split=1.0)
    with pytest.raises(ValueError, match="too few to split"):
        _fit(seeded_model(), x[:1], y[:1], validation_split=0.5)
    with pytest.raises(ValueError, match=r"different numbers of samples \(x: 40; y: 39\)"):
        _fit(seeded_model(), x, y[:39])
    with pytest.raises(ValueError, match="batch_size: expected None or an integer >= 1"):
        _fit(seeded_model(), x, y, batch_size=0)


def test_a_loader_keeps_working_without_y() -> None:
    x, y = _data()
    model = seeded_model()
    history = _fit(model, DataLoader(TensorDataset(x, y), batch_size=8), epochs=2)
    assert len(history.history["loss"]) == 2


# -- exact resume --------------------------------------------------------------------------------------
def _train_arrays(tmp_path: Path | None, extra: list[tc.Callback], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
    x, y = _data(50)
    callbacks = [*extra, *([tc.BackupAndRestore(tmp_path, save_freq=1)] if tmp_path is not None else [])]
    tc.fit(model, x.numpy(), y.numpy(), batch_size=8, shuffle=True, validation_split=0.2, epochs=3, verbose=0,
           optimizer=torch.optim.Adam(model.parameters(), lr=0.01), loss=F.mse_loss, callbacks=callbacks)
    return model


@pytest.mark.parametrize("crash_at", [3, 7, 11])
def test_resume_of_a_shuffled_array_fit_is_exact(tmp_path: Path, crash_at: int) -> None:
    reference = _train_arrays(None, [], seed=0)
    with pytest.raises(RuntimeError, match="crash"):
        _train_arrays(tmp_path, [Crash(crash_at)], seed=0)
    resumed = _train_arrays(tmp_path, [], seed=1234)  # fresh objects, another seed: everything restored
    assert _same_weights(reference, resumed)


def test_under_a_process_group_each_process_reads_its_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Array data under torch.distributed gets a DistributedSampler: the shards of two processes
    cover the samples, and fit's set_sampler_epoch gives each epoch its own order."""
    from torchcallbacks.training import arrays

    x, y = _data(20)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(arrays, "is_distributed", lambda: True)
        monkeypatch.setattr(arrays, "get_world_size", lambda: 2)
        monkeypatch.setattr(arrays, "get_rank", lambda rank=rank: rank)
        loader = arrays.array_loader((x, y), ("x", "y"), batch_size=4, shuffle=True)
        first = torch.cat([bx for bx, _ in loader])
        loader.sampler.set_epoch(1)  # type: ignore[attr-defined]
        second = torch.cat([bx for bx, _ in loader])
        assert len(first) == 10 and not torch.equal(first, second)
        shards.append(first)
    both = torch.cat(shards)
    assert torch.equal(both[both[:, 0].argsort()], x[x[:, 0].argsort()])
