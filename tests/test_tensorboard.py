"""TensorBoard: event files read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_model, make_regression
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import torchcallbacks
from torchcallbacks import CallbackList, LambdaCallback, TensorBoard
from torchcallbacks.callbacks.tensorboard import _parse_profile_batch
from torchcallbacks.logs import LazyLogs, to_floats

STEPS = 4  # batches per epoch of make_regression()


def mae(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_pred - y).abs().mean()


def _fit(callbacks: list, model: torch.nn.Module | None = None, epochs: int = 2, **kwargs: Any):
    model = model if model is not None else make_model()
    kwargs.setdefault("loss", torch.nn.functional.mse_loss)
    kwargs.setdefault("validation_data", make_regression(32))
    kwargs.setdefault("x", make_regression())
    return torchcallbacks.fit(
        model, kwargs.pop("x"), optimizer=torch.optim.SGD(model.parameters(), lr=0.01), epochs=epochs,
        verbose=0, callbacks=callbacks, **kwargs,
    )


def _run(path: Path) -> EventAccumulator:
    return EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0}).Reload()


def _scalars(run: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in run.Scalars(tag)]


def _f32(values: list[float]) -> list[float]:
    """Event files hold scalars as float32, as Keras' writer does."""
    return [float(np.float32(v)) for v in values]


def test_epoch_scalars_in_train_and_validation_runs(tmp_path: Path) -> None:
    history = _fit([TensorBoard(tmp_path, write_graph=False)], epochs=3, metrics=[mae])
    train, validation = _run(tmp_path / "train"), _run(tmp_path / "validation")
    assert sorted(train.Tags()["scalars"]) == ["epoch_learning_rate", "epoch_loss", "epoch_mae"]
    assert _scalars(train, "epoch_loss") == list(zip([0, 1, 2], _f32(history.history["loss"]), strict=True))
    assert _scalars(train, "epoch_mae") == list(zip([0, 1, 2], _f32(history.history["mae"]), strict=True))
    assert _scalars(train, "epoch_learning_rate") == [(e, float(np.float32(0.01))) for e in range(3)]
    # validation values under the same tags (no val_ prefix), so TensorBoard draws them on one chart
    assert sorted(validation.Tags()["scalars"]) == [
        "epoch_loss", "epoch_mae", "evaluation_loss_vs_iterations", "evaluation_mae_vs_iterations",
    ]
    assert _scalars(validation, "epoch_loss") == list(zip([0, 1, 2], _f32(history.history["val_loss"]), strict=True))
    assert _scalars(validation, "evaluation_mae_vs_iterations") == list(
        zip([STEPS, 2 * STEPS, 3 * STEPS], _f32(history.history["val_mae"]), strict=True)
    )


@pytest.mark.parametrize(("update_freq", "steps"), [("batch", [1, 2, 3, 4, 5, 6, 7, 8]), (3, [3, 6])])
def test_batch_scalars_at_the_global_step(tmp_path: Path, update_freq: str | int, steps: list[int]) -> None:
    seen: dict[int, float] = {}
    recorder = LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.__setitem__(len(seen) + 1, to_floats(logs)["loss"])
    )
    history = _fit([recorder, TensorBoard(tmp_path, update_freq=update_freq, write_graph=False)])
    train = _run(tmp_path / "train")
    assert _scalars(train, "batch_loss") == [(step, float(np.float32(seen[step]))) for step in steps]
    if update_freq == "batch":  # the running mean of an epoch's last batch is the epoch's loss
        assert [v for s, v in _scalars(train, "batch_loss") if s % STEPS == 0] == _f32(history.history["loss"])
    assert "batch_loss" not in _run(tmp_path / "validation").Tags()["scalars"]


