"""torchrun worker: MLflowLogger under DDP, crashed and resumed through BackupAndRestore.
`tracker_worker.py WORKDIR TRACKING_URI CRASH_STEP`: trains 3 epochs (6 batches per process and epoch),
batch logs every batch, a backup every 4 batches, raising after global step CRASH_STEP (0: no crash).
Writes WORKDIR/rank_R.json: the outcome and the logger's run id on that process."""

from __future__ import annotations

import os
import sys
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import torchcallbacks as tc


def main(workdir: str, uri: str, crash: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    data = common.train_set()
    loader = DataLoader(data, batch_size=common.BATCH, sampler=DistributedSampler(data, shuffle=True, seed=0))
    model = DistributedDataParallel(common.make_model())
    logger = tc.MLflowLogger(tracking_uri=uri, experiment_name="ddp", update_freq=1, strict=True)
    backup = tc.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=4)
    report: dict[str, Any] = {}
    try:
        tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
               loss=torch.nn.functional.mse_loss, epochs=3, verbose=0,
               callbacks=[logger, backup, *([common.CrashAt(crash)] if crash else [])])
        report["outcome"] = "finished"
    except RuntimeError as error:
        report["outcome"] = f"crashed: {error}"
    report["run_id"] = logger.run_id
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"), report)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
