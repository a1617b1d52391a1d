"""A training run with MLflowLogger for the SIGKILL test of tests/test_mlflow_logger.py:
`python tracker_script.py WORKDIR TRACKING_URI`: 3 epochs of 4 batches, batch logs every batch, a
backup every 3 batches; prints `step N` after each batch (PAUSE_AT_STEP: see script_progress)."""

from __future__ import annotations

import os
import sys

import torch
from script_progress import Progress
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc


def main(workdir: str, uri: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16, shuffle=True)
    model = torch.nn.Linear(4, 1)
    tc.fit(
        model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=torch.nn.functional.mse_loss,
        epochs=3, verbose=0, validation_data=DataLoader(TensorDataset(x[:16], x[:16].sum(1, keepdim=True))),
        callbacks=[
            tc.MLflowLogger(tracking_uri=uri, experiment_name="killed", update_freq=1, strict=True),
            tc.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=3),
            Progress(),
        ],
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
