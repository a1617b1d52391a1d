"""torchrun worker: BackupAndRestore under DDP, with dropout and a different random seed per process, so
an exact resume needs each process's own random states back.

`backup_worker.py WORKDIR run`: trains (resuming from WORKDIR/backup if a backup is there) and writes
WORKDIR/final_R.json with the final weights of process R.
`backup_worker.py WORKDIR hold`: the same, but after the backup at step HOLD_AFTER - 2 and two more
steps, each process writes WORKDIR/held_R (its pid) and sleeps, for the test to SIGKILL the whole job.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchcallbacks as tc

SAVE_FREQ = 4  # 6 batches per epoch: backups at steps 4 (epoch 0, batch 4), 8 (epoch 1, batch 2), ...
HOLD_AFTER = 10  # two steps after the backup at step 8, in the middle of epoch 1
EPOCHS = 3


class Hold(tc.Callback):
    stops_in_sync = True

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.loop.global_step == HOLD_AFTER:
            path = os.path.join(sys.argv[1], f"held_{dist.get_rank()}")
            with open(path + ".tmp", "w") as file:
                file.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(120)


def run(workdir: str, mode: str) -> None:
    torch.manual_seed(100 + dist.get_rank())  # per-process dropout masks
    model = common.make_model(dropout=0.3)
    torch.manual_seed(100 + dist.get_rank())
    model = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    backup = tc.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=SAVE_FREQ)
    callbacks: list[tc.Callback] = [backup] + ([Hold()] if mode == "hold" else [])
    tc.fit(
        model, common.ddp_loader(common.train_set(), shuffle=True), optimizer=optimizer,
        loss=torch.nn.functional.mse_loss, epochs=EPOCHS, verbose=0, callbacks=callbacks,
    )
    weights = {k: v.flatten().tolist() for k, v in model.module.state_dict().items()}
    common.write_json(os.path.join(workdir, f"final_{dist.get_rank()}.json"),
                      {"weights": weights, "resumed": backup.restored is not None})


def main(workdir: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run(workdir, mode)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
