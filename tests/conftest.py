"""Shared fixtures: tiny deterministic models and loaders."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset


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
