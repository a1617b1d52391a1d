"""Optional integrations, exercised for real when installed (they are in the `test` extra): a
torchmetrics metric and a torchdata StatefulDataLoader resume exactly mid-epoch."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Crash, make_model
from torch.utils.data import TensorDataset

import torchcallbacks as tc


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def _run(loader: Any, callbacks: list[tc.Callback], metrics: Any = None, seed: int = 0, **kwargs: Any) -> tuple[torch.nn.Module, tc.History]:
    """A run as a fresh process makes it. The loader is built from a fixed seed: torchdata's draws its
    sampler's seed when it is built."""
    torch.manual_seed(0)
    data = loader()
    torch.manual_seed(seed)  # another seed on the rerun: what is not restored shows
    model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
    history = tc.fit(model, data, optimizer=torch.optim.Adam(model.parameters(), lr=0.01), metrics=metrics,
                     loss=torch.nn.functional.mse_loss, epochs=3, verbose=0, callbacks=callbacks, **kwargs)
    return model, history


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_torchmetrics_metric_resumes_with_the_batches_before_the_crash(tmp_path: Path) -> None:
    torchmetrics = pytest.importorskip("torchmetrics")

    def loader() -> Any:
        return torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=True)

    _, reference = _run(loader, [], metrics={"mae": torchmetrics.MeanAbsoluteError()})
    with pytest.raises(RuntimeError):
        _run(loader, [tc.BackupAndRestore(tmp_path, save_freq=3), Crash(12)],
             metrics={"mae": torchmetrics.MeanAbsoluteError()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torchmetrics' "compute called before update"
        _, history = _run(loader, [tc.BackupAndRestore(tmp_path, save_freq=3)],
                          metrics={"mae": torchmetrics.MeanAbsoluteError()}, seed=5)
    assert history.epoch == reference.epoch == [0, 1, 2]
    assert history.history["mae"] == reference.history["mae"]  # epoch 1: its 3 batches before the crash too
    assert history.history["loss"] == reference.history["loss"]


@pytest.mark.parametrize("steps_per_epoch", [None, 5])
def test_a_stateful_dataloader_is_positioned_through_its_own_state(tmp_path: Path, steps_per_epoch: Any) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader() -> Any:
        return stateful.StatefulDataLoader(_data(), batch_size=8, shuffle=True)

    reference, _ = _run(loader, [], steps_per_epoch=steps_per_epoch)
    with pytest.raises(RuntimeError):
        _run(loader, [tc.BackupAndRestore(tmp_path, save_freq=3), Crash(10)], steps_per_epoch=steps_per_epoch)
    state = tc.checkpoint.read_training_state(tmp_path / "latest.safetensors")
    assert "loader" in state["loop"]["data"]  # the loader's own state, not a count of batches to skip
    resumed, _ = _run(loader, [tc.BackupAndRestore(tmp_path, save_freq=3)], steps_per_epoch=steps_per_epoch, seed=5)
    assert _same(reference, resumed)


def test_which_stateful_metrics_sync_themselves() -> None:
    """Under torch.distributed, fit averages the values of stateful metrics that do not synchronise
    themselves; torchmetrics' do (at compute), and a metric can declare it."""
    torchmetrics = pytest.importorskip("torchmetrics")
    from torchcallbacks.training.metrics import syncs_itself

    class Plain:
        def update(self, y_pred: Any, y: Any) -> None: ...
        def compute(self) -> float: return 0.0
        def reset(self) -> None: ...

    declared = Plain()
    declared.syncs_across_processes = True  # type: ignore[attr-defined]
    assert syncs_itself(torchmetrics.MeanAbsoluteError())
    assert not syncs_itself(Plain()) and syncs_itself(declared)
