"""Gradient accumulation under real `torchrun --nproc_per_node=2` (gloo, CPU): gradients are
all-reduced once per optimizer step, and k batches of b per process train like batches of k * b."""

from __future__ import annotations

import json
from pathlib import Path

import ddp_common as common
import pytest
import torch
from test_ddp_training import torchrun

pytestmark = pytest.mark.slow  # launches torchrun


def test_ddp_accumulation_all_reduces_once_per_step_and_equals_bigger_batches(tmp_path: Path) -> None:
    torchrun("accumulation_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    per_process_batches = common.N_TRAIN // 2 // common.BATCH  # 6 batches of 5 per epoch
    for report in ranks:
        # one bucket (a small model): one all-reduce per optimizer step, none on the other batches
        assert report["big_batch_reductions"] == 2 * per_process_batches // 2
        assert report["accumulated_reductions"] == report["big_batch_reductions"]
        for a, b in zip(report["accumulated_weights"], report["big_batch_weights"], strict=True):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6, rtol=0)
    assert ranks[0]["accumulated_weights"] == ranks[1]["accumulated_weights"]  # the processes agree
