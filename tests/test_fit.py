"""fit: the Keras call order, params, stopping, validation, data forms, AMP, clipping, custom steps."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression, off_device
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc
from torchcallbacks.callbacks.callback import HOOKS


class Trace(tc.Callback):
    """Records every hook call (with its index), and stops where it is told to."""

    def __init__(self, stop_at_batch: tuple[int, int] | None = None, stop_at_epoch: int | None = None) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.stop_at_batch = stop_at_batch
        self.stop_at_epoch = stop_at_epoch
        self.params_seen: list[dict] = []
        for hook in HOOKS:
            setattr(self, hook, functools.partial(self._record, hook))

    def _record(self, hook, *args, **kwargs):
        index = args[0] if args and isinstance(args[0], int) else None
        self.calls.append(hook if index is None else f"{hook} {index}")
        if hook == "on_train_begin":
            self.params_seen.append(dict(self.params))
        if hook == "on_train_batch_end" and self.stop_at_batch == (self.loop.epoch, index):
            self.model.stop_training = True
        if hook == "on_epoch_end" and self.stop_at_epoch == index:
            self.model.stop_training = True


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01)


def test_hook_order_with_validation_and_a_mid_epoch_stop() -> None:
    model = make_model()
    trace = Trace(stop_at_batch=(1, 1))
    tc.fit(model, make_regression(n=48, batch_size=16), optimizer=_sgd(model), loss=F.mse_loss, epochs=5,
           validation_data=make_regression(n=32, batch_size=16), callbacks=[trace], verbose=0)
    validation = ["on_test_begin", "on_test_batch_begin 0", "on_test_batch_end 0",
                  "on_test_batch_begin 1", "on_test_batch_end 1", "on_test_end"]
    expected = [
        "on_train_begin",
        "on_epoch_begin 0",
        "on_train_batch_begin 0", "on_train_batch_end 0",
        "on_train_batch_begin 1", "on_train_batch_end 1",
        "on_train_batch_begin 2", "on_train_batch_end 2",
        *validation,
        "on_epoch_end 0",
        "on_epoch_begin 1",
        "on_train_batch_begin 0", "on_train_batch_end 0",
        "on_train_batch_begin 1", "on_train_batch_end 1",
        *validation,
        "on_epoch_end 1",
        "on_train_end",
    ]
    assert trace.calls == expected


def test_params_passed_to_callbacks() -> None:
    model = make_model()
    trace = Trace()
    tc.fit(model, make_regression(n=64, batch_size=16), optimizer=_sgd(model), loss=F.mse_loss, epochs=3,
           callbacks=[trace], verbose=2, metrics={"mae": F.l1_loss})
    assert trace.params_seen == [{"verbose": 2, "epochs": 3, "steps": 4, "metric_directions": {"mae": None}, "loss": "mse_loss"}]

    trace = Trace()
    tc.fit(model, make_regression(n=64, batch_size=16), optimizer=_sgd(model), loss=F.mse_loss, epochs=2,
           steps_per_epoch=3, callbacks=[trace], verbose="auto")
    assert trace.params_seen[0]["steps"] == 3 and trace.params_seen[0]["verbose"] == 1


def test_stop_at_epoch_end_and_stop_flag_reset_by_the_next_fit() -> None:
    model = make_model()
    trace = Trace(stop_at_epoch=1)
    history = tc.fit(model, make_regression(), optimizer=_sgd(model), loss=F.mse_loss, epochs=10,
                     callbacks=[trace], verbose=0)
    assert history.epoch == [0, 1]
    assert model.stop_training is True
    history = tc.fit(model, make_regression(), optimizer=_sgd(model), loss=F.mse_loss, epochs=3, verbose=0)
    assert history.epoch == [0, 1, 2]


def test_history_holds_epoch_means_weighted_by_batch_size_and_val_values() -> None:
    model = make_model()
    # 40 samples in batches of 16: sizes 16, 16, 8. SGD with lr 0 keeps the weights fixed.
    loader = make_regression(n=40, batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    history = tc.fit(model, loader, optimizer=optimizer, loss=F.mse_loss, metrics=[F.l1_loss], epochs=2,
                     validation_data=loader, verbose=0)
    x, y = loader.dataset.tensors
    with torch.no_grad():
        expected_loss = F.mse_loss(model(x), y).item()
        expected_mae = F.l1_loss(model(x), y).item()
    assert set(history.history) == {"loss", "l1_loss", "val_loss", "val_l1_loss"}
    for key, expected in [("loss", expected_loss), ("l1_loss", expected_mae),
                          ("val_loss", expected_loss), ("val_l1_loss", expected_mae)]:
        assert history.history[key] == pytest.approx([expected, expected], rel=1e-6)
    # Keras' model.history: the same record, detached from the loop (no callbacks, no optimizer)
    assert model.history.history is history.history and model.history.epoch is history.epoch
    assert not isinstance(model.history, tc.Callback)


def test_validation_freq_int_and_list() -> None:
    model = make_model()
    kwargs = dict(optimizer=_sgd(model), loss=F.mse_loss, epochs=4, validation_data=make_regression(), verbose=0)
    for freq, validated in [(2, [1, 3]), ([1, 4], [0, 3])]:
        trace = Trace()
        tc.fit(model, make_regression(), validation_freq=freq, callbacks=[trace], **kwargs)
        epochs_with_validation = []
        epoch = -1
        for call in trace.calls:
            if call.startswith("on_epoch_begin"):
                epoch = int(call.split()[1])
            if call == "on_test_begin":
                epochs_with_validation.append(epoch)
        assert epochs_with_validation == validated
    with pytest.raises(ValueError, match="validation_freq"):
        tc.fit(model, make_regression(), validation_freq=0, **{k: v for k, v in kwargs.items()})


def test_initial_epoch_and_steps() -> None:
    model = make_model()
    optimizer = _sgd(model)
    optimizer_steps = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: optimizer_steps.append(1))
    trace = Trace()
    history = tc.fit(model, make_regression(n=64, batch_size=16), optimizer=optimizer, loss=F.mse_loss, epochs=4,
                     initial_epoch=2, callbacks=[trace], verbose=0)
    assert history.epoch == [2, 3]
    batches = [f"on_train_batch_{when} {i}" for i in range(4) for when in ("begin", "end")]
    assert trace.calls == ["on_train_begin",
                           "on_epoch_begin 2", *batches, "on_epoch_end 2",
                           "on_epoch_begin 3", *batches, "on_epoch_end 3",
                           "on_train_end"]
    assert trace.params_seen[0]["steps"] == 4 and trace.params_seen[0]["epochs"] == 4
    assert len(optimizer_steps) == 8  # 4 batches in each of the 2 epochs run, none for epochs 0 and 1
    assert trace.loop.global_step == 8  # training batches completed since this fit started


def test_endless_iterable_with_steps_per_epoch_and_validation_steps() -> None:
    model = make_model()
    loader = make_regression(n=32, batch_size=8)
    endless = itertools.cycle(list(loader))
    trace = Trace()
    history = tc.fit(model, endless, optimizer=_sgd(model), loss=F.mse_loss, epochs=3, steps_per_epoch=5,
                     validation_data=itertools.cycle(list(loader)), validation_steps=2, callbacks=[trace], verbose=0)
    assert history.epoch == [0, 1, 2]
    assert trace.calls.count("on_train_batch_end 4") == 3 and "on_train_batch_end 5" not in trace.calls
    assert trace.calls.count("on_test_batch_end 1") == 3 and "on_test_batch_end 2" not in trace.calls
    assert trace.loop.global_step == 15


def test_steps_per_epoch_carries_the_iterator_over_epochs_and_restarts_passes() -> None:
    class Numbered:
        """5 batches per pass, batch i filled with i; counts the passes started (iter() calls)."""

        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([(torch.full((2, 4), float(i)), torch.zeros(2, 1)) for i in range(5)])

    class Recording(torch.nn.Sequential):
        def forward(self, x):
            trained.append(int(x[0, 0]))
            return super().forward(x)

    indices, trained = [], []
    model = Recording(*make_model())
    data = Numbered()
    tc.fit(model, data, optimizer=_sgd(model), loss=F.mse_loss, epochs=3, steps_per_epoch=3, verbose=0,
           callbacks=[tc.LambdaCallback(on_train_batch_begin=lambda b, logs: indices.append(b))])
    assert indices == [0, 1, 2] * 3
    assert trained == [0, 1, 2, 3, 4, 0, 1, 2, 3]  # epoch 1 goes on where epoch 0 stopped
    assert data.passes == 2  # a new pass only when one ends, not every epoch


def test_a_generator_that_runs_dry_stops_training_with_a_warning() -> None:
    model = make_model()
    batches = (batch for batch in make_regression(n=32, batch_size=8))  # 4 batches, one-shot
    with pytest.warns(UserWarning, match="ran out of data"):
        history = tc.fit(model, batches, optimizer=_sgd(model), loss=F.mse_loss, epochs=5, steps_per_epoch=3,
                         verbose=0)
    assert history.epoch == [0, 1]


def test_batches_with_tuple_and_dict_inputs_and_sample_weights() -> None:
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 1)
            self.b = torch.nn.Linear(2, 1)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    left, right, y = torch.randn(12, 3), torch.randn(12, 2), torch.randn(12, 1)
    model = TwoInputs()
    tuples = [((left[i:i + 4], right[i:i + 4]), y[i:i + 4]) for i in range(0, 12, 4)]
    dicts = [({"left": left[i:i + 4], "right": right[i:i + 4]}, y[i:i + 4]) for i in range(0, 12, 4)]
    h1 = tc.fit(model, tuples, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=F.mse_loss, verbose=0)
    h2 = tc.fit(model, dicts, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=F.mse_loss, verbose=0)
    assert h1.history["loss"] == pytest.approx(h2.history["loss"])

    weights = torch.tensor([1.0, 0.0, 2.0, 0.0])
    weighted = [(x, t, weights) for x, t in tuples]
    per_sample = functools.partial(F.mse_loss, reduction="none")
    h3 = tc.fit(model, weighted, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=per_sample,
                verbose=0)
    with torch.no_grad():
        expected = sum(((per_sample(model(*x), t).squeeze(1) * weights).mean()) for x, t in tuples) / 3
    assert h3.history["loss"][0] == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="sample_weight.*one value per sample"):
        tc.fit(model, weighted, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=F.mse_loss, verbose=0)


Target = collections.namedtuple("Target", "value weight")


@dataclasses.dataclass
class Features:
    left: torch.Tensor
    right: torch.Tensor


def test_a_namedtuple_target_and_a_dataclass_input_keep_their_types_through_fit() -> None:
    """The batch reaches the model and the loss with its types: the model reads the dataclass's
    fields, the loss the namedtuple's."""

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 1)
            self.b = torch.nn.Linear(2, 1)

        def forward(self, features: Features) -> torch.Tensor:
            return self.a(features.left) + self.b(features.right)

    def weighted_mse(y_pred: torch.Tensor, y: Target) -> torch.Tensor:
        return ((y_pred - y.value) ** 2 * y.weight).mean()

    left, right, value = torch.randn(12, 3), torch.randn(12, 2), torch.randn(12, 1)
    weight = torch.rand(12, 1)
    model = Model()
    batches = [(Features(left[i:i + 4], right[i:i + 4]), Target(value[i:i + 4], weight[i:i + 4]))
               for i in range(0, 12, 4)]
    history = tc.fit(model, batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=weighted_mse,
                     validation_data=batches, device="cpu", verbose=0)
    with torch.no_grad():
        expected = weighted_mse(model(Features(left, right)), Target(value, weight)).item()  # equal batches
    assert history.history["loss"] == pytest.approx([expected], rel=1e-6)
    assert history.history["val_loss"] == pytest.approx([expected], rel=1e-6)
    assert tc.evaluate(model, batches, loss=weighted_mse, verbose=0) == pytest.approx(expected, rel=1e-6)


