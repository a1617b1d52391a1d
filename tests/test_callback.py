"""The Callback base: hooks, aliases, wiring, state."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from torchcallbacks import Callback, CallbackList, LoopState
from torchcallbacks.callbacks.callback import HOOKS, overrides


def test_every_keras_hook_exists_and_does_nothing() -> None:
    callback = Callback()
    for hook in HOOKS:
        args = (0, {}) if "epoch_" in hook or "batch_" in hook else ({},)
        assert getattr(callback, hook)(*args) is None
    assert callback.state_dict() == {}
    callback.load_state_dict({})


def test_on_batch_aliases_are_called_by_train_batch_hooks() -> None:
    seen = []

    class Alias(Callback):
        def on_batch_begin(self, batch, logs=None):
            seen.append(("begin", batch))

        def on_batch_end(self, batch, logs=None):
            seen.append(("end", batch, dict(logs or {})))

    callback = Alias()
    callback.on_train_batch_begin(3)
    callback.on_train_batch_end(3, {"loss": 1.0})
    callback.on_test_batch_begin(4)  # not an alias
    assert seen == [("begin", 3), ("end", 3, {"loss": 1.0})]
    assert overrides(callback, "on_train_batch_end") and not overrides(callback, "on_test_batch_end")


def test_model_is_unwrapped_and_missing_model_is_a_clear_error() -> None:
    callback = Callback()
    with pytest.raises(AttributeError, match="model is not set"):
        _ = callback.model
    model = make_model()
    callback.set_model(torch.nn.DataParallel(model))
    assert callback.model is model


def test_callbacks_see_optimizer_params_and_loop_counters() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((self.loop.epoch, self.loop.batch, self.loop.global_step, self.optimizer, self.params))

    probe = Probe()
    callbacks = CallbackList([probe], model=model, optimizer=optimizer, epochs=2, steps=2)
    assert isinstance(probe.loop, LoopState) and probe.loop is callbacks.loop
    callbacks.on_train_begin()
    for epoch in range(2):
        callbacks.on_epoch_begin(epoch)
        for batch in range(2):
            callbacks.on_train_batch_begin(batch)
            callbacks.on_train_batch_end(batch)
    params = {"epochs": 2, "steps": 2}
    assert seen == [
        (0, 0, 1, optimizer, params),
        (0, 1, 2, optimizer, params),
        (1, 0, 3, optimizer, params),
        (1, 1, 4, optimizer, params),
    ]
