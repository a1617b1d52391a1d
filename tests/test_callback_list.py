"""CallbackList: construction, defaults, dispatch, stopping, state, hand-written loops."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_regression, run_epochs

from torchcallbacks import Callback, CallbackList, EarlyStopping, History, LambdaCallback, ProgbarLogger
from torchcallbacks.callbacks.callback import HOOK_ALIASES, HOOKS


class Recorder(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end {epoch}")


def test_nested_lists_are_flattened_and_defaults_appended_once() -> None:
    a, b, c = Recorder(), Recorder(), Recorder()
    callbacks = CallbackList([a, [b, [c]]], add_history=True, add_progbar=True)
    assert callbacks.callbacks[:3] == [a, b, c]
    assert isinstance(callbacks.callbacks[3], History) and isinstance(callbacks.callbacks[4], ProgbarLogger)
    assert callbacks.history is callbacks.callbacks[3]

    history, progbar = History(), ProgbarLogger()
    callbacks = CallbackList([progbar, a, history], add_history=True, add_progbar=True)
    assert callbacks.callbacks == [progbar, a, history]
    assert callbacks.history is history


def test_append_adds_and_wires_a_callback() -> None:
    model = make_model()
    callbacks = CallbackList(model=model, epochs=3)
    recorder = Recorder()
    callbacks.append(recorder)
    assert len(callbacks) == 1 and list(callbacks) == [recorder]
    assert recorder.model is model and recorder.params == {"epochs": 3}
    callbacks.on_epoch_end(0)
    assert recorder.calls == ["epoch_end 0"]


def test_non_callbacks_are_rejected_with_their_type() -> None:
    with pytest.raises(TypeError, match=r"callbacks: expected torchcallbacks.Callback instances, received function"):
        CallbackList([lambda: None])
    with pytest.raises(TypeError, match="received str"):
        CallbackList().append("early_stopping")  # type: ignore[arg-type]


def test_hooks_nobody_overrides_are_skipped_at_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatching calls a callback's hook only where it does something: an override, an instance
    attribute (LambdaCallback), or an override of the Keras alias (`on_batch_end` for
    `on_train_batch_end`). The base class's no-op hooks are replaced by ones that record being
    reached; only the alias path may reach one."""
    lambda_calls = []
    recorder = Recorder()
    lam = LambdaCallback(on_batch_end=lambda batch, logs: lambda_calls.append(batch))
    plain = Callback()
    reached = []
    for hook in (*HOOKS, *HOOK_ALIASES.values()):
        original = getattr(Callback, hook)

        def recording(self, *args, _hook=hook, _original=original, **kwargs):
            reached.append((type(self).__name__, _hook))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Callback, hook, recording)
    callbacks = CallbackList([recorder, lam, plain])
    for hook in HOOKS:
        index = (0,) if "batch" in hook or "epoch" in hook else ()
        getattr(callbacks, hook)(*index, {"loss": 1.0})
    assert recorder.calls == ["epoch_end 0"]
    assert lambda_calls == [0]
    assert reached == [("LambdaCallback", "on_train_batch_end")]  # the base hook that calls the alias


def test_stop_training_through_the_model_or_the_list() -> None:
    model = make_model()
    callbacks = CallbackList(model=model)
    assert not callbacks.stop_training
    model.stop_training = True
    assert callbacks.stop_training
    callbacks.stop_training = False
    assert not callbacks.stop_training and model.stop_training is False
    callbacks.stop_training = True
    assert model.stop_training is True
    without_model = CallbackList()
    without_model.stop_training = True
    assert without_model.stop_training


def test_on_train_end_runs_every_callback_and_reraises_the_first_error() -> None:
    closed = []

    def fail(logs):
        raise RuntimeError("first")

    callbacks = CallbackList([
        LambdaCallback(on_train_end=fail),
        LambdaCallback(on_train_end=lambda logs: closed.append("second")),
    ])
    with pytest.raises(RuntimeError, match="first"):
        callbacks.on_train_end()
    assert closed == ["second"]


def test_state_dict_collects_stateful_callbacks() -> None:
    class Counter(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def on_epoch_end(self, epoch, logs=None):
            self.count += 1

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state_dict):
            self.count = state_dict["count"]

    callbacks = CallbackList([Recorder(), Counter()])
    callbacks.on_epoch_end(0)
    callbacks.on_epoch_end(1)
    state = callbacks.state_dict()
    assert state == {"Counter": {"count": 2}}  # by state key, not by position
    fresh = CallbackList([Recorder(), Counter()])
    fresh.load_state_dict(state)
    assert fresh.callbacks[1].count == 2


