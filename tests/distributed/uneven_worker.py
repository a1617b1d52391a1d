"""torchrun worker: data of different sizes on the two processes. Writes WORKDIR/rank_R.json.

`uneven_worker.py WORKDIR error`: loaders without a DistributedSampler over shards of different sizes (6
and 7 batches): fit must refuse at train begin on every process, naming the counts.
`uneven_worker.py WORKDIR steps`: the same loaders with steps_per_epoch=6: both train and finish.
`uneven_worker.py WORKDIR iterable`: two runs in one launch, on data without a length:
- `epochs`: an iterable dataset giving 6 batches per pass on process 0 and 7 on process 1, 2 epochs:
  every process trains 6 batches per epoch and warns naming the processes;
- `dry`: a one-shot generator of 6 batches on process 0 and 9 on process 1, steps_per_epoch=4, 3 epochs:
  process 0 runs dry in the second epoch and both stop there.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, Subset

import torchcallbacks as tc


class Stream(IterableDataset):
    """`batches` batches of 5 samples per pass, no length."""

    def __init__(self, data: Any, batches: int) -> None:
        self.data, self.batches = data, batches

    def __iter__(self) -> Iterator[Any]:
        for i in range(self.batches):
            yield self.data[5 * i : 5 * i + 5]


class CountBatches(tc.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.per_epoch: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.per_epoch.append(0)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.per_epoch[-1] += 1


def _fit(data: Any, steps: int | None, epochs: int) -> dict[str, Any]:
    model = DistributedDataParallel(common.make_model())
    counter = CountBatches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tc.fit(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=torch.nn.functional.mse_loss,
               epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[counter])
    weights = [p.detach().flatten().tolist() for p in model.module.parameters()]
    return {"batches": counter.per_epoch, "warnings": [str(w.message) for w in caught], "weights": weights,
            "evaluated": _evaluated(model, data)}


def _evaluated(model: torch.nn.Module, data: Any) -> int:
    """Batches evaluate takes: all of this process's own (no agreement: evaluation has no collective
    per batch)."""
    counter = CountBatches()
    counter.on_epoch_begin(0)
    counter.on_test_batch_end = counter.on_train_batch_end  # type: ignore[method-assign]
    if isinstance(data, DataLoader):
        tc.evaluate(model, data, loss=torch.nn.functional.mse_loss, verbose=0, callbacks=[counter])
    return counter.per_epoch[0]


def iterable(rank: int) -> dict[str, Any]:
    data = common.train_set()
    return {
        "epochs": _fit(DataLoader(Stream(data, 6 if rank == 0 else 7), batch_size=None), None, 2),
        "dry": _fit((data[5 * i : 5 * i + 5] for i in range(6 if rank == 0 else 9)), 4, 3),
    }


def main(workdir: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report: dict[str, object] = {}
    if mode == "iterable":
        report = iterable(rank)
    else:
        data = common.train_set()  # 60 samples: 30 / 35 for the two processes, batches of 5
        part = Subset(data, range(0, 30) if rank == 0 else range(25, 60))
        model = DistributedDataParallel(common.make_model())
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