def test_train_and_eval_modes_and_no_grad_in_validation() -> None:
    modes = []

    class ModeProbe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x):
            modes.append((self.training, torch.is_grad_enabled()))
            return self.linear(x)

    model = ModeProbe()
    model.eval()
    tc.fit(model, make_regression(n=16, batch_size=8), optimizer=_sgd(model), loss=F.mse_loss,
           validation_data=make_regression(n=8, batch_size=8), verbose=0)
    assert modes == [(True, True), (True, True), (False, False)]
    assert model.training is False  # restored


def test_bfloat16_autocast_on_cpu() -> None:
    dtypes = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x):
            out = self.linear(x)
            dtypes.append(out.dtype)
            return out

    model = Probe()
    history = tc.fit(model, make_regression(n=16, batch_size=8), optimizer=_sgd(model), loss=F.mse_loss,
                     amp_dtype=torch.bfloat16, validation_data=make_regression(n=8, batch_size=8), verbose=0)
    assert dtypes == [torch.bfloat16] * 3
    assert model.linear.weight.dtype == torch.float32
    assert torch.isfinite(torch.tensor(history.history["loss"])).all()


def test_gradient_clipping_by_norm() -> None:
    model = make_model()
    norms = []

    class GradNorm(tc.Callback):
        def on_train_batch_end(self, batch, logs=None):
            grads = [p.grad for p in self.model.parameters()]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    # A huge target makes unclipped gradients far larger than 0.5.
    x = torch.randn(16, 4)
    loader = DataLoader(TensorDataset(x, torch.full((16, 1), 1000.0)), batch_size=8)
    tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=F.mse_loss,
           clip_grad_norm=0.5, callbacks=[GradNorm()], verbose=0)
    assert norms and all(n == pytest.approx(0.5, rel=1e-4) for n in norms)
    norms.clear()
    tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=F.mse_loss,
           callbacks=[GradNorm()], verbose=0)
    assert all(n > 10 for n in norms)


