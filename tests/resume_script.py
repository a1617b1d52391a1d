"""A training run used by the resume tests: shuffled DataLoader, dropout, Adam, numpy and Python random
noise in the collate function, ModelCheckpoint, an EarlyStopping-style state callback and
BackupAndRestore. Run as `python resume_script.py WORKDIR SAVE_FREQ`; prints `step N` after each batch
and writes WORKDIR/final.safetensors and WORKDIR/final.json when training ends normally (PAUSE_AT_STEP:
see script_progress)."""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any

import numpy as np
import torch
from script_progress import Progress
from torch.utils.data import DataLoader, TensorDataset, default_collate

import torchcallbacks as tc

EPOCHS = 6


class PatienceState(tc.MonitorCallback):
    """EarlyStopping-like: best value, wait counter and a record of each epoch's decision."""

    def __init__(self) -> None:
        super().__init__(monitor="val_loss")
        self.wait = 0
        self.record: list[list[Any]] = []

    def on_train_begin(self, logs: Any = None) -> None:
        super().on_train_begin()
        if not self.loop.resumed:  # the restore phase ran before: keep a restored state
            self.wait, self.best, self.record = 0, None, []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        current = self.get_monitor_value(logs)
        if current is not None and self._is_improvement(current, self.best):
            self.best, self.wait = current, 0
        else:
            self.wait += 1
        self.record.append([epoch, current, self.wait])

    def state_dict(self) -> dict[str, Any]:
        return {"wait": self.wait, "best": self.best, "record": self.record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait, self.best, self.record = state["wait"], state["best"], state["record"]


def noisy_collate(batch: Any) -> Any:
    x, y = default_collate(batch)
    noise = np.random.normal(0.0, 0.01, size=tuple(x.shape)).astype(np.float32)
    return x + torch.from_numpy(noise) + random.gauss(0.0, 0.01), y


def main(workdir: str, save_freq: str | int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(96, 1, generator=generator)
    train = DataLoader(TensorDataset(x, y), batch_size=12, shuffle=True, collate_fn=noisy_collate)
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ckpt = tc.ModelCheckpoint(
        os.path.join(workdir, "ckpt", "best-{epoch:02d}.safetensors"), monitor="val_loss",
        save_best_only=True, save_weights_only=True, max_to_keep=2,
    )
    patience = PatienceState()
    backup = tc.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=save_freq)
    tc.fit(
        model, train, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=EPOCHS, verbose=0,
        validation_data=val, callbacks=[ckpt, patience, Progress(), backup],
    )
    tc.save_weights(model, os.path.join(workdir, "final.safetensors"))
    with open(os.path.join(workdir, "final.json"), "w") as f:
        json.dump({
            "best": ckpt.best,
            "best_path": os.path.basename(ckpt.best_path or ""),
            # A write killed mid-way leaves a hidden temp file, removed only at the next save there.
            "kept": sorted(n for n in os.listdir(os.path.join(workdir, "ckpt")) if not n.startswith(".")),
            "patience": patience.state_dict(),
            "resumed": backup.restored is not None,
        }, f)


if __name__ == "__main__":
    freq = sys.argv[2]
    main(sys.argv[1], freq if freq == "epoch" else int(freq))
