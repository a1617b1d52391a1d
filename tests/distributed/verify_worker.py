"""torchrun worker: verify_resume of a DDP pipeline (DistributedSampler, dropout, Adam, EarlyStopping).
`verify_worker.py WORKDIR CASE`: CASE "resumable", or "unsaved" (a callback whose counter its state_dict
does not return). Writes WORKDIR/rank_R.json: report.ok, the report's text, the runs made."""

from __future__ import annotations

import os
import sys
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchcallbacks as tc


class Counter(tc.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.n += 1


def main(workdir: str, case: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")

    def make_run() -> dict[str, Any]:
        model = DistributedDataParallel(common.make_model(dropout=0.2))  # seeded inside
        callbacks: list[tc.Callback] = [tc.EarlyStopping(monitor="val_loss", patience=5)]
        if case == "unsaved":
            callbacks.append(Counter())
        return {"model": model, "x": common.ddp_loader(common.train_set(), shuffle=True),
                "validation_data": common.ddp_loader(common.val_set(), shuffle=False),
                "optimizer": torch.optim.Adam(model.parameters(), lr=0.01), "loss": torch.nn.functional.mse_loss,
                "callbacks": callbacks}

    report = tc.verify_resume(make_run, epochs=2, interrupt_at=[3, "epoch_end:1", "async:8"])
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"),
                      {"ok": report.ok, "text": str(report), "runs": report.runs})
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
