"""torchrun worker: a stateful metric that does not synchronise itself (a plain update/compute/reset
object), monitored by ReduceLROnPlateau. Before, each process decided on its own local value (learning
rates 0.0125 on one process and 0.05 on the other, replicas apart, exit code 0). Writes
WORKDIR/rank_R.json with the logged values, the learning rates and this process's own metric values."""

from __future__ import annotations

import os
import sys
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchcallbacks as tc


class MeanAbsError:
    """Not torchmetrics: keeps its sums locally, knows nothing of other processes."""

    mode = "min"

    def __init__(self) -> None:
        self.local: list[float] = []
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, y_pred: torch.Tensor, y: torch.Tensor) -> None:
        self.total += float((y_pred - y).abs().sum())
        self.count += y.numel()

    def compute(self) -> float:
        value = self.total / max(self.count, 1)
        self.local.append(value)
        return value


def main(workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    model = DistributedDataParallel(common.make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    metric = MeanAbsError()
    lrs: list[float] = []
    record = tc.LambdaCallback(on_epoch_end=lambda epoch, logs: lrs.append(optimizer.param_groups[0]["lr"]))
    record.stops_in_sync = True
    history = tc.fit(model, common.ddp_loader(common.train_set(), shuffle=True), optimizer=optimizer,
                     loss=torch.nn.functional.mse_loss, metrics={"mae": metric}, epochs=4, verbose=0,
                     callbacks=[tc.ReduceLROnPlateau(monitor="mae", factor=0.5, patience=0, mode="max"), record])
    report: dict[str, Any] = {"logged": history.history["mae"], "lrs": lrs, "local": metric.local}
    common.write_json(os.path.join(workdir, f"rank_{dist.get_rank()}.json"), report)
    common.shut_down()


if __name__ == "__main__":
    main(sys.argv[1])