def test_float16_autocast_creates_a_grad_scaler() -> None:
    model = make_model()
    probe = tc.Callback()
    history = tc.fit(model, make_regression(n=16, batch_size=8), optimizer=_sgd(model), loss=F.mse_loss,
                     amp_dtype=torch.float16, verbose=0, callbacks=[probe])
    assert isinstance(probe.loop.scaler, torch.amp.GradScaler)
    assert probe.loop.scaler.get_scale() > 0 and len(history.history["loss"]) == 1


def test_scaler_is_the_name_and_grad_scaler_still_works_with_a_future_warning() -> None:
    model = make_model()
    probe = tc.Callback()
    scaler = torch.amp.GradScaler("cpu")
    tc.fit(model, make_regression(n=16, batch_size=8), optimizer=_sgd(model), loss=F.mse_loss, verbose=0,
           scaler=scaler, callbacks=[probe])
    assert probe.loop.scaler is scaler
    with pytest.warns(FutureWarning, match="fit: grad_scaler= is deprecated, pass scaler="):
        tc.fit(model, make_regression(n=16, batch_size=8), optimizer=_sgd(model), loss=F.mse_loss, verbose=0,
               grad_scaler=scaler, callbacks=[probe])
    assert probe.loop.scaler is scaler
    with pytest.raises(TypeError, match="fit: grad_scaler is the old name of scaler"):
        tc.fit(model, make_regression(n=16, batch_size=8), optimizer=_sgd(model), loss=F.mse_loss, verbose=0,
               grad_scaler=scaler, scaler=scaler)


