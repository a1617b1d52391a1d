"""Collectives torchcallbacks issues per epoch under torchrun (2 processes, gloo, CPU), counted by
wrapping torch.distributed in the worker (tests/distributed/collectives_worker.py): the default
callbacks (History, ProgbarLogger) and the usual kit (ModelCheckpoint, EarlyStopping,
ReduceLROnPlateau, LearningRateScheduler, TensorBoard, CSVLogger, TerminateOnNaN, BackupAndRestore),
with 6 and with 12 batches per epoch (equal counts: nothing per batch). DDP's own gradient all-reduce
is not counted.

Run: `python benchmarks/collectives.py`. Prints a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed" / "collectives_worker.py"


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(WORKER), workdir], check=True, env=env, cwd=workdir, timeout=300)
        report = json.loads((Path(workdir) / "rank_0.json").read_text())
    print("| callbacks | batches/epoch | first epoch (incl. train begin) | each later epoch |")
    print("|---|---:|---:|---:|")
    for key, counts in report.items():
        config, batches = key.rsplit("_", 1)
        print(f"| {config} | {batches} | {counts[0]} | {counts[1]} |")


if __name__ == "__main__":
    main()
