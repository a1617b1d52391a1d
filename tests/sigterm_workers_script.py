"""A run whose DataLoader has 2 workers drawing random augmentation in `__getitem__`, for the SIGTERM
test: `python sigterm_workers_script.py WORKDIR`; prints `step N` after each batch, writes
WORKDIR/final.safetensors at the end. Backups only on SIGTERM (save_freq=False); PAUSE_AT_STEP: see
script_progress."""

from __future__ import annotations

import os
import sys
import time

import torch
from script_progress import Progress
from torch.utils.data import DataLoader, Dataset

import torchcallbacks as tc


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(128, 4, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.001)  # slow enough for the signal to land mid-epoch
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]  # drawn from the worker's own generator


def main(workdir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    loader = DataLoader(Augmented(), batch_size=8, shuffle=True, num_workers=2)
    tc.fit(model, loader, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), loss=torch.nn.functional.mse_loss,
           epochs=3, verbose=0, callbacks=[Progress(), tc.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=False)])
    tc.save_weights(model, os.path.join(workdir, "final.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
