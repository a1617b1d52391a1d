"""The examples run as a user would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every example runs in a subprocess


def _load_example(name: str):
    import importlib.util

    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))  # as when run: examples import each other
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_resumes_after_a_kill_starts_fresh_after_a_finish_and_tests_its_best_model(tmp_path) -> None:
    pytest.importorskip("sklearn")
    import signal
    import time

    import torch

    import torchcallbacks as tc

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path), "--epochs", "8"]
    csv = tmp_path / "training.csv"
    # First run: killed (SIGKILL, no cleanup) once three epochs are logged and backed up.
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if csv.exists() and csv.read_text().count("\n") >= 4 and (tmp_path / "backup" / "latest.safetensors").exists():
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, first.stderr.read() if first.stderr else ""
    # The rerun resumes from the backup and finishes: the CSV goes on with the epochs after the backup.
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=True)
    assert result.stdout.startswith(f"Resuming the interrupted run from {tmp_path / 'backup'}\n"), result.stdout
    assert "━" in result.stdout  # verbose=1: the live bar (a line per epoch when not on a terminal)
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("epoch,") and sum(line.startswith("epoch,") for line in lines) == 1
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(8))  # both runs' epochs, each once
    resumed_rows = lines
    assert any((tmp_path / "logs" / "train").iterdir())
    (best,) = tmp_path.glob("best-*.safetensors")  # max_to_keep=1
    # Where the files went is printed.
    for label, path in [("best model (weights)", best), ("epoch logs (CSV)", csv), ("TensorBoard logs", tmp_path / "logs"),
                        ("backup", tmp_path / "backup")]:
        assert re.search(rf"^  {re.escape(label)}: +{re.escape(str(path))}(\s|$)", result.stdout, re.M), result.stdout
    assert set(load_file(best)) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert not any((tmp_path / "backup").glob("*.safetensors"))  # deleted after a normal finish
    # The scores printed are those of the saved best model, and its val_accuracy is the one in its name.
    quickstart = _load_example("quickstart")
    _, val_loader, test_loader = quickstart.load_data()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 10))
    tc.load_weights(model, best)
    metrics = {"accuracy": quickstart.accuracy}
    test = tc.evaluate(model, test_loader, loss=torch.nn.functional.cross_entropy, metrics=metrics, return_dict=True, verbose=0)
    val = tc.evaluate(model, val_loader, loss=torch.nn.functional.cross_entropy, metrics=metrics, return_dict=True, verbose=0)
    printed = float(re.search(r"test accuracy: (\d\.\d+)", result.stdout).group(1))
    assert printed > 0.9, result.stdout
    assert f"{test['accuracy']:.4f}" == f"{printed:.4f}"
    assert f"{val['accuracy']:.4f}" == re.search(r"best-\d+-(\d\.\d+)\.safetensors", best.name).group(1)
    # Run again after it finished: a fresh run (no backup left) that replaces the previous run's files.
    # The previous best model is renamed so that it would stay if a fresh run kept old files.
    best.rename(tmp_path / "best-99-0.0000.safetensors")
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=True)
    assert again.stdout.startswith(f"A fresh run in {tmp_path}\n"), again.stdout
    lines = csv.read_text().splitlines()
    assert sum(line.startswith("epoch,") for line in lines) == 1
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(8))  # one run's rows, not two runs'
    assert lines == resumed_rows  # seeded: the same numbers as the killed and resumed run
    for run in ("train", "validation"):  # one run's event file per writer, not one per run so far
        assert len(list((tmp_path / "logs" / run).glob("events.out.tfevents.*"))) == 1, run
    assert [path.name for path in tmp_path.glob("best-*.safetensors")] == [best.name]


def _torchrun_example(name: str, workdir: Path, epochs: int) -> str:
    """Run examples/<name>.py under torchrun with 2 processes, as its docstring says; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "examples" / f"{name}.py"), "--out", str(workdir), "--epochs", str(epochs)],
        capture_output=True, text=True, timeout=150, env=env, cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test accuracy:") == 1  # rank 0 prints
    return result.stdout


def test_ddp_example_under_torchrun_writes_once_and_agrees(tmp_path) -> None:
    pytest.importorskip("sklearn")
    stdout = _torchrun_example("ddp_train", tmp_path, 4)
    assert "(297 predictions gathered)" in stdout
    assert stdout.count("Epoch 1/4") == 1  # one progress line per epoch, from rank 0
    assert float(re.search(r"test accuracy: (\d\.\d+)", stdout).group(1)) > 0.8, stdout
    assert (tmp_path / "training.csv").read_text().count("\n") == 5  # header + 4 epochs, one writer
    assert len(list((tmp_path / "logs" / "train").iterdir())) == 1
    assert (tmp_path / "best.safetensors").exists() and not (tmp_path / "backup").exists()


def test_fsdp_example_under_torchrun_exports_weights_a_plain_model_loads(tmp_path) -> None:
    pytest.importorskip("sklearn")
    import torch

    import torchcallbacks as tc

    stdout = _torchrun_example("fsdp_train", tmp_path, 3)
    printed = float(re.search(r"test accuracy: (\d\.\d+)", stdout).group(1))
    assert printed > 0.7, stdout
    assert (tmp_path / "training.csv").read_text().count("\n") == 4  # header + 3 epochs, one writer
    assert not (tmp_path / "backup").exists()  # a finished run removes its backup
    # The exported and the best weights are full tensors with plain keys: a plain model loads them.
    example = _load_example("fsdp_train")
    plain = example.make_model()
    names = dict(plain.state_dict())
    best = load_file(tmp_path / "best.safetensors")
    assert {k: v.shape for k, v in best.items()} == {k: v.shape for k, v in names.items()}
    tc.load_weights(plain, tmp_path / "export" / "model.safetensors")
    _, _, test_set = example.datasets()
    metrics = {"accuracy": example.accuracy}
    # the samples the two processes evaluated: DistributedSampler pads 297 to 298 (one repeated)
    shards = [torch.utils.data.DistributedSampler(test_set, num_replicas=2, rank=r, shuffle=False) for r in range(2)]
    seen = torch.utils.data.Subset(test_set, [i for shard in shards for i in shard])
    loader = torch.utils.data.DataLoader(seen, batch_size=256)
    scores = tc.evaluate(plain, loader, loss=torch.nn.functional.cross_entropy, metrics=metrics, return_dict=True, verbose=0)
    assert f"{scores['accuracy']:.4f}" == f"{printed:.4f}"  # the sharded model's score, from the export
