"""Run under torchrun with 2 processes: only rank 1 sees a NaN loss (at batch 2); both must stop there.

Each rank writes `rank R stopped after batch B` (or `raised`) to `rank_R.txt` in the working directory.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from torchcallbacks import CallbackList, NonFiniteLossError, TerminateOnNaN


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    raise_error = sys.argv[1:] == ["raise"]
    # check_every=1: every batch (the default under torch.distributed is every 100 batches)
    callbacks = CallbackList([TerminateOnNaN(raise_error=raise_error, check_every=1)], model=torch.nn.Linear(2, 1))
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    last = -1
    try:
        for batch in range(6):
            callbacks.on_train_batch_begin(batch)
            loss = torch.tensor(float("nan") if rank == 1 and batch == 2 else 1.0)
            last = batch
            callbacks.on_train_batch_end(batch, {"loss": loss})
            if callbacks.stop_training:
                break
        verb = "stopped"
    except NonFiniteLossError:
        verb = "raised"
    with open(f"rank_{rank}.txt", "w") as file:
        file.write(f"rank {rank} {verb} after batch {last}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
