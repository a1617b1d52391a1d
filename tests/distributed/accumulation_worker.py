"""torchrun worker: gradient accumulation under DistributedDataParallel. Each process trains on its
DistributedSampler shard with batches of 5 and `gradient_accumulation_steps=2`, counting the
gradient all-reduces (a comm hook), then the same shard with batches of 10 and no accumulation.
Writes WORKDIR/rank_R.json: the all-reduce count and both runs' final weights."""

from __future__ import annotations

import os
import sys

import ddp_common as common
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import torchcallbacks as tc

EPOCHS = 2


def train(batch_size: int, k: int | None, reductions: list[int]) -> list[list[float]]:
    data = common.train_set()
    model = DistributedDataParallel(common.make_model())

    def counting_hook(state, bucket):  # no annotations: DDP rejects the strings `annotations` makes them
        reductions.append(1)
        return allreduce_hook(None, bucket)

    model.register_comm_hook(None, counting_hook)
    loader = DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, shuffle=True, seed=common.SEED))
    tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), loss=F.mse_loss, epochs=EPOCHS,
           verbose=0, gradient_accumulation_steps=k)
    return [p.detach().flatten().tolist() for p in model.module.parameters()]


def main(workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    accumulated: list[int] = []
    big: list[int] = []
    report = {
        "accumulated_weights": train(common.BATCH, 2, accumulated),
        "big_batch_weights": train(2 * common.BATCH, None, big),
    }
    report["accumulated_reductions"] = len(accumulated)
    report["big_batch_reductions"] = len(big)
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"), report)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1])
