"""Saving the training state of an FSDP2 model: sharded (`save_sharded`) against gathered on rank 0.

Two processes (gloo, CPU) train a stack of Linear layers sharded with `fully_shard` and Adam, then save
the training state (model + Adam moments) `--repeats` times each way, into a directory on `--dir`'s
file system:

- **sharded**: `torchcallbacks.checkpoint.sharded.save_sharded` (every process writes its own shards;
  fsyncs; atomic directory), what BackupAndRestore and ModelCheckpoint(save_weights_only=False) do;
- **sharded, async**: the same through `ShardedCheckpointWriter(async_save=True)` (what
  `async_save=True` does): the time the training thread is blocked (staging: DCP's planning and a copy
  of the shards), the files being written in the background;
- **gathered**: `get_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))`, which
  gathers every tensor to rank 0, then rank 0 writes one safetensors file (atomic, fsynced): what a
  single-file checkpoint of the same model costs.

Per process it reports the median save time and the peak extra resident memory during the save
(Linux's VmHWM after resetting it through /proc/self/clear_refs, minus the resident size before, after
malloc_trim),
against the bytes of that process's own shards of the state.

Usage: python benchmarks/sharded_checkpoint.py [--layers 8] [--width 2048] [--repeats 3] [--dir /tmp]
(it launches torchrun itself).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch


def _status(field: str) -> int:
    with open("/proc/self/status") as file:
        match = re.search(rf"{field}:\s+(\d+) kB", file.read())
    assert match is not None
    return int(match.group(1)) * 1024


def measure(save: Any) -> tuple[float, int]:
    """(seconds, peak extra resident bytes) of one call of `save`."""
    import torch.distributed as dist

    dist.barrier()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory an earlier save freed is not resident any more
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    start = time.perf_counter()
    save()
    dist.barrier()
    seconds = time.perf_counter() - start
    return seconds, _status("VmHWM") - before


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from torchcallbacks.checkpoint.encoding import encode
    from torchcallbacks.checkpoint.sharded import ShardedCheckpointWriter, save_sharded
    from torchcallbacks.checkpoint.writer import atomic_save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(4, args.width)).sum().backward()
    optimizer.step()

    def tree() -> dict[str, Any]:
        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optim": optim_state, "step": 1}

    tensors: dict[str, torch.Tensor] = {}
    encode(tree(), "state", tensors)
    own = sum(t.to_local().numel() * t.to_local().element_size() if isinstance(t, DTensor) else 0 for t in tensors.values())
    full = sum(t.numel() * t.element_size() for t in tensors.values())

    def sharded() -> None:
        save_sharded(os.path.join(args.dir, "sharded"), tree())

    saver = ShardedCheckpointWriter(async_save=True)

    def sharded_async() -> None:
        saver.flush()  # the previous one, published (not timed: measure() calls this again at its start)
        saver.save(os.path.join(args.dir, "async"), tree())

    def gathered() -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        if rank == 0:
            flat: dict[str, torch.Tensor] = {}
            document = encode({"model": model_state, "optim": optim_state, "step": 1}, "state", flat)
            atomic_save_file(flat, os.path.join(args.dir, "gathered.safetensors"), {"document": json.dumps(document)})

    results: dict[str, dict[str, float]] = {}
    for name, save in (("sharded", sharded), ("sharded, async", sharded_async), ("gathered", gathered)):
        save()  # warm-up (first-call costs, page cache)
        runs = []
        for _ in range(args.repeats):
            saver.flush()  # an async save in flight is written and published before the next one is timed
            runs.append(measure(save))
        results[name] = {"seconds": statistics.median(r[0] for r in runs), "peak": max(r[1] for r in runs)}
    saver.flush()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rank": rank, "own": own, "full": full, **{k: v for k, v in results.items()}})
    if rank == 0:
        print(json.dumps(everyone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="a directory on the file system to write to")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch.distributed as dist

        worker(args)
        gc.collect()  # the FSDP model is freed before the group ends (gloo can abort at exit otherwise)
        dist.barrier()
        dist.destroy_process_group()
        return
    workdir = tempfile.mkdtemp(prefix="sharded-bench-", dir=args.dir)
    try:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                   "--worker", "--layers", str(args.layers), "--width", str(args.width), "--repeats", str(args.repeats),
                   "--dir", workdir]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if output.returncode != 0:
            raise SystemExit(output.stderr[-4000:])
        ranks = json.loads(output.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    mib = 2**20
    full = ranks[0]["full"]
    print(f"FSDP2 model, {args.layers} x Linear({args.width}, {args.width}) + Adam, 2 processes (gloo, CPU): "
          f"training state {full / mib:.0f} MiB\n")
    print("| save | process | own shards | median time | peak extra memory | peak / own shards |")
    print("|---|---:|---:|---:|---:|---:|")
    for way in ("sharded", "sharded, async", "gathered"):
        for r in ranks:
            own = r["own"]
            print(f"| {way} | {r['rank']} | {own / mib:.0f} MiB | {r[way]['seconds']:.3f} s | "
                  f"{r[way]['peak'] / mib:.0f} MiB | {r[way]['peak'] / own:.2f}x |")


if __name__ == "__main__":
    main()
