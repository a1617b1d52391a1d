"""The examples run as a user would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every example runs in a subprocess


def test_quickstart_trains_a_good_digits_classifier(tmp_path) -> None:
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path), "--epochs", "8"],
        capture_output=True, text=True, timeout=300, env=env, check=True,
    )
    accuracy = float(re.search(r"test accuracy: (\d\.\d+)", result.stdout).group(1))
    assert accuracy > 0.9, result.stdout
    assert (tmp_path / "training.csv").read_text().count("\n") == 9  # header + 8 epochs
    assert any((tmp_path / "logs" / "train").iterdir())
    (best,) = tmp_path.glob("best-*.safetensors")  # max_to_keep=1
    assert set(load_file(best)) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert not any((tmp_path / "backup").glob("*.safetensors"))  # deleted after a normal finish


def test_ddp_example_under_torchrun_writes_once_and_agrees(tmp_path) -> None:
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "examples" / "ddp_train.py"), "--out", str(tmp_path), "--epochs", "4"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test accuracy:") == 1  # rank 0 prints
    assert "(297 predictions gathered)" in result.stdout
    assert result.stdout.count("Epoch 1/4") == 1  # one progress line per epoch, from rank 0
    assert float(re.search(r"test accuracy: (\d\.\d+)", result.stdout).group(1)) > 0.8, result.stdout
    assert (tmp_path / "training.csv").read_text().count("\n") == 5  # header + 4 epochs, one writer
    assert len(list((tmp_path / "logs" / "train").iterdir())) == 1
    assert (tmp_path / "best.safetensors").exists() and not (tmp_path / "backup").exists()