def test_unwritten_batches_do_not_read_the_lazy_logs(tmp_path: Path) -> None:
    reads: list[int] = []

    def logs_of(step: int) -> LazyLogs:
        return LazyLogs(lambda: reads.append(step) or {"loss": torch.tensor(float(step))})

    callbacks = CallbackList([TensorBoard(tmp_path, update_freq=3, write_graph=False)], model=make_model())
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    for i in range(7):
        callbacks.on_train_batch_begin(i)
        callbacks.on_train_batch_end(i, logs_of(i + 1))
    callbacks.on_epoch_end(0, {"loss": 7.0})
    callbacks.on_train_end()
    assert reads == [3, 6]  # the other batches' values were never computed, so no device sync
    assert _scalars(_run(tmp_path / "train"), "batch_loss") == [(3, 3.0), (6, 6.0)]


def test_steps_per_second(tmp_path: Path) -> None:
    _fit([TensorBoard(tmp_path, write_graph=False, write_steps_per_second=True, update_freq=2)])
    train = _run(tmp_path / "train")
    assert [s for s, _ in _scalars(train, "epoch_steps_per_second")] == [0, 1]
    assert [s for s, _ in _scalars(train, "batch_steps_per_second")] == [2, 4, 6, 8]
    assert all(v > 0 for _, v in _scalars(train, "epoch_steps_per_second") + _scalars(train, "batch_steps_per_second"))


def test_histograms_and_images_at_the_right_epochs(tmp_path: Path) -> None:
    model = make_model()
    sums: dict[int, float] = {}
    grad_sums: dict[int, float] = {}

    def snapshot(epoch: int, logs: Any) -> None:
        sums[epoch] = float(model[0].weight.detach().double().sum())
        grad_sums[epoch] = float(model[0].weight.grad.double().sum())

    tb = TensorBoard(tmp_path, histogram_freq=2, write_grads=True, write_images=True, write_graph=False)
    _fit([LambdaCallback(on_epoch_end=snapshot), tb], model=model, epochs=5)
    train = _run(tmp_path / "train")
    names = [name for name, _ in model.named_parameters()]
    assert sorted(train.Tags()["histograms"]) == sorted(
        [f"{n}/histogram" for n in names] + [f"{n}/gradient" for n in names]
    )
    weight = train.Histograms("0.weight/histogram")
    assert [event.step for event in weight] == [0, 2, 4]
    assert all(event.histogram_value.num == model[0].weight.numel() for event in weight)
    assert [event.histogram_value.sum for event in weight] == pytest.approx([sums[e] for e in (0, 2, 4)], rel=1e-5)
    gradient = train.Histograms("0.weight/gradient")
    assert [event.histogram_value.sum for event in gradient] == pytest.approx(
        [grad_sums[e] for e in (0, 2, 4)], rel=1e-5
    )
    # weights as images: the 8x4 matrix lying down (4 high, 8 wide), the bias as a column; the single
    # number of the last bias is no image
    assert sorted(train.Tags()["images"]) == ["0.bias/image", "0.weight/image", "2.weight/image"]
    image = train.Images("0.weight/image")
    assert [event.step for event in image] == [0, 2, 4]
    assert (image[0].height, image[0].width) == (4, 8)
    assert (train.Images("0.bias/image")[0].height, train.Images("0.bias/image")[0].width) == (8, 1)


class KeywordModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(features) * scale


