"""A training command for tests/test_resume_kill.py: killed at random moments and run again until it
finishes, it must end as a run that was never killed.

    python resume_matrix_script.py WORKDIR

Dropout and BatchNorm, a shuffled DataLoader, two optimizers (Adam and SGD with momentum) over
disjoint layers, `steps_per_epoch` shorter than the loader (the iterator carries over between epochs),
validation, `EarlyStopping(restore_best_weights=True)` that stops mid-run (no epoch improves on the
first by `min_delta`), `ModelCheckpoint(save_best_only=True)`, `CSVLogger(append=True)` and
`BackupAndRestore` every 2 batches. Prints `step N` after each training batch (after that batch's
backup is written) and, when training has ended normally, writes WORKDIR/final.safetensors (the
weights) and WORKDIR/final.json (History, the callbacks' results) before the backup is deleted.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from script_progress import Progress
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc

EPOCHS = 8
STEPS_PER_EPOCH = 4  # of 6 batches per pass
PATIENCE = 4  # EarlyStopping stops at epoch PATIENCE (0-based): (PATIENCE + 1) * STEPS_PER_EPOCH steps in all


class WriteResults(tc.Callback):
    """Writes the results at train end, before BackupAndRestore (after it in the list) deletes its
    backup: a kill at any moment leaves either the results or a backup to resume from."""

    def __init__(self, workdir: str, **parts: Any) -> None:
        super().__init__()
        self.workdir, self.parts = workdir, parts

    def on_train_end(self, logs: Any = None) -> None:
        if self.loop.exception is not None:
            return
        ckpt, stopper, history, backup = (self.parts[k] for k in ("ckpt", "stopper", "history", "backup"))
        tc.save_weights(self.model, os.path.join(self.workdir, "final.safetensors"))
        result = {
            "epoch": history.epoch,
            "history": history.history,
            "best": ckpt.best,
            "best_path": os.path.basename(ckpt.best_path or ""),
            "stopped_epoch": stopper.stopped_epoch,
            "best_epoch": stopper.best_epoch,
            "learning_rates": [[group["lr"] for group in opt.param_groups] for opt in self.parts["optimizers"]],
            "resumed": backup.restored is not None,
        }
        temporary = os.path.join(self.workdir, "final.json.tmp")
        with open(temporary, "w") as f:
            json.dump(result, f)
        os.replace(temporary, os.path.join(self.workdir, "final.json"))


def main(workdir: str) -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(48, 1, generator=generator)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )
    optimizers = [
        torch.optim.Adam([*model[0].parameters(), *model[1].parameters()], lr=0.01),
        torch.optim.SGD(model[4].parameters(), lr=0.02, momentum=0.9),
    ]
    ckpt = tc.ModelCheckpoint(os.path.join(workdir, "ckpt", "best.safetensors"), monitor="val_loss",
                              save_best_only=True, save_weights_only=True)
    stopper = tc.EarlyStopping(monitor="val_loss", min_delta=1e9, patience=PATIENCE, restore_best_weights=True)
    csv = tc.CSVLogger(os.path.join(workdir, "log.csv"), append=True)
    history = tc.History()
    backup = tc.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=2)
    results = WriteResults(workdir, ckpt=ckpt, stopper=stopper, history=history, backup=backup, optimizers=optimizers)
    torch.manual_seed(1234)
    tc.fit(
        model, train, optimizer=optimizers, loss=torch.nn.functional.mse_loss, epochs=EPOCHS, verbose=0,
        validation_data=val, steps_per_epoch=STEPS_PER_EPOCH,
        callbacks=[ckpt, stopper, csv, history, results, backup, Progress()],
    )


if __name__ == "__main__":
    main(sys.argv[1])
