"""Checkpoint benchmark: a ~100M-parameter model (400 MB of float32).

Measures, in one process and on the same files system:
- save time of `torchcallbacks.save_weights` (atomic: temp file, fsync, rename, directory fsync) against
  `safetensors.torch.save_file` + fsync of the same tensors (what save_weights writes with; the target
  is within 1.05x), `torch.save` of the same state dict (without and with an fsync, since torch.save
  does none) and a raw write of the tensor bytes;
- the time the training thread is blocked by a full training-state save (model + Adam state, ~1.2 GB)
  with `async_save=True` against a synchronous save;
- load time of `torchcallbacks.load_weights` against `torch.load(weights_only=True)`.

Run: `PYTHONPATH=. python benchmarks/checkpoint.py [--repeats 3] [--dir /tmp] [--saves-only]`. Prints a
table of medians and minima, and the ratios of the medians. `--saves-only` times the weights saves
alone (the quick way to more repeats: the times of a write and fsync vary a lot on a shared disk).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import save_file

import torchcallbacks as tc
from torchcallbacks.checkpoint import CheckpointWriter, write_training_state


def make_model() -> torch.nn.Module:
    # 24 blocks of 2048x2048 linear layers: 24 * (2048*2048 + 2048) ~ 100.7M parameters.
    return torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)])


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall times of `repeats` calls; dirty pages of earlier writes are flushed first (untimed) so that one
    method does not pay for the write-back of another."""
    times = []
    for _ in range(repeats):
        os.sync()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """`timed` for each function, taking turns, so that drifts of the machine hit all of them alike.

    Each round runs the functions in a new (seeded) random order: on this machine's file system the
    write after another method's large write or file deletion can cost several times more whichever
    method it is. A fixed order would charge that to one method, and so would a rotation: it keeps
    the cyclic order, so each method follows the same other method in every round but the first.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(repeats):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            times[name] += timed(fns[name], 1)
    return times


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--saves-only", action="store_true", help="time the weights saves only")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, 2048)).sum().backward()
    optimizer.step()  # Adam state: two more tensors per parameter
    state = model.state_dict()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        st_path, pt_path = os.path.join(tmp, "w.safetensors"), os.path.join(tmp, "w.pt")
        rows: list[tuple[str, list[float]]] = []

        def torch_save_fsync() -> None:
            torch.save(state, pt_path)
            fsync_file(pt_path)

        sf_path = os.path.join(tmp, "sf.safetensors")

        def save_file_fsync() -> None:
            save_file(state, sf_path, metadata={"format": "pt"})
            fsync_file(sf_path)

        raw_path = os.path.join(tmp, "raw.bin")

        def raw_write() -> None:
            with open(raw_path, "wb") as f:
                for tensor in state.values():
                    f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))

        saves = interleaved({
            "save_weights (atomic, fsync)": lambda: tc.save_weights(model, st_path),
            "safetensors save_file + fsync": save_file_fsync,
            "torch.save (no fsync)": lambda: torch.save(state, pt_path),
            "torch.save + fsync": torch_save_fsync,
            "raw write of the tensors (no fsync)": raw_write,
        }, args.repeats)
        rows += list(saves.items())
        t_st, t_sf, t_pt, t_pt_sync = (
            statistics.median(saves[k]) for k in ("save_weights (atomic, fsync)", "safetensors save_file + fsync", "torch.save (no fsync)", "torch.save + fsync")
        )

        vs_save_file = (
            f"save_weights / (save_file + fsync): {t_st / t_sf:.2f}x "
            f"(of the minima: {min(saves['save_weights (atomic, fsync)']) / min(saves['safetensors save_file + fsync']):.2f}x)"
        )
        if args.saves_only:
            _report(rows, n_params, state, args.repeats)
            print(vs_save_file)
            return
        full = os.path.join(tmp, "state.safetensors")
        sync_writer, async_writer = CheckpointWriter(), CheckpointWriter(async_save=True)
        loop = tc.CallbackList(model=model, optimizer=optimizer).loop  # what BackupAndRestore saves

        def save_state(writer: CheckpointWriter) -> None:
            write_training_state(full, loop.state_dict(), writer=writer)

        sync_times = timed(lambda: save_state(sync_writer), args.repeats)
        save_state(async_writer)  # allocate the reused host buffers
        async_writer.flush()
        blocked = []
        for _ in range(args.repeats):
            os.sync()
            start = time.perf_counter()
            save_state(async_writer)
            blocked.append(time.perf_counter() - start)
            async_writer.flush()  # let it finish: the next save would wait for it anyway
        rows += [
            ("training state, sync: thread blocked", sync_times),
            ("training state, async: thread blocked", blocked),
        ]

        other = make_model()
        load_times = timed(lambda: tc.load_weights(other, st_path), args.repeats)
        torch_load_times = timed(lambda: other.load_state_dict(torch.load(pt_path, weights_only=True)), args.repeats)
        rows += [("load_weights", load_times), ("torch.load(weights_only=True) + load_state_dict", torch_load_times)]

    _report(rows, n_params, state, args.repeats)
    t_sync, t_async, t_load, t_torch_load = (statistics.median(t) for t in (sync_times, blocked, load_times, torch_load_times))
    print(vs_save_file)
    print(f"save_weights / torch.save:          {t_st / t_pt:.2f}x")
    print(f"save_weights / (torch.save + fsync): {t_st / t_pt_sync:.2f}x")
    print(f"async / sync blocked time:          {t_async / t_sync:.2f}x")
    print(f"load_weights / torch.load:          {t_load / t_torch_load:.2f}x")


def _report(rows: list[tuple[str, list[float]]], n_params: int, state: dict[str, torch.Tensor], repeats: int) -> None:
    size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    print(f"model: {n_params / 1e6:.1f}M parameters, {size_mb:.0f} MB float32; {repeats} repeats")
    width = max(len(name) for name, _ in rows)
    print(f"{'':<{width}}  {'median':>8}    {'min':>8}")
    for name, seconds in rows:
        print(f"{name:<{width}}  {statistics.median(seconds):8.3f} s  {min(seconds):8.3f} s")


if __name__ == "__main__":
    main()
