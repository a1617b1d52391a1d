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
