"""SwapEMAWeights: the EMA values, swapping in and out around evaluate/predict/validation, epoch swaps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression, train_epoch_by_hand

import torchcallbacks
from torchcallbacks import CallbackList, LambdaCallback, SwapEMAWeights


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(a[k], b[k]) for k in a)


def ema_weights(callback: SwapEMAWeights) -> dict[str, torch.Tensor]:
    assert callback.ema_model is not None
    return weights(callback.ema_model.module)


def fit_with(callbacks: list[Any], epochs: int = 2, model: torch.nn.Module | None = None, **kwargs: Any) -> torch.nn.Module:
    model = model or make_model()
    torchcallbacks.fit(
        model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.05), loss=F.mse_loss,
        epochs=epochs, verbose=0, callbacks=callbacks, **kwargs,
    )
    return model


def test_ema_values_are_exact() -> None:
    model = torch.nn.Linear(3, 2)
    ema = SwapEMAWeights(decay=0.75)
    callbacks = CallbackList([ema], model=model)
    callbacks.on_train_begin()
    history = []
    for step in range(3):
        with torch.no_grad():
            model.weight.copy_(torch.full((2, 3), float(step * 4)))
            model.bias.copy_(torch.full((2,), float(-step)))
        history.append(weights(model))
        callbacks.on_train_batch_end(step, {})
    # the first update copies; then ema = lerp(ema, w, 1 - decay)
    expected = history[0]
    for w in history[1:]:
        expected = {k: torch.lerp(expected[k], w[k], 0.25) for k in w}
    assert_same(ema_weights(ema), expected)
    assert expected["weight"][0, 0].item() == 0.75 * 0.25 * 4 + 0.25 * 8  # (0 -> 1 -> 2.75)
    assert ema.num_updates == 3
    assert ema.ema_model is not None and int(ema.ema_model.n_averaged) == 3


def test_evaluate_and_predict_use_the_ema_and_swap_back_out() -> None:
    ema = SwapEMAWeights(decay=0.5)
    model = fit_with([ema])
    raw, averaged = weights(model), ema_weights(ema)
    assert_differ(raw, averaged)

    seen: list[dict[str, torch.Tensor]] = []
    capture = LambdaCallback(
        on_test_batch_begin=lambda batch, logs: seen.append(weights(model)),
        on_predict_batch_begin=lambda batch, logs: seen.append(weights(model)),
    )
    loss = torchcallbacks.evaluate(model, make_regression(), loss=F.mse_loss, verbose=0, callbacks=[ema, capture])
    assert_same(seen[0], averaged)
    assert_same(weights(model), raw)
    assert_same(ema_weights(ema), averaged)
    assert ema.ema_model is not None
    assert loss == pytest.approx(
        torchcallbacks.evaluate(ema.ema_model.module, make_regression(), loss=F.mse_loss, verbose=0)
    )

    seen.clear()
    outputs = torchcallbacks.predict(model, make_regression(), verbose=0, callbacks=[ema, capture])
    assert_same(seen[0], averaged)
    assert_same(weights(model), raw)  # Keras leaves the EMA weights in the model here
    assert_same(ema_weights(ema), averaged)
    assert torch.equal(outputs, torchcallbacks.predict(ema.ema_model.module, make_regression(), verbose=0))


def test_validation_inside_fit_uses_the_ema() -> None:
    ema = SwapEMAWeights(decay=0.5)
    during_validation: list[dict[str, torch.Tensor]] = []
    at_epoch_end: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    model = make_model()
    probe = LambdaCallback(
        on_test_batch_begin=lambda batch, logs: during_validation.append(weights(model)),
        on_epoch_end=lambda epoch, logs: at_epoch_end.append((weights(model), ema_weights(ema))),
    )
    fit_with([ema, probe], epochs=2, model=model, validation_data=make_regression(n=16))
    for validated, (model_weights, averaged) in zip(during_validation, at_epoch_end, strict=True):
        assert_same(validated, averaged)
        assert_differ(model_weights, averaged)  # swapped back out before the epoch end


def test_swapping_changes_nothing_about_training() -> None:
    torch.manual_seed(0)
    plain = fit_with([], epochs=3)
    for ema in (SwapEMAWeights(), SwapEMAWeights(swap_on_epoch=True)):
        torch.manual_seed(0)
        model = fit_with([ema], epochs=3, validation_data=make_regression(n=16))
        assert_same(weights(model), weights(plain))
        assert not ema.ema_weights_in_model


def test_swap_on_epoch_shows_the_ema_to_later_callbacks() -> None:
    ema = SwapEMAWeights(swap_on_epoch=True, decay=0.5)
    model = make_model()
    at_end: list[dict[str, torch.Tensor]] = []
    at_begin: list[dict[str, torch.Tensor]] = []
    raw_at_end: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(epoch: int, logs: Any) -> None:
        at_end.append(weights(model))
        raw_at_end.append(ema_weights(ema))  # while swapped, the EMA module holds the training weights

    probe = LambdaCallback(on_epoch_end=on_epoch_end, on_epoch_begin=lambda e, logs: at_begin.append(weights(model)))
    fit_with([ema, probe], epochs=3, model=model)
    # what the probe saw at the start of epochs 1 and 2 is the training weights of the epoch before
    assert_same(at_begin[1], raw_at_end[0])
    assert_same(at_begin[2], raw_at_end[1])
    assert_same(weights(model), raw_at_end[2])
    assert_differ(at_end[2], raw_at_end[2])
    assert_same(ema_weights(ema), at_end[2])


@pytest.mark.parametrize("swap_on_epoch", [False, True])
def test_use_ema_at_end_leaves_the_ema_in_the_model(swap_on_epoch: bool) -> None:
    ema = SwapEMAWeights(swap_on_epoch=swap_on_epoch, use_ema_at_end=True, decay=0.5)
    last: list[dict[str, torch.Tensor]] = []
    model = make_model()

    def on_train_batch_end(batch: int, logs: Any) -> None:
        last[:] = [ema_weights(ema)]

    fit_with([ema, LambdaCallback(on_train_batch_end=on_train_batch_end)], model=model)
    assert_same(weights(model), last[0])
    assert_same(ema_weights(ema), last[0])
    assert not ema.ema_weights_in_model


def test_batch_norm_buffers_are_averaged_and_counters_follow() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    ema = SwapEMAWeights(decay=0.5)
    fit_with([ema], epochs=1, model=model)
    assert ema.ema_model is not None
    bn_model, bn_ema = model[1], ema.ema_model.module[1]
    assert not torch.equal(bn_model.running_mean, bn_ema.running_mean)
    assert int(bn_ema.num_batches_tracked) == int(bn_model.num_batches_tracked) == 4

    frozen = SwapEMAWeights(decay=0.5, use_buffers=False)
    fit_with([frozen], epochs=1, model=model)
    assert frozen.ema_model is not None
    assert torch.equal(frozen.ema_model.module[1].running_mean, model[1].running_mean)


def test_hand_written_loop() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = SwapEMAWeights(decay=0.5)
    callbacks = CallbackList([ema], model=model, optimizer=optimizer)
    loader = make_regression()
    callbacks.on_train_begin()
    for epoch in range(2):
        callbacks.on_epoch_begin(epoch)
        loss = train_epoch_by_hand(callbacks, model, optimizer, loader)
        raw, averaged = weights(model), ema_weights(ema)
        callbacks.on_test_begin()
        assert_same(weights(model), averaged)
        with torch.no_grad():
            val_loss = sum(F.mse_loss(model(x), y) for x, y in loader)
        callbacks.on_test_end({"loss": float(val_loss)})
        assert_same(weights(model), raw)
        callbacks.on_epoch_end(epoch, {"loss": loss.item(), "val_loss": float(val_loss)})
    callbacks.on_train_end()
    assert ema.num_updates == 8


def test_before_training_evaluate_uses_the_models_own_weights() -> None:
    model = make_model()
    ema = SwapEMAWeights()
    before = weights(model)
    torchcallbacks.evaluate(model, make_regression(), loss=F.mse_loss, verbose=0, callbacks=[ema])
    assert ema.ema_model is None
    assert_same(weights(model), before)


def test_ema_of_another_model_is_an_error() -> None:
    ema = SwapEMAWeights()
    fit_with([ema], epochs=1)
    with pytest.raises(ValueError, match="EMA of another model"):
        torchcallbacks.evaluate(make_model(), make_regression(), loss=F.mse_loss, verbose=0, callbacks=[ema])


def test_a_new_model_in_fit_gets_a_new_ema() -> None:
    ema = SwapEMAWeights()
    first = fit_with([ema], epochs=1)
    second = fit_with([ema], epochs=1)
    assert first is not second
    assert ema.num_updates == 4


def test_decay_must_be_in_range() -> None:
    with pytest.raises(ValueError, match="decay"):
        SwapEMAWeights(decay=1.5)
    with pytest.raises(TypeError, match="decay"):
        SwapEMAWeights(decay="0.9")  # type: ignore[arg-type]