def test_hand_written_loop_with_the_same_callbacks() -> None:
    """The hand-written loop of the README and docs/architecture.md: tensors in batch logs, Keras stop idiom, History."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = make_regression()

    class StopAfterTwoEpochs(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    batch_losses = []
    history = History()
    callbacks = CallbackList(
        [StopAfterTwoEpochs(), LambdaCallback(on_train_batch_end=lambda b, logs: batch_losses.append(logs["loss"]))],
        model=model, optimizer=optimizer, epochs=5, steps=len(loader),
    )
    callbacks.append(history)
    callbacks.on_train_begin()
    epochs_run = 0
    for epoch in range(5):
        callbacks.on_epoch_begin(epoch)
        total = torch.zeros(())
        for i, (x, y) in enumerate(loader):
            callbacks.on_train_batch_begin(i)
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            callbacks.on_train_batch_end(i, {"loss": loss.detach()})
        callbacks.on_epoch_end(epoch, {"loss": total / len(loader)})
        epochs_run += 1
        if callbacks.stop_training:
            break
    callbacks.on_train_end()
    assert epochs_run == 2
    assert history.epoch == [0, 1]
    assert len(history.history["loss"]) == 2 and all(isinstance(v, float) for v in history.history["loss"])
    assert len(batch_losses) == 2 * len(loader) and isinstance(batch_losses[0], torch.Tensor)
    assert callbacks.loop.global_step == 2 * len(loader)


def test_a_second_hand_written_run_on_the_same_model_is_not_stopped_by_the_first() -> None:
    """`fit` resets `model.stop_training` before `on_train_begin`; a hand-written loop only has the
    `CallbackList`, so its `on_train_begin` must reset it too, else a model stopped once (by
    EarlyStopping, in fit or in an earlier loop) stops every later hand-written run after one epoch."""
    model = make_model()
    first = CallbackList([EarlyStopping(monitor="loss", patience=0)], model=model)
    assert run_epochs(first, [1.0, 2.0, 3.0]) == 2
    assert model.stop_training is True
    second = CallbackList([History()], model=model)
    assert run_epochs(second, [1.0, 2.0, 3.0]) == 3


def test_a_stop_asked_in_on_train_begin_is_kept() -> None:
    """The reset happens before the callbacks' `on_train_begin`, so one that stops there is obeyed."""
    model = make_model()
    callbacks = CallbackList(
        [LambdaCallback(on_train_begin=lambda logs: setattr(model, "stop_training", True))], model=model
    )
    assert run_epochs(callbacks, [1.0, 2.0]) == 1


class BatchWork(Callback):
    """Does batch work for a given number of epochs, then calls its batch hook idle."""

    def __init__(self, busy_epochs: int) -> None:
        super().__init__()
        self.busy_epochs = busy_epochs
        self.batches: list[tuple[int, int]] = []

    def idle_hooks(self) -> frozenset[str]:
        return frozenset({"on_train_batch_end"}) if self.loop.epoch >= self.busy_epochs else frozenset()

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append((self.loop.epoch, batch))


def test_idle_hooks_are_not_called_and_are_read_again_after_every_epoch_begin() -> None:
    work = BatchWork(busy_epochs=1)
    seen: list[bool] = []
    callbacks = CallbackList([work, LambdaCallback(on_train_batch_begin=lambda batch, logs: seen.append(callbacks.has_hook("on_train_batch_end")))])

    def run() -> None:  # a hand-written loop of 3 epochs of 2 batches
        callbacks.on_train_begin()
        for epoch in range(3):
            callbacks.on_epoch_begin(epoch)
            for batch in range(2):
                callbacks.on_train_batch_begin(batch)
                callbacks.on_train_batch_end(batch, {"loss": 1.0})
            callbacks.on_epoch_end(epoch, {"loss": 1.0})
        callbacks.on_train_end()

    run()
    assert work.batches == [(0, 0), (0, 1)]  # busy in epoch 0 only
    assert seen == [True, True, False, False, False, False]  # so fit builds no batch logs once it is idle
    work.busy_epochs = 3
    run()  # a new run reads it again from its begin
    assert work.batches[2:] == [(e, b) for e in range(3) for b in range(2)]
