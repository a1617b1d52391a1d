"""torchrun worker: counts the collectives torchcallbacks issues (all_reduce, all_gather, barrier,
broadcast, all_gather_object) during `fit`, per epoch, for the default configuration (History +
ProgbarLogger) and for the usual kit (ModelCheckpoint, EarlyStopping, ReduceLROnPlateau,
LearningRateScheduler, TensorBoard, CSVLogger, TerminateOnNaN, BackupAndRestore), with 6 and with 12
batches per epoch. DDP's own gradient all-reduce (in C++) is not counted: it is the training itself.
`collectives_worker.py WORKDIR` writes WORKDIR/rank_R.json; benchmarks/collectives.py prints them."""

from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchcallbacks as tc

COUNTED = ("all_reduce", "all_gather", "barrier", "broadcast", "all_gather_object", "reduce", "gather")
calls: Counter[str] = Counter()


def count(name: str, function: Any) -> Any:
    @functools.wraps(function)
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return function(*args, **kwargs)

    return counted


class EpochCounts(tc.Callback):
    """Collectives issued between consecutive epoch ends (this callback runs last at epoch end)."""

    stops_in_sync = True
    dispatch_order = 10

    def __init__(self) -> None:
        super().__init__()
        self.per_epoch: list[int] = []
        self._last = 0

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        total = sum(calls.values())
        self.per_epoch.append(total - self._last)
        self._last = total


def run(kit: bool, batches: int, workdir: str) -> list[int]:
    data = TensorDataset(torch.randn(batches * 10, 4), torch.randn(batches * 10, 1))
    loader = DataLoader(data, batch_size=5, sampler=DistributedSampler(data, shuffle=True, seed=0))
    model = DistributedDataParallel(common.make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = EpochCounts()
    callbacks: list[tc.Callback] = [counter]
    if kit:
        where = os.path.join(workdir, f"kit{batches}")
        callbacks += [
            tc.ModelCheckpoint(os.path.join(where, "ckpt", "{epoch:02d}.safetensors"), monitor="loss"),
            tc.EarlyStopping(monitor="loss", patience=10),
            tc.ReduceLROnPlateau(monitor="loss", patience=10),
            tc.LearningRateScheduler(lambda epoch, lr: lr),
            tc.TensorBoard(os.path.join(where, "tb")),
            tc.CSVLogger(os.path.join(where, "log.csv")),
            tc.TerminateOnNaN(),
            tc.BackupAndRestore(os.path.join(where, "backup")),
        ]
    tc.fit(model, loader, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=3, verbose=0,
           callbacks=callbacks)
    return counter.per_epoch


def main(workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for name in COUNTED:
        setattr(dist, name, count(name, getattr(dist, name)))
    report: dict[str, Any] = {}
    for kit in (False, True):
        for batches in (6, 12):
            calls.clear()
            report[f"{'kit' if kit else 'default'}_{batches}"] = run(kit, batches, workdir)
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"), report)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1])