def test_custom_train_and_test_steps() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = []

    def train_step(batch):
        x, y = batch
        optimizer.zero_grad()
        prediction = model(x)
        loss = F.mse_loss(prediction, y) + 0.0 * prediction.abs().mean()
        loss.backward()
        optimizer.step()
        calls.append("train")
        return {"loss": loss, "reconstruction": F.l1_loss(prediction, y)}

    def test_step(batch):
        x, y = batch
        calls.append("test")
        return F.mse_loss(model(x), y)

    history = tc.fit(model, make_regression(n=32, batch_size=16), optimizer=optimizer, train_step=train_step,
                     test_step=test_step, validation_data=make_regression(n=16, batch_size=16), epochs=2,
                     verbose=0)
    assert calls == ["train", "train", "test"] * 2
    assert set(history.history) == {"loss", "reconstruction", "val_loss"}


class MeanAbsoluteError:
    """A torchmetrics-style metric: update/compute/reset, exact over the epoch."""

    higher_is_better = False

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros(())
        self.count = 0

    def update(self, y_pred, y) -> None:
        self.total += (y_pred - y).abs().sum()
        self.count += y.numel()

    def compute(self):
        return self.total / self.count


def test_stateful_metrics_are_reset_and_computed_per_epoch() -> None:
    model = make_model()
    loader = make_regression(n=40, batch_size=16)
    metric = MeanAbsoluteError()
    history = tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=F.mse_loss,
                     metrics={"mae": metric}, epochs=2, validation_data=loader, verbose=0)
    x, y = loader.dataset.tensors
    with torch.no_grad():
        expected = F.l1_loss(model(x), y).item()
    assert history.history["mae"] == pytest.approx([expected, expected], rel=1e-6)
    assert history.history["val_mae"] == pytest.approx([expected, expected], rel=1e-6)


def test_metric_directions_reach_params() -> None:
    def accuracy(y_pred, y):
        return (y_pred.round() == y).float().mean()

    accuracy.mode = "max"
    model = make_model()
    trace = Trace()
    tc.fit(model, make_regression(), optimizer=_sgd(model), loss=F.mse_loss, verbose=0, callbacks=[trace],
           metrics={"acc": accuracy, "mae": MeanAbsoluteError(), "plain": F.l1_loss})
    assert trace.params_seen[0]["metric_directions"] == {"acc": "max", "mae": "min", "plain": None}


