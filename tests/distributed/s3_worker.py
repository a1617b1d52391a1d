"""torchrun worker: BackupAndRestore of a DDP run to an S3 URL (the test's moto server).
`s3_worker.py WORKDIR ENDPOINT URL CRASH_STEP`: 3 epochs of 6 batches per process, a backup every 4
batches, raising after global step CRASH_STEP (0: none). Writes WORKDIR/rank_R.json: the outcome, where
the run resumed from, and the final weights."""

from __future__ import annotations

import os
import sys
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchcallbacks as tc


def main(workdir: str, endpoint: str, url: str, crash: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = DistributedDataParallel(common.make_model(dropout=0.2))
    options = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    backup = tc.BackupAndRestore(url, save_freq=4, storage_options=options)
    report: dict[str, Any] = {}
    try:
        tc.fit(model, common.ddp_loader(common.train_set(), shuffle=True), optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
               loss=torch.nn.functional.mse_loss, epochs=3, verbose=0, callbacks=[backup, *([common.CrashAt(crash)] if crash else [])])
        report["outcome"] = "finished"
    except RuntimeError as error:
        report["outcome"] = f"crashed: {error}"
    report["resumed_at"] = backup.restored.global_step if backup.restored else None
    report["weights"] = {k: v.flatten().tolist() for k, v in tc.distributed.unwrap_model(model).state_dict().items()}
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"), report)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
