"""Shared fixtures: tiny deterministic models and loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchcallbacks import Callback


class Crash(Callback):
    """Raises RuntimeError("crash") after training batch `at_step` (counted over the run): a crash
    whose backups stay, for the resume tests."""

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.loop.global_step == self.at_step:
            raise RuntimeError("crash")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_regression(n: int = 64, features: int = 4, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, features, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_model(features: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


@pytest.fixture
def loader() -> DataLoader:
    return make_regression()


@pytest.fixture
def model() -> torch.nn.Module:
    return make_model()


def run_epochs(
    callbacks: Any,
    values: Sequence[float],
    monitor: str = "loss",
    on_epoch: Callable[[int], None] | None = None,
    train_end: bool = True,
) -> int:
    """Drive a `CallbackList` like a hand-written loop whose epoch logs are `{monitor: value}`, one
    epoch per value, stopping when a callback asks to. `on_epoch(epoch)` runs before each epoch's end
    hooks (e.g. to set the weights). Returns the number of epochs run."""
    callbacks.on_train_begin()
    epochs = 0
    for epoch, value in enumerate(values):
        callbacks.on_epoch_begin(epoch)
        if on_epoch is not None:
            on_epoch(epoch)
        callbacks.on_epoch_end(epoch, {monitor: value})
        epochs += 1
        if callbacks.stop_training:
            break
    if train_end:
        callbacks.on_train_end()
    return epochs


def train_epoch_by_hand(callbacks: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> torch.Tensor:
    """One epoch of a hand-written loop calling the batch hooks of `callbacks`; returns the last loss."""
    loss = torch.zeros(())
    for i, (x, y) in enumerate(loader):
        callbacks.on_train_batch_begin(i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        callbacks.on_train_batch_end(i, {"loss": loss.detach()})
    return loss.detach()
