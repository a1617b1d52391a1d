"""Data, model and runs shared by the torchrun workers in this folder and by the single-process
reference runs the tests compare them with.

Two processes, each with a `DistributedSampler` shard and batches of `BATCH`, train like one process
whose batch `b` is the union of both processes' batch `b` (`PairedBatches`): the mean loss over that
union is the mean of the two per-process means (equal batch sizes), which is the gradient DDP
averages. So the reference reproduces the DDP run up to float rounding.
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchcallbacks as tc

WORLD = 2
BATCH = 5  # per process
SEED = 7
N_TRAIN = 60  # 30 samples, 6 batches per process
N_VAL = 21  # odd: the DistributedSampler pads one sample
EPOCHS = 6  # EarlyStopping stops the run at epoch 4


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def train_set() -> TensorDataset:
    return dataset(N_TRAIN, 1)


def val_set() -> TensorDataset:
    return dataset(N_VAL, 2)


def make_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(4, 8), torch.nn.ReLU()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 1))


def shard(n: int, rank: int, epoch: int, shuffle: bool) -> list[int]:
    sampler = DistributedSampler(range(n), num_replicas=WORLD, rank=rank, shuffle=shuffle, seed=SEED)
    sampler.set_epoch(epoch)
    return list(sampler)


def ddp_loader(data: TensorDataset, shuffle: bool) -> DataLoader:
    return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=shuffle, seed=SEED))


class PairedBatches:
    """Batch sampler of the single-process reference: batch b = every process's batch b."""

    def __init__(self, n: int, shuffle: bool) -> None:
        self.n, self.shuffle, self.epoch = n, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        shards = [shard(self.n, r, self.epoch, self.shuffle) for r in range(WORLD)]
        for start in range(0, len(shards[0]), BATCH):
            yield [i for s in shards for i in s[start:start + BATCH]]

    def __len__(self) -> int:
        return -(-len(shard(self.n, 0, 0, False)) // BATCH)


def reference_loader(data: TensorDataset, shuffle: bool) -> DataLoader:
    return DataLoader(data, batch_sampler=PairedBatches(len(data), shuffle))


def mae(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_pred - y).abs().mean()


@contextlib.contextmanager
def recorded_writes(workdir: str) -> Iterator[list[str]]:
    """The files under `workdir` this process writes meanwhile (relative paths, in order): each file
    opened for writing or appending (`open`, which is `io.open`, as TensorBoard's writer calls it), and
    each target of an `os.replace` (how every checkpoint is committed)."""
    written: list[str] = []
    real_open, real_replace = builtins.open, os.replace
    root = os.path.realpath(workdir)

    def note(path: Any) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):  # TensorBoard's writer opens bytes paths
            full = os.path.realpath(os.fsdecode(path))
            if full.startswith(root + os.sep):
                written.append(os.path.relpath(full, root))

    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            note(file)
        return real_open(file, mode, *args, **kwargs)

    def replaced(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        note(dst)

    builtins.open, io.open, os.replace = opened, opened, replaced
    try:
        yield written
    finally:
        builtins.open, io.open, os.replace = real_open, real_open, real_replace


def fit_and_report(model: torch.nn.Module, train: DataLoader, val: DataLoader, workdir: str, verbose: int) -> dict[str, Any]:
    """The run of test_ddp_training: fit with the file-writing and deciding callbacks, then evaluate
    and predict(gather=True). Returns what the test compares, with the files this process wrote."""
    callbacks = [
        tc.CSVLogger(os.path.join(workdir, "log.csv")),
        tc.TensorBoard(os.path.join(workdir, "tb")),
        tc.ModelCheckpoint(os.path.join(workdir, "ckpt", "{epoch:02d}-{val_loss:.6f}.safetensors"), monitor="val_loss"),
        tc.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=0.3),
        tc.EarlyStopping(monitor="val_loss", patience=1, min_delta=0.1),
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with recorded_writes(workdir) as written:
        history = tc.fit(
            model, train, optimizer=optimizer, loss=torch.nn.functional.mse_loss, metrics={"mae": mae},
            epochs=EPOCHS, verbose=verbose, validation_data=val, callbacks=callbacks,
        )
    results = tc.evaluate(model, val, loss=torch.nn.functional.mse_loss, metrics={"mae": mae}, return_dict=True, verbose=0)
    predictions = tc.predict(model, val, verbose=0, gather=True)
    checkpoint = callbacks[2]
    assert isinstance(checkpoint, tc.ModelCheckpoint)
    return {
        "history": history.history,
        "evaluate": results,
        "predict": predictions.flatten().tolist(),
        "weights": {k: v.flatten().tolist() for k, v in tc.distributed.unwrap_model(model).state_dict().items()},
        "lr": optimizer.param_groups[0]["lr"],
        "best_path": os.path.basename(checkpoint.best_path or ""),
        "written": sorted(set(written)),
    }


class CrashAt(tc.Callback):
    """Raises RuntimeError("crash") after global step `step`, on every process at the same step."""

    stops_in_sync = True

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.loop.global_step == self.step:
            raise RuntimeError("crash")


def write_json(path: str, value: Any) -> None:
    with open(path, "w") as file:
        json.dump(value, file)


def shut_down() -> None:
    """End the process group once every DistributedDataParallel object is gone (call it after the
    function that held them returned). With a DDP model still alive at interpreter exit, torch 2.13's
    CPU build aborts now and then ("terminate called without an active exception"), even in a
    ten-line script; freeing it first avoids that."""
    gc.collect()
    dist.barrier()  # nobody tears the group down while another process still uses it
    dist.destroy_process_group()
