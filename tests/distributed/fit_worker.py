"""torchrun worker: `fit` / `evaluate` / `predict(gather=True)` of a DDP model with every file-writing and
deciding callback. Run as `torchrun --nproc_per_node=2 fit_worker.py WORKDIR`; each process writes
WORKDIR/rank_R.json (see ddp_common.fit_and_report)."""

from __future__ import annotations

import os
import sys

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def run(workdir: str) -> None:
    model = DistributedDataParallel(common.make_model())
    train = common.ddp_loader(common.train_set(), shuffle=True)
    val = common.ddp_loader(common.val_set(), shuffle=False)
    report = common.fit_and_report(model, train, val, workdir, verbose=2)
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"), report)


def main(workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run(workdir)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1])