def test_graph_is_written_from_the_first_batch(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tracing must not leak the tracer's own warnings to the user
        _fit([TensorBoard(tmp_path / "plain")])
    graph = _run(tmp_path / "plain" / "train").Graph()
    assert any("aten::linear" in node.op for node in graph.node)

    keyword_batches = [({"features": x, "scale": torch.tensor(2.0)}, y) for x, y in make_regression()]
    _fit([TensorBoard(tmp_path / "keywords")], model=KeywordModel(), x=keyword_batches, validation_data=None)
    graph = _run(tmp_path / "keywords" / "train").Graph()
    assert any("aten::linear" in node.op for node in graph.node)


def test_graph_tracing_does_not_change_training(tmp_path: Path) -> None:
    def model() -> torch.nn.Module:
        torch.manual_seed(3)
        return torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)
        )

    plain, traced = model(), model()
    torch.manual_seed(4)
    without = _fit([], model=plain).history
    torch.manual_seed(4)
    with_graph = _fit([TensorBoard(tmp_path, write_graph=True)], model=traced).history
    assert _run(tmp_path / "train").Tags()["graph"]
    assert with_graph == without
    for a, b in zip(plain.state_dict().values(), traced.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class Untraceable(torch.nn.Module):
    """Returns (prediction, None), which the tracer cannot represent."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.linear(x), None


def test_untraceable_model_warns_once_and_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _fit(
            [TensorBoard(tmp_path)], model=Untraceable(), epochs=3,
            loss=lambda out, y: torch.nn.functional.mse_loss(out[0], y),
        )
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "write_graph could not trace Untraceable" in messages[0]
    assert history.epoch == [0, 1, 2]
    train = _run(tmp_path / "train")
    assert not train.Tags()["graph"]
    assert len(train.Scalars("epoch_loss")) == 3
    assert capsys.readouterr().out == ""  # the tracer's printed error went into the warning, not stdout


def test_profiler_trace_covers_the_profiled_batches(tmp_path: Path) -> None:
    _fit([TensorBoard(tmp_path, profile_batch="2,3", write_graph=False)], epochs=1)
    traces = list((tmp_path / "train").glob("*.pt.trace.json"))
    assert len(traces) == 1
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"batch_2", "batch_3"} <= names
    assert not {"batch_1", "batch_4"} & names


def test_profile_batch_forms() -> None:
    assert _parse_profile_batch(0) == (0, 0)
    assert _parse_profile_batch(5) == (5, 5)
    assert _parse_profile_batch((2, 4)) == (2, 4)
    assert _parse_profile_batch("2,4") == (2, 4)
    assert _parse_profile_batch("3") == (3, 3)
    for bad in ((4, 2), -1, "a,b", (1, 2, 3), (0, 3), True, 1.5):
        with pytest.raises(ValueError, match="profile_batch"):
            TensorBoard(profile_batch=bad)  # type: ignore[arg-type]


class EmbeddingModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(ids))


def _token_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 5, (8,), generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(3)]


def test_embeddings_for_the_projector(tmp_path: Path) -> None:
    model = EmbeddingModel()
    weights: dict[int, torch.Tensor] = {}
    snapshot = LambdaCallback(on_epoch_end=lambda epoch, logs: weights.__setitem__(epoch, model.tokens.weight.detach().clone()))
    labels = tmp_path / "labels.tsv"
    labels.write_text("a\nb\nc\nd\ne\n")
    tb = TensorBoard(tmp_path / "logs", embeddings_freq=2, embeddings_metadata={"tokens": labels}, write_graph=False)
    _fit([snapshot, tb], model=model, epochs=3, x=_token_batches(), validation_data=None)
    train = tmp_path / "logs" / "train"
    config = (train / "projector_config.pbtxt").read_text()
    assert config.count("tensor_name: \"tokens") == 2
    for epoch in (0, 2):
        folder = train / f"{epoch:05d}" / "tokens"
        rows = [[float(v) for v in line.split("\t")] for line in (folder / "tensors.tsv").read_text().splitlines()]
        assert torch.equal(torch.tensor(rows, dtype=torch.float32), weights[epoch])
        assert (folder / "metadata.tsv").read_text().split() == ["a", "b", "c", "d", "e"]
    assert not (train / "00001").exists()


def test_embeddings_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="embeddings_metadata: no embedding layer named"):
        _fit([TensorBoard(tmp_path, embeddings_freq=1, embeddings_metadata={"nope": ["a"] * 5})],
             model=EmbeddingModel(), x=_token_batches(), validation_data=None)
    with pytest.raises(ValueError, match=r"embeddings_metadata\['tokens'\]: 2 labels for an embedding with 5 rows"):
        _fit([TensorBoard(tmp_path, embeddings_freq=1, embeddings_metadata={"tokens": ["a", "b"]})],
             model=EmbeddingModel(), x=_token_batches(), validation_data=None)


def test_writers_are_flushed_and_closed_when_training_raises(tmp_path: Path) -> None:
    tb = TensorBoard(tmp_path, update_freq="batch", write_graph=False)
    writers: list[Any] = []

    def crash(batch: int, logs: Any) -> None:
        if tb.loop.global_step == 7:  # TensorBoard's batch hook runs after this one (dispatch_order)
            writers.extend(tb._writers.values())  # held here, so garbage collection cannot flush them
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _fit([tb, LambdaCallback(on_train_batch_end=crash)], epochs=3)
    assert len(writers) == 2 and all(writer.file_writer is None for writer in writers)  # closed
    train = _run(tmp_path / "train")
    # the scalars of batches 5 and 6 were written after the last epoch-end flush: only closing keeps them
    assert [step for step, _ in _scalars(train, "batch_loss")] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in _scalars(train, "epoch_loss")] == [0]


def test_standalone_evaluate_writes_evaluation_vs_iterations(tmp_path: Path) -> None:
    model = make_model()
    tb = TensorBoard(tmp_path, write_graph=False)
    untrained = torchcallbacks.evaluate(model, make_regression(32), loss=torch.nn.functional.mse_loss,
                                        callbacks=[tb], verbose=0)
    _fit([tb], model=model, epochs=2, validation_data=None)
    trained = torchcallbacks.evaluate(model, make_regression(32), loss=torch.nn.functional.mse_loss,
                                      callbacks=[tb], verbose=0)
    assert _scalars(_run(tmp_path / "validation"), "evaluation_loss_vs_iterations") == [
        (0, float(np.float32(untrained))), (2 * STEPS, float(np.float32(trained))),
    ]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"update_freq": 0}, "update_freq"),
        ({"update_freq": "sometimes"}, "update_freq"),
        ({"histogram_freq": -1}, "histogram_freq"),
        ({"embeddings_freq": 1.5}, "embeddings_freq"),
        ({"embeddings_metadata": 3}, "embeddings_metadata"),
        ({"log_dir": None}, "log_dir"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        TensorBoard(**kwargs)


@pytest.mark.parametrize("tensorboard_first", [False, True])
def test_learning_rate_is_the_one_the_epoch_used_with_an_epoch_scheduler(tmp_path: Path, tensorboard_first: bool) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torchcallbacks.LearningRateScheduler(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
    board = torchcallbacks.TensorBoard(tmp_path, write_graph=False)
    history = torchcallbacks.fit(
        model, make_regression(), optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=3, verbose=0,
        callbacks=[board, scheduler] if tensorboard_first else [scheduler, board],
    )
    assert history.history["learning_rate"] == [0.1, 0.05, 0.025]
    assert _scalars(_run(tmp_path / "train"), "epoch_learning_rate") == list(enumerate(_f32([0.1, 0.05, 0.025])))


def test_learning_rate_of_a_scheduler_stepped_before_tensorboard_without_logging_it(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    stepper = torchcallbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: step_lr.step())
    torchcallbacks.fit(
        model, make_regression(), optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=3, verbose=0,
        callbacks=[stepper, torchcallbacks.TensorBoard(tmp_path, write_graph=False)],
    )
    assert _scalars(_run(tmp_path / "train"), "epoch_learning_rate") == list(enumerate(_f32([0.1, 0.05, 0.025])))


def test_every_param_group_of_every_optimizer_has_a_learning_rate_tag(tmp_path: Path) -> None:
    model = make_model()
    first = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].weight, "lr": 0.2}])
    second = torch.optim.SGD([model[2].bias], lr=0.3)
    halve = torch.optim.lr_scheduler.StepLR(second, step_size=1, gamma=0.5)
    stepper = torchcallbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: halve.step())  # logs nothing
    torchcallbacks.fit(
        model, make_regression(), optimizer=[first, second], loss=torch.nn.functional.mse_loss, epochs=2, verbose=0,
        callbacks=[stepper, torchcallbacks.TensorBoard(tmp_path, write_graph=False)],
    )
    train = _run(tmp_path / "train")
    assert {t for t in train.Tags()["scalars"] if "learning_rate" in t} == {
        "epoch_learning_rate", "epoch_learning_rate/group_1", "epoch_learning_rate/optimizer_1/group_0",
    }
    assert _scalars(train, "epoch_learning_rate") == list(enumerate(_f32([0.1, 0.1])))
    assert _scalars(train, "epoch_learning_rate/group_1") == list(enumerate(_f32([0.2, 0.2])))
    # the rate each epoch trained with, although the scheduler stepped before TensorBoard's epoch end
    assert _scalars(train, "epoch_learning_rate/optimizer_1/group_0") == list(enumerate(_f32([0.3, 0.15])))


def test_learning_rate_tags_of_every_group_from_a_learning_rate_callback(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}])
    schedule = torchcallbacks.LearningRateScheduler(lambda epoch, lr: lr if epoch == 0 else lr / 2)
    torchcallbacks.fit(
        model, make_regression(), optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=2, verbose=0,
        callbacks=[schedule, torchcallbacks.TensorBoard(tmp_path, write_graph=False)],
    )
    train = _run(tmp_path / "train")
    assert _scalars(train, "epoch_learning_rate") == list(enumerate(_f32([0.1, 0.05])))
    assert _scalars(train, "epoch_learning_rate/group_1") == list(enumerate(_f32([0.2, 0.1])))


class CountingTensorBoard(TensorBoard):
    """Records the epochs in which its batch hooks are called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: dict[str, set[int]] = {"begin": set(), "end": set()}

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.calls["begin"].add(self.loop.epoch)
        super().on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.calls["end"].add(self.loop.epoch)
        super().on_train_batch_end(batch, logs)


def test_batch_hooks_run_only_while_there_is_batch_work(tmp_path: Path) -> None:
    tb = CountingTensorBoard(tmp_path / "graph")  # write_graph: traced at the first batch's end
    _fit([tb], epochs=3)
    assert tb.calls == {"begin": set(), "end": {0}}  # the end hook until the graph is written, then idle
    assert _run(tmp_path / "graph" / "train").Graph() is not None

    tb = CountingTensorBoard(tmp_path / "profile", write_graph=False, profile_batch=(6, 9))  # epochs of 4 batches
    _fit([tb], epochs=4)
    assert tb.calls == {"begin": {0, 1, 2}, "end": {0, 1, 2}}  # until batch 9 (epoch 2) is profiled
    assert list((tmp_path / "profile" / "train").rglob("*.pt.trace.json"))

    tb = CountingTensorBoard(tmp_path / "batches", write_graph=False, update_freq=3)
    _fit([tb], epochs=2)
    assert tb.calls == {"begin": set(), "end": {0, 1}}
    assert [step for step, _ in _scalars(_run(tmp_path / "batches" / "train"), "batch_loss")] == [3, 6]


def test_learning_rate_set_at_epoch_begin_by_a_later_callback_is_the_one_logged(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def set_lr(epoch: int, logs: Any) -> None:
        optimizer.param_groups[0]["lr"] = 0.1 / (epoch + 1)

    torchcallbacks.fit(model, make_regression(), optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=3,
                       verbose=0, callbacks=[TensorBoard(tmp_path, write_graph=False), LambdaCallback(on_epoch_begin=set_lr)])
    assert _scalars(_run(tmp_path / "train"), "epoch_learning_rate") == list(enumerate(_f32([0.1, 0.05, 0.1 / 3])))


@pytest.mark.parametrize(("update_freq", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("often", TypeError)])
def test_update_freq_errors_name_the_argument(tmp_path: Path, update_freq: Any, error: type) -> None:
    with pytest.raises(error, match=r"TensorBoard: update_freq must be 'epoch', 'batch' or an integer >= 1"):
        TensorBoard(tmp_path, update_freq=update_freq)
