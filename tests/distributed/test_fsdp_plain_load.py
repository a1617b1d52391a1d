"""An FSDP2 run's full-state ModelCheckpoint directories, read by a plain inference process.

Two processes train an FSDP2 model under torchrun (gloo, CPU: fsdp_worker.py `checkpoint`) with a
full-state ModelCheckpoint (sharded directories) and gather the whole training state at every epoch
end (epoch-E.safetensors). Then this process, with no process group and no FSDP, reads the last
directory with `load_weights` and `load_checkpoint` into a plain model, as DCP's own load can, nothing
unpickled, and gets the gathered tensors bit for bit.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import torchcallbacks as tc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TIMEOUT = 180
STOPPER = "EarlyStopping[monitor=loss,mode=max]"

pytestmark = pytest.mark.slow


def _plain_model(seed: int) -> torch.nn.Module:
    """fsdp_worker.make_model's architecture, without FSDP."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 1))
    model.register_buffer("scale", torch.zeros(2))
    return model


def _refuse_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling attempted")

    class Refused(pickle.Unpickler):  # a class still: modules imported meanwhile may subclass it
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(torch, "load", refuse)


def test_a_plain_process_reads_an_fsdp_runs_checkpoint_with_load_weights_and_load_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "fsdp_worker.py"), str(tmp_path), "checkpoint"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    directory = tmp_path / "ckpt" / "state-03"  # saved at the end of epoch 2, when Gather wrote epoch-2
    shards = sorted(n for n in os.listdir(directory) if n.startswith("shard-"))
    assert shards == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    gathered = load_file(tmp_path / "epoch-2.safetensors")
    assert not dist.is_initialized()
    _refuse_unpickling(monkeypatch)

    plain = _plain_model(seed=1)
    tc.load_weights(plain, directory)
    weights = plain.state_dict()
    assert weights.keys() == {k.removeprefix("model/") for k in gathered if k.startswith("model/")}
    different = [k for k, v in weights.items() if not torch.equal(v, gathered[f"model/{k}"])]
    assert not different, different

    model = _plain_model(seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    callbacks = tc.CallbackList([tc.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=True),
                                 tc.SwapEMAWeights(decay=0.9)], model=model, optimizer=optimizer)
    state = tc.load_checkpoint(model, directory, optimizer, callbacks=callbacks)
    assert (state.epoch, state.batch) == (3, 0) and optimizer.param_groups[0]["lr"] == 1e-2
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    names = [n for n, _ in model.named_parameters()]
    adam = optimizer.state_dict()["state"]
    read = {f"optimizers/0/state/{names[i]}/{key}": value for i, entries in adam.items() for key, value in entries.items()}
    stopper, ema = callbacks.callbacks[0], callbacks.callbacks[1]
    assert stopper.best_weights is not None  # type: ignore[attr-defined]
    read.update({f"callbacks/{STOPPER}/best_weights/{k}": v for k, v in stopper.best_weights.items()})  # type: ignore[attr-defined]
    read.update({f"callbacks/SwapEMAWeights/tensors/{i}": t for i, t in enumerate(ema.ema_tensors)})  # type: ignore[attr-defined]
    expected = {k: v for k, v in gathered.items() if not k.startswith("model/")}
    assert read.keys() == expected.keys() and len(expected) == 4 * 3 + 5 + 5  # Adam x 4 params, snapshot, EMA
    different = [k for k, v in expected.items() if v.dtype != read[k].dtype or not torch.equal(v, read[k])]
    assert not different, different
