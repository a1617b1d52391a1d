"""The progress callback of the training scripts the subprocess tests run (resume_script.py,
resume_matrix_script.py, sigterm_workers_script.py): prints `step N` after each batch. With
PAUSE_AT_STEP=N in the environment it then waits for a line on its standard input, so that a test
which signals the run on reading `step N` hits it at step N however loaded the machine is."""

from __future__ import annotations

import os
import sys
from typing import Any

import torchcallbacks as tc


class Progress(tc.Callback):
    stops_in_sync = True  # prints only

    def __init__(self) -> None:
        super().__init__()
        pause = os.environ.get("PAUSE_AT_STEP")
        self.pause_at = int(pause) if pause else None

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        print(f"step {self.loop.global_step}", flush=True)
        if self.loop.global_step == self.pause_at:
            sys.stdin.readline()  # the test sends its signal, then this line
