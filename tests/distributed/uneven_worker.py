"""torchrun worker: loaders without a DistributedSampler over shards of different sizes (6 and 7
batches). `uneven_worker.py WORKDIR error`: fit must refuse at train begin on every process, naming the
counts; `uneven_worker.py WORKDIR steps`: with steps_per_epoch=6 both train and finish.
Writes WORKDIR/rank_R.json."""

from __future__ import annotations

import os
import sys

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

import torchcallbacks as tc


def main(workdir: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = common.train_set()  # 60 samples: 30 / 35 for the two processes, batches of 5
    part = Subset(data, range(0, 30) if rank == 0 else range(25, 60))
    model = DistributedDataParallel(common.make_model())
    report: dict[str, object] = {}
    try:
        history = tc.fit(model, DataLoader(part, batch_size=5), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                         loss=torch.nn.functional.mse_loss, epochs=2, verbose=0,
                         steps_per_epoch=6 if mode == "steps" else None)
        report["epochs"] = history.epoch
    except ValueError as error:
        report["error"] = str(error)
    common.write_json(os.path.join(workdir, f"rank_{rank}.json"), report)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
