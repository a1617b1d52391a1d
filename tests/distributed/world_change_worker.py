"""torchrun worker: BackupAndRestore across a change of the number of processes.
`world_change_worker.py WORKDIR SAVE_FREQ CRASH_STEP`: trains 3 epochs (12 batches of 5 per epoch over
all processes), backing up every SAVE_FREQ batches ("epoch" for epoch ends) and raising after global
step CRASH_STEP (0: no crash). Writes WORKDIR/rank_R.json: what happened (finished, crashed, or the
resume error) and the warnings."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import torchcallbacks as tc


def main(workdir: str, save_freq: str, crash: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    data = common.train_set()
    loader = DataLoader(data, batch_size=5, sampler=DistributedSampler(data, shuffle=True, seed=0))
    model = common.make_model()
    if dist.get_world_size() > 1:
        model = DistributedDataParallel(model)
    backup = tc.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=save_freq if save_freq == "epoch" else int(save_freq))
    report: dict[str, Any] = {"world": dist.get_world_size()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tc.fit(model, loader, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=torch.nn.functional.mse_loss,
                   epochs=3, verbose=0, callbacks=[backup, *([common.CrashAt(crash)] if crash else [])])
            report["outcome"] = "finished"
            report["resumed_at"] = [backup.restored.epoch, backup.restored.batch] if backup.restored else None
        except tc.CheckpointError as error:
            report["outcome"] = f"refused: {error}"
        except RuntimeError as error:
            report["outcome"] = f"crashed: {error}"
    report["warnings"] = [str(w.message) for w in caught]
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"), report)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
