"""Distributed training with torchrun: the digits classifier of quickstart.py on several processes.

What changes against a single-process script is only (1) the process group and the
DistributedDataParallel wrap, and (2) a DistributedSampler for the loaders. Callbacks, `fit`,
`evaluate` and `predict` are unchanged: files, progress bars and logs come from rank 0 only, epoch
metrics are means over every process's samples, and every process stops at the same epoch.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --out runs/ddp
    # kill it at any moment (Ctrl-C, SIGKILL) and run the same command again: it resumes exactly.

Uses scikit-learn's bundled digits data (no download). On GPUs the same script uses NCCL.
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchcallbacks as tc


def accuracy(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_pred.argmax(dim=1) == y).float().mean()


accuracy.mode = "max"  # type: ignore[attr-defined]  # tells monitors that higher is better


def datasets() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return TensorDataset(x[:1200], y[:1200]), TensorDataset(x[1200:1500], y[1200:1500]), TensorDataset(x[1500:], y[1500:])


def train(out: Path, epochs: int) -> None:
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 10)
    ).to(device)
    model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    torch.manual_seed(dist.get_rank())  # different dropout masks per process

    # (2) each process reads its own shard; fit calls sampler.set_epoch(epoch) for you
    train, val, test = datasets()
    train_loader = DataLoader(train, batch_size=32, sampler=DistributedSampler(train, shuffle=True))
    val_loader = DataLoader(val, batch_size=256, sampler=DistributedSampler(val, shuffle=False))
    test_loader = DataLoader(test, batch_size=256, sampler=DistributedSampler(test, shuffle=False))

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    callbacks = [
        tc.EarlyStopping(monitor="val_accuracy", patience=5, restore_best_weights=True),
        tc.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2),
        tc.ModelCheckpoint(out / "best.safetensors", monitor="val_accuracy", save_best_only=True,
                           save_weights_only=True),
        tc.CSVLogger(out / "training.csv"),
        tc.TensorBoard(out / "logs"),
        tc.BackupAndRestore(out / "backup", save_freq=20),  # last: it saves the others' state
    ]
    tc.fit(model, train_loader, optimizer=optimizer, loss=F.cross_entropy, metrics={"accuracy": accuracy},
           epochs=epochs, validation_data=val_loader, callbacks=callbacks, verbose=2)

    results = tc.evaluate(model, test_loader, loss=F.cross_entropy, metrics={"accuracy": accuracy},
                          return_dict=True, verbose=0)
    predictions = tc.predict(model, test_loader, gather=True, verbose=0)  # all 297 rows, dataset order
    if dist.get_rank() == 0:  # your own prints: rank 0 only
        print(f"test accuracy: {results['accuracy']:.4f} ({len(predictions)} predictions gathered)")


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a digits classifier with torchrun + DDP.")
    parser.add_argument("--out", type=Path, default=Path("runs/ddp"), help="where logs and files go")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    # (1) the process group; NCCL on GPUs, gloo on CPUs: the rest of the script is the same
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    train(args.out, args.epochs)
    # End the group once the DDP model is gone (torch 2.13 on CPU can abort at exit now and then when a
    # DDP model is still alive then).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
