"""Logs stay on the device: conversions to Python numbers are bounded per epoch, not per batch."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression
from torch.overrides import TorchFunctionMode

import torchcallbacks as tc
from torchcallbacks.callbacks import progbar_logger
from torchcallbacks.logs import LazyLogs, to_float, to_floats
from torchcallbacks.training.metrics import RunningMean

# Every way a tensor becomes a host value (each one is a device sync on an accelerator).
CONVERSIONS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "__format__", "cpu",
               "__array__"}


class CountConversions(TorchFunctionMode):
    """Counts tensor -> host conversions, except the DataLoader's own draw of a CPU seed per iterator."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in CONVERSIONS:
            caller = sys._getframe(1).f_code.co_filename
            if not caller.endswith(os.path.join("torch", "utils", "data", "dataloader.py")):
                self.count += 1
        return func(*args, **(kwargs or {}))


def _conversions_for(batches: int, verbose: int, file) -> int:
    model = make_model()
    loader = make_regression(n=8 * batches, batch_size=8)
    with CountConversions() as counter:
        tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=F.mse_loss,
               metrics={"mae": F.l1_loss}, epochs=2, verbose=verbose, validation_data=make_regression(n=32),
               callbacks=[tc.ProgbarLogger(file=file)] if verbose else None)
    return counter.count


@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_conversions_per_epoch_do_not_grow_with_the_number_of_batches(verbose) -> None:
    few = _conversions_for(4, verbose, io.StringIO())
    many = _conversions_for(60, verbose, io.StringIO())
    assert few == many
    assert few <= 2 * 2  # per epoch: one transfer for the training means, one for validation


def test_the_bar_converts_only_when_it_redraws(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    ticks = iter(range(100_000))
    monkeypatch.setattr(progbar_logger.time, "monotonic", lambda: next(ticks) * 0.02)  # a redraw every 3rd batch
    file = Terminal()
    with_redraws = _conversions_for(30, 1, file)
    redraws = file.getvalue().count("\r")
    assert with_redraws == _conversions_for(30, 0, None) + redraws - 2  # final lines convert nothing new


def test_lazy_logs_compute_once_and_keep_callback_keys() -> None:
    calls = []

    def compute():
        calls.append(1)
        return {"loss": torch.tensor(0.5)}

    logs = LazyLogs(compute)
    assert calls == []
    logs["learning_rate"] = 0.1
    assert dict(logs) == {"loss": torch.tensor(0.5), "learning_rate": 0.1}
    assert len(logs) == 2 and calls == [1]
    assert to_floats(logs) == {"loss": 0.5, "learning_rate": 0.1}
    assert to_float(torch.tensor([2.0])) == 2.0
    with pytest.raises(ValueError, match=r"logs\['x'\] must be a number or a one-element tensor"):
        to_floats({"x": torch.ones(3)})


def test_running_mean_snapshots_and_weights() -> None:
    mean = RunningMean()
    snapshots = []
    values = [(float(i), 1 + i % 3) for i in range(600)]  # crosses the fold threshold twice
    for value, weight in values:
        mean.add(torch.tensor(value), weight)
        snapshots.append(mean.snapshot())
    for n in (1, 255, 256, 257, 600):
        expected = sum(v * w for v, w in values[:n]) / sum(w for _, w in values[:n])
        assert RunningMean.mean_of(snapshots[n - 1]).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_batch_loop_never_synchronises() -> None:
    """Under torch.cuda.set_sync_debug_mode("error") any synchronising call in the batch loop raises."""
    from torch.utils.data import DataLoader, TensorDataset

    steps = 50

    class SyncGuard(tc.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, batch, logs=None):
            if batch == steps - 1:
                torch.cuda.set_sync_debug_mode("default")

    model = make_model().cuda()
    data = TensorDataset(torch.randn(8 * steps, 4), torch.randn(8 * steps, 1))
    loader = DataLoader(data, batch_size=8, pin_memory=True)
    try:
        history = tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=F.mse_loss,
                         metrics={"mae": F.l1_loss}, epochs=2, verbose=1,
                         callbacks=[SyncGuard(), tc.ProgbarLogger(file=io.StringIO())])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(history.history["loss"]) == 2
