"""Shared fixtures: tiny deterministic models and loaders."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchcallbacks import Callback

SEED_VARIABLE = "TORCHCALLBACKS_TEST_SEED"

#: The test modules that compare numbers computed by training (a resumed run against an uninterrupted
#: one, a file against the run that wrote it, fit against a plain loop). They are marked `numerics`, and
#: .ci/run runs them a second time under ATEN_CPU_CAPABILITY=default (the kernels of another CPU), so that
#: none of them depends on this machine's floating point.
NUMERICS_MODULES = frozenset({
    "test_backup_and_restore", "test_checkpoint_format", "test_early_stopping", "test_fit_arrays",
    "test_gradient_accumulation", "test_resume_kill", "test_resume_matrix", "test_skipping",
    "test_swap_ema_weights", "test_training_state", "test_ddp_accumulation",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    present = {name[:-3] for folder in (here, os.path.join(here, "distributed")) for name in os.listdir(folder)}
    missing = sorted(NUMERICS_MODULES - present)
    if missing:
        raise pytest.UsageError(f"conftest.NUMERICS_MODULES names test modules that do not exist: {missing}")
    for item in items:
        if item.path.stem in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)


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


def choose_seed(environ: Mapping[str, str] = os.environ) -> int:
    """The seed of a randomised test: `TORCHCALLBACKS_TEST_SEED` when it is set, else a fresh one."""
    given = environ.get(SEED_VARIABLE, "").strip()
    return int(given) if given else random.SystemRandom().randrange(2**32)


@pytest.fixture
def random_seed(request: pytest.FixtureRequest) -> int:
    """`choose_seed()`, printed: pytest shows it with a failing test's captured output, and
    `TORCHCALLBACKS_TEST_SEED=<seed> python -m pytest tests -k <test>` replays that draw. Every
    randomised test takes its seed (and its `random.Random`) from here."""
    seed = choose_seed()
    print(f"{request.node.nodeid}: {SEED_VARIABLE}={seed}")
    return seed


class OffDeviceTensor(torch.Tensor):
    """A stand-in for a tensor on another device, observable on a CPU-only machine: it reports
    `device` as `meta`, its metadata (shape, dtype, ...) reads as usual, `.to(device)` records the
    device in the list given to `off_device` and returns a plain tensor, and any other operation
    (a model's forward, a loss) raises, as computing with a tensor on the wrong device would."""

    _METADATA = frozenset({"size", "dim", "numel", "__len__", "is_floating_point", "element_size", "__repr__"})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return torch.device("meta")
        name = getattr(func, "__name__", "")
        with torch._C.DisableTorchFunctionSubclass():
            if name == "__get__" or name in cls._METADATA:
                return func(*args, **kwargs)
            if name == "to":
                tensor, rest = args[0], args[1:]
                device = kwargs.get("device", rest[0] if rest else None)
                tensor.moves.append(torch.device(device) if device is not None else None)
                plain = tensor.as_subclass(torch.Tensor)
                return plain.to(*rest, **kwargs)
        raise RuntimeError(f"{name or func} on a tensor that was never moved to the device")


def off_device(tensor: torch.Tensor, moves: list[Any]) -> OffDeviceTensor:
    """`tensor` as an `OffDeviceTensor` whose `.to(device)` calls append the device to `moves`."""
    result = tensor.as_subclass(OffDeviceTensor)
    result.moves = moves  # type: ignore[attr-defined]
    return result


def make_regression(n: int = 64, features: int = 4, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, features, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_arrays(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The regression data of `make_regression` as two tensors (for `fit(model, x, y)`)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)


def seeded_model(seed: int = 0) -> torch.nn.Module:
    """`make_model()` initialised from `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return make_model()


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


def retype_tensor(path: Any, key: str, dtype: str) -> None:
    """Edit a safetensors file's header in place: tensor `key` is said to be of `dtype` (a safetensors
    name, e.g. "I32"), its bytes left as they are (a damaged or edited file, e.g. F32 -> I32)."""
    import json

    with open(path, "rb") as file:
        data = file.read()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header[key]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little") + text + data[8 + length:])
