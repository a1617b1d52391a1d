"""Sharded training with torchrun and FSDP2: the digits classifier of quickstart.py, its parameters,
gradients and optimizer state split across the processes by `torch.distributed.fsdp.fully_shard`.

What changes against a single-process script is only (1) the process group and the `fully_shard`
calls on a device mesh, and (2) a DistributedSampler for the loaders. Callbacks, `fit` and `evaluate`
are unchanged. Each process writes only its own shards of the backups (a directory of safetensors
files and JSON, no pickle); the best model is written as one full safetensors file that a plain,
unsharded model loads.

    torchrun --standalone --nproc_per_node=2 examples/fsdp_train.py --out runs/fsdp
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
from ddp_train import accuracy, datasets  # the DDP example's digits data and metric (beside this file)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

import torchcallbacks as tc
from torchcallbacks.checkpoint.sharded import export_full_weights


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train(out: Path, epochs: int, device: torch.device) -> None:
    torch.manual_seed(0)  # the same initial weights everywhere: each process keeps its shard of them
    model = make_model().to(device)
    # (1) shard every layer, then the root, over a mesh of all processes
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # (2) each process reads its own shard of the data; fit calls sampler.set_epoch(epoch) for you
    train_set, val_set, test_set = datasets()
    train_loader = DataLoader(train_set, batch_size=32, sampler=DistributedSampler(train_set, shuffle=True))
    val_loader = DataLoader(val_set, batch_size=256, sampler=DistributedSampler(val_set, shuffle=False))
    test_loader = DataLoader(test_set, batch_size=256, sampler=DistributedSampler(test_set, shuffle=False))

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # after fully_shard: on the sharded parameters
    callbacks = [
        tc.EarlyStopping(monitor="val_accuracy", patience=5, restore_best_weights=True),
        tc.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2),
        # full, unsharded weights gathered one tensor at a time; a plain model loads them
        tc.ModelCheckpoint(out / "best.safetensors", monitor="val_accuracy", save_best_only=True, save_weights_only=True),
        tc.CSVLogger(out / "training.csv"),
        tc.TensorBoard(out / "logs", histogram_freq=1, write_graph=False),  # FSDP modules cannot be traced
        tc.BackupAndRestore(out / "backup", save_freq=20),  # each process writes its own shards
    ]
    tc.fit(model, train_loader, optimizer=optimizer, loss=F.cross_entropy, metrics={"accuracy": accuracy},
           epochs=epochs, validation_data=val_loader, callbacks=callbacks, verbose=2, device=device)

    results = tc.evaluate(model, test_loader, loss=F.cross_entropy, metrics={"accuracy": accuracy},
                          return_dict=True, verbose=0, device=device)
    # Hugging Face's layout (model.safetensors, or shards and an index above max_shard_size)
    export_full_weights(model, out / "export")
    if dist.get_rank() == 0:  # your own prints: rank 0 only
        print(f"test accuracy: {results['accuracy']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a digits classifier with torchrun + FSDP2.")
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp"), help="where logs and files go")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    # (1) the process group; NCCL on GPUs, gloo on CPUs: the rest of the script is the same
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    train(args.out, args.epochs, device)
    gc.collect()  # the sharded model is gone before the group ends (see examples/ddp_train.py)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
