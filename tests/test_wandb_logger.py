"""WandbLogger in W&B's offline mode, read back from the transaction log it writes (`run-<id>.wandb`)
with W&B's own reader (`wandb leet inspect --json`). No network: WANDB_MODE=offline, every W&B
directory in tmp_path, error reporting off. Slow: each run starts W&B's service process."""

from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import Crash, make_model, make_regression

import torchcallbacks
from torchcallbacks import BackupAndRestore, ModelCheckpoint, WandbLogger

pytest.importorskip("wandb")
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "wandb-home"
    for name, value in {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true", "WANDB_ERROR_REPORTING": "false", "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_CONFIG_DIR": str(root / "config"), "WANDB_ARTIFACT_DIR": str(root / "artifacts"),
    }.items():
        monkeypatch.setenv(name, value)
    import wandb

    wandb.teardown()  # W&B's process-wide settings are read again from this test's environment
    yield tmp_path
    wandb.teardown()


def _records(tmp_path: Path, run_id: str) -> list[list[dict[str, Any]]]:
    """Every offline run directory of `run_id`, oldest first, as its list of records. W&B names them
    `offline-run-<start second>-<id>`, with `-1`, `-2`... added when that directory exists already (a rerun
    that starts within the same second)."""
    name = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for directory in glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}*")):
        match = name.fullmatch(Path(directory).name)
        if match:
            found.append(((match[1], int(match[2] or 0)), Path(directory) / f"run-{run_id}.wandb"))
    runs = []
    for _, log in sorted(found):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", log],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    return runs


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def _fit(callbacks: list, epochs: int = 2) -> torchcallbacks.History:
    model = make_model()
    return torchcallbacks.fit(
        model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss=torch.nn.functional.mse_loss, epochs=epochs, verbose=0, validation_data=make_regression(32),
        callbacks=callbacks,
    )


def test_history_config_summary_and_exit(offline: Path) -> None:
    logger = WandbLogger(project="p", update_freq=2, config={"dataset": "toy"})
    history = _fit([logger])
    (records,) = _records(offline, logger.run_id)
    rows = _rows(records)
    assert [row["_step"] for row in rows] == [2, 4, 6, 8]  # the global step
    assert [row["epoch"] for row in rows if "epoch" in row] == [0, 1]
    assert [row["loss"] for row in rows if "loss" in row] == history.history["loss"]
    assert [row["val_loss"] for row in rows if "val_loss" in row] == history.history["val_loss"]
    assert [row["learning_rate"] for row in rows if "learning_rate" in row] == [0.01, 0.01]
    assert [row["_step"] for row in rows if "loss" in row] == [4, 8]  # epoch rows at the epoch's last step
    config: dict[str, Any] = {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"]["update"])
        if record["type"] == "run":
            config.update(record["run"].get("config", {}).get("update", {}))
    assert config["dataset"] == "toy" and config["epochs"] == 2 and config["optimizer"] == "SGD"
    assert config["optimizer/lr"] == 0.01 and config["batch_size"] == 16
    metrics = {r["metric"]["name"]: r["metric"].get("step_metric") for r in records if r["type"] == "metric"}
    assert metrics["loss"] == "epoch" and metrics["val_loss"] == "epoch"
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]


@pytest.mark.parametrize("same_second", [False, True])
def test_crash_then_resume_continues_the_run_and_logs_each_step_once(
    offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_second: bool
) -> None:
    if same_second:  # the rerun starts within the crashed run's second: W&B gives its directory a suffix
        import wandb.sdk.wandb_init

        monkeypatch.setattr(wandb.sdk.wandb_init, "time", SimpleNamespace(time=lambda: 1.8e9))
    backup = str(tmp_path / "backup")
    logger = WandbLogger(project="p", update_freq=1)
    with pytest.raises(RuntimeError, match="crash"):
        _fit([logger, BackupAndRestore(backup, save_freq=6), Crash(at_step=7)], epochs=3)
    again = WandbLogger(project="p", update_freq=1)
    _fit([again, BackupAndRestore(backup, save_freq=6)], epochs=3)
    assert again.run_id == logger.run_id
    first, second = _records(offline, logger.run_id)
    assert [r["exit"]["exit_code"] for r in first if r["type"] == "exit"] == [1]
    assert [r["exit"]["exit_code"] for r in second if r["type"] == "exit"] == [0]
    steps = [row["_step"] for row in _rows(first) + _rows(second) if "batch_loss" in row]
    assert steps == list(range(1, 13))  # step 7 was held by the first run: not logged again
    assert [row["epoch"] for row in _rows(first) + _rows(second) if "loss" in row] == [0, 1, 2]


def test_best_model_logged_as_artifact(offline: Path, tmp_path: Path) -> None:
    best = ModelCheckpoint(str(tmp_path / "best.safetensors"), save_best_only=True, save_weights_only=True)
    logger = WandbLogger(project="p", log_models="best")
    _fit([logger, best])
    (records,) = _records(offline, logger.run_id)
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifacts and all(a["type"] == "model" and "best" in a["aliases"] for a in artifacts)
    contents = [c for a in artifacts for c in a["manifest"]["contents"]]
    assert {c["path"] for c in contents} == {"best.safetensors"}


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="resume"):
        WandbLogger(resume="allow")
    with pytest.raises(TypeError, match="config"):
        WandbLogger(config=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="update_freq"):
        WandbLogger(update_freq=-1)