def test_on_train_end_runs_when_a_callback_raises_and_knows_the_exception() -> None:
    seen = []

    class Boom(tc.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("boom")

    class Closer(tc.Callback):
        def on_train_end(self, logs=None):
            seen.append(self.loop.exception)

    model = make_model()
    with pytest.raises(RuntimeError, match="boom"):
        tc.fit(model, make_regression(), optimizer=_sgd(model), loss=F.mse_loss, callbacks=[Boom(), Closer()],
               verbose=0)
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError)
    tc.fit(model, make_regression(), optimizer=_sgd(model), loss=F.mse_loss, callbacks=[Closer()], verbose=0)
    assert seen[1] is None


def test_device_argument_moves_model_and_batches() -> None:
    """Observed on the CPU: every batch tensor reports another device until `.to(device)` is called
    on it (computing with it before that raises), and the model records the devices it is moved to."""
    model_moves = []

    class Recorded(torch.nn.Sequential):
        def to(self, *args, **kwargs):
            model_moves.append(torch.device(kwargs.get("device", args[0] if args else "cpu")))
            return super().to(*args, **kwargs)

    model = Recorded(*make_model())
    batch_moves: list[torch.device | None] = []
    train = [(off_device(x, batch_moves), off_device(y, batch_moves)) for x, y in make_regression(n=32, batch_size=8)]
    valid = [(off_device(x, batch_moves), off_device(y, batch_moves)) for x, y in make_regression(n=16, batch_size=8)]
    history = tc.fit(model, train, optimizer=_sgd(model), loss=F.mse_loss, epochs=2, validation_data=valid,
                     device="cpu", verbose=0)
    assert len(history.history["loss"]) == 2 and len(history.history["val_loss"]) == 2
    assert model_moves == [torch.device("cpu")]
    # x and y of 4 training and 2 validation batches, in each of the 2 epochs
    assert batch_moves == [torch.device("cpu")] * (2 * (4 + 2) * 2)
    assert next(model.parameters()).device.type == "cpu"


def test_a_callback_list_can_be_passed_to_fit() -> None:
    model = make_model()
    trace = Trace()
    history = tc.fit(model, make_regression(), optimizer=_sgd(model), loss=F.mse_loss, epochs=2,
                     callbacks=tc.CallbackList([trace]), verbose=0)
    assert history.epoch == [0, 1] and trace.calls[0] == "on_train_begin"


def test_the_model_can_be_deep_copied_during_and_after_fit() -> None:
    """`model.history` reaches the loop state; nothing there may hold the epoch's loss tensors
    (non-leaf tensors cannot be deep-copied), or `copy.deepcopy(model)` in a callback, or in
    `AveragedModel` after a fit, raises."""
    import copy

    copies = []

    class Snapshot(tc.Callback):
        def on_epoch_end(self, epoch, logs=None):
            copies.append(copy.deepcopy(self.model))

    model = make_model()
    tc.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=F.mse_loss,
           epochs=3, verbose=0, callbacks=[Snapshot()])
    copy.deepcopy(model)
    assert len(copies) == 3


def test_each_epochs_logs_are_the_means_of_that_epochs_batches_only() -> None:
    """The running means start afresh at every epoch: each epoch's loss and metric are the batch-size
    weighted means of that epoch's batch values (recorded in this run), not of all batches so far."""
    model = make_model()
    loader = make_regression(n=40, batch_size=16)  # batches of 16, 16 and 8
    values: list[dict[str, list[tuple[float, int]]]] = []

    class Epochs(tc.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            values.append({"loss": [], "mae": []})

    def recorded(name: str, fn: Any) -> Any:
        def compute(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            value = fn(y_pred, y)
            values[-1][name].append((value.item(), len(y)))
            return value
        return compute

    history = tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     loss=recorded("loss", F.mse_loss), metrics={"mae": recorded("mae", F.l1_loss)},
                     epochs=3, verbose=0, callbacks=[Epochs()])
    for name in ("loss", "mae"):
        means = [sum(v * n for v, n in epoch[name]) / sum(n for _, n in epoch[name]) for epoch in values]
        assert [len(epoch[name]) for epoch in values] == [3, 3, 3]
        assert history.history[name] == pytest.approx(means, rel=1e-6)
        assert means[0] > means[1] > means[2]  # training moves the means: a sum over epochs would show
