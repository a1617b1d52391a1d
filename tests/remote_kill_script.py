"""A training run backing up to S3 for the SIGKILL test of tests/test_remote_storage.py:
`python remote_kill_script.py WORKDIR ENDPOINT URL`: 12 epochs of 8 batches, dropout, Adam, a backup to
URL every 2 batches (uploaded and committed by its manifest); prints `step N` after each batch, before
that step's backup is uploaded; writes WORKDIR/final.safetensors when training ends."""

from __future__ import annotations

import os
import sys

import torch
from script_progress import Progress
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc


def main(workdir: str, endpoint: str, url: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=generator)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 1))
    options = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    backup = tc.BackupAndRestore(url, save_freq=2, double_checkpoint=True, storage_options=options)
    tc.fit(model, data, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), loss=torch.nn.functional.mse_loss,
           epochs=12, verbose=0, callbacks=[Progress(), backup])
    tc.save_weights(model, os.path.join(workdir, "final.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
