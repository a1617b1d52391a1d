"""torchrun worker: stopping decisions that differ between processes, in `fit` and in a hand-written DDP
loop driven through `CallbackList`. Each scenario would hang (DDP's gradient all-reduce waiting for a
process that stopped) if the processes did not stop together. Writes WORKDIR/rank_R.json."""

from __future__ import annotations

import os
import sys
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchcallbacks as tc
from torchcallbacks.distributed import reduce_logs


class LocalMetric(tc.Callback):
    """Adds `local`, a value that only this process sees: falling on rank 0, rising on rank 1 from
    epoch 1 on, so that an EarlyStopping on it would stop rank 1 only."""

    stops_in_sync = True

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs["local"] = local_value(epoch)


def local_value(epoch: int) -> float:
    return 1.0 / (epoch + 1) if dist.get_rank() == 0 else float(epoch)


class StopRank1AtBatch(tc.Callback):
    """A user callback that stops mid-epoch on rank 1 only (not marked `stops_in_sync`)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.stop_batch = batch
        self.batches: list[list[int]] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches.append([self.loop.epoch, batch])
        if dist.get_rank() == 1 and batch == self.stop_batch:
            self.model.stop_training = True


class StopRank1AtEpochBegin(tc.Callback):
    """A user callback that asks to stop in on_epoch_begin of epoch 1, on rank 1 only. Before, rank 1
    left after one batch while rank 0 trained on, and the job died in a gloo collective mismatch."""

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if dist.get_rank() == 1 and epoch == 1:
            self.model.stop_training = True


class RecordBatches(tc.Callback):
    stops_in_sync = True  # never stops: adds no per-batch agreement of its own

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches.append([self.loop.epoch, batch])


class StopRank0AtTrainBegin(tc.Callback):
    def on_train_begin(self, logs: Any = None) -> None:
        if dist.get_rank() == 0:
            self.model.stop_training = True


def fit_run(callbacks: list[tc.Callback]) -> list[int]:
    model = DistributedDataParallel(common.make_model())
    history = tc.fit(
        model, common.ddp_loader(common.train_set(), shuffle=True), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss=torch.nn.functional.mse_loss, epochs=5, verbose=0, callbacks=callbacks,
    )
    return history.epoch


def hand_written_loop(workdir: str) -> dict[str, Any]:
    """The loop a user writes around DDP, with CallbackList: reduced epoch loss, a local metric."""
    model = DistributedDataParallel(common.make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = common.ddp_loader(common.train_set(), shuffle=True)
    early = tc.EarlyStopping(monitor="local", mode="min", patience=1)
    callbacks = tc.CallbackList(
        [tc.CSVLogger(os.path.join(workdir, "hand.csv")),
         tc.ModelCheckpoint(os.path.join(workdir, "hand", "{epoch:02d}.safetensors"), monitor="loss", save_weights_only=True),
         early],
        model=model, optimizer=optimizer, epochs=5, steps=len(loader),
    )
    epochs: list[dict[str, float]] = []
    callbacks.on_train_begin()
    for epoch in range(5):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        callbacks.on_epoch_begin(epoch)
        total, count = torch.zeros(()), 0
        for i, (x, y) in enumerate(loader):
            callbacks.on_train_batch_begin(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(x)
            count += len(x)
            callbacks.on_train_batch_end(i, {"loss": loss.detach()})
        logs = reduce_logs({"loss": total / count}, weight=count)  # the same numbers on every process
        logs["local"] = local_value(epoch)  # deliberately NOT reduced: differs per process
        epochs.append(dict(logs))
        callbacks.on_epoch_end(epoch, logs)
        if callbacks.stop_training:
            break
    callbacks.on_train_end()
    return {"epochs": epochs, "stopped_epoch": early.stopped_epoch}


def main(workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    report: dict[str, Any] = {}
    # 1. EarlyStopping on a per-process value: rank 1 would stop after epoch 2 (index 1), rank 0 never.
    report["fit_epoch_stop"] = fit_run([LocalMetric(), tc.EarlyStopping(monitor="local", mode="min", patience=1)])
    # 2. A user callback stops rank 1 after batch 2 of epoch 0: both must stop there.
    stopper = StopRank1AtBatch(2)
    report["fit_batch_stop_epochs"] = fit_run([stopper])
    report["fit_batch_stop_batches"] = stopper.batches
    # 3. A stop asked in on_epoch_begin (epoch 1) on rank 1 only: both train that epoch's first batch
    # (Keras reads the flag after each batch), then stop; and one asked in on_train_begin on rank 0.
    record = RecordBatches()
    report["fit_epoch_begin_stop_epochs"] = fit_run([StopRank1AtEpochBegin(), record])
    report["fit_epoch_begin_stop_batches"] = record.batches
    report["fit_train_begin_stop_epochs"] = fit_run([StopRank0AtTrainBegin()])
    # 4. The hand-written loop.
    report["hand"] = hand_written_loop(workdir)
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"), report)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1])
