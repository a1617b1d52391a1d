"""Per-step instruction counts of `benchmarks/overhead.py`'s contenders, under valgrind's callgrind.

Timings on a shared virtual machine drift by tens of percent between runs, so a difference of a few
percent between `fit` and a plain loop cannot be told apart from noise. An instruction count can: it
is the same run after run, whatever else the machine is doing. This script runs the same workload as
overhead.py (the same model, batches and contenders, imported from it) in one process under
`valgrind --tool=callgrind`; every reading of the benchmark's clock dumps the counters, so each epoch's
instructions are known exactly (user-space instructions of every thread of the process).

Instructions are not time: a wait in `fsync`, a cache miss or a branch mispredicted count for nothing
here, so the usual kit's checkpoint costs more in time than in instructions (see overhead.py for the
times). With `--cache-sim`, callgrind also simulates this CPU's first-level caches and its L2 (as its
last level: the caches a core has to itself, read from /sys) and counts their misses per step, also
the same run after run. Start-up is not counted (instrumentation is switched on after the imports and
a warm-up run).

Usage: python benchmarks/instructions.py [--epochs 3] [--cache-sim] [--only NAME ...]
(about four minutes, eight with --cache-sim; needs valgrind)
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # beside this script

_CHILD = "TORCHCALLBACKS_CALLGRIND_GO"  # set in the process under callgrind: the file that says "go"
_PLAIN = "plain PyTorch loop"


def child(epochs: int, only: list[str]) -> None:
    """Runs under callgrind: warm up, wait for instrumentation, then run each contender, reading the
    clock through `os.sched_yield` (each call dumps the counters: callgrind's --dump-before)."""
    import torch

    ob = overhead

    torch.set_num_threads(1)
    batches = ob.make_batches()
    runs = {_PLAIN: ob.plain_loop, **{n: r for n, r in ob.fit_contenders().items() if not only or n in only}}
    for run in runs.values():
        run(batches, 1)  # warm-up, not instrumented
    print("READY", flush=True)
    go = os.environ[_CHILD]
    while not os.path.exists(go):
        time.sleep(0.05)
    readings: list[int] = []

    def clock() -> float:
        os.sched_yield()  # dumps the counters of the stretch that ends here
        readings.append(len(readings) + 1)
        return float(readings[-1])

    ob.CLOCK = clock
    for name, run in runs.items():
        first = len(readings)
        run(batches, epochs + 1)  # the first epoch is dropped: the first of a run
        marks = readings[first:]
        # plain_loop reads the clock at each epoch's start and end; fit's EpochTimer twice at each
        # epoch's begin (the end of the epoch before, the start of this one), so an epoch of fit runs
        # from one begin's second reading to the next begin's first (the epoch-end work counts).
        if name == _PLAIN:
            pairs = list(zip(marks[0::2], marks[1::2], strict=True))
        else:
            pairs = list(zip(marks[1::2], marks[2::2], strict=False))
        print("EPOCHS", name, " ".join(f"{a}-{b}" for a, b in pairs[1:]), flush=True)


def _dump_totals(prefix: str) -> dict[int, dict[str, int]]:
    """The events (`Ir`, and with the cache simulation `I1mr`, `D1mr`, ...) of each numbered dump
    `prefix.<n>`."""
    totals: dict[int, dict[str, int]] = {}
    for path in glob.glob(prefix + ".*"):
        part = path.rsplit(".", 1)[1]
        if part.isdigit():
            with open(path) as file:
                text = file.read()
            names = re.search(r"^events: (.+)$", text, re.MULTILINE)
            values = re.search(r"^(?:summary|totals): ([\d ]+)$", text, re.MULTILINE)
            if names is None or values is None:  # a dump with no event (nothing ran)
                totals[int(part)] = {}
                continue
            # not strict: a summary may leave out trailing events that are zero
            totals[int(part)] = dict(zip(names.group(1).split(), map(int, values.group(1).split()), strict=False))
    return totals


_CACHE_SYSFS = "/sys/devices/system/cpu/cpu0/cache"


def _cache_options() -> list[str]:
    """callgrind's cache simulation with this CPU's L1 instruction and data caches, and its L2 as the
    last level: `--I1`, `--D1`, `--LL` as `size,associativity,line size` from /sys (valgrind's own
    guess takes the L3, on a shared machine mostly other guests' cache)."""

    def read(index: str, name: str) -> str:
        with open(os.path.join(index, name)) as file:
            return file.read().strip()

    units = {"K": 1024, "M": 1024 * 1024}
    geometry: dict[str, str] = {}
    for index in sorted(glob.glob(os.path.join(_CACHE_SYSFS, "index*"))):
        option = {("1", "Instruction"): "I1", ("1", "Data"): "D1", ("2", "Unified"): "LL"}.get(
            (read(index, "level"), read(index, "type")))
        if option is not None:
            size = read(index, "size")
            size_bytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
            geometry[option] = (f"--{option}={size_bytes},{read(index, 'ways_of_associativity')},"
                                f"{read(index, 'coherency_line_size')}")
    if len(geometry) != 3:
        sys.exit(f"--cache-sim: no L1 and L2 cache geometry in {_CACHE_SYSFS}")
    return ["--cache-sim=yes", *geometry.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per contender")
    parser.add_argument("--cache-sim", action="store_true",
                        help="also count L1 and L2 misses (callgrind's simulation of this CPU's caches)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this contender (repeatable; the plain loop always runs)")
    args = parser.parse_args()
    if os.environ.get(_CHILD):
        child(args.epochs, args.only)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind (with callgrind_control) is needed: e.g. apt-get install valgrind")
    with tempfile.TemporaryDirectory() as tmp:
        out, go = os.path.join(tmp, "callgrind.out"), os.path.join(tmp, "go")
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-before=sched_yield",
            *(_cache_options() if args.cache_sim else []), f"--callgrind-out-file={out}",
            sys.executable, os.path.abspath(__file__), "--epochs", str(args.epochs),
            *(f"--only={name}" for name in args.only),
        ]
        env = {**os.environ, _CHILD: go, "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            if line.strip() == "READY":
                subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True)
                open(go, "w").close()
            else:
                lines.append(line.strip())
        if process.wait() != 0:
            sys.exit(f"the run under callgrind failed (exit status {process.returncode})")
        totals = _dump_totals(out)
    # Stretch "a-b": from the a-th clock reading to the b-th, i.e. the dumps a+1 .. b (dump n ends
    # right before the n-th reading).
    # Per contender, the epoch with the fewest instructions: its events per step (L1 and L2 misses
    # summed over instruction reads, data reads and data writes), and the instruction spread.
    per_step: dict[str, dict[str, float]] = {}
    spread: dict[str, float] = {}
    for line in lines:
        if line.startswith("EPOCHS "):
            name, stretches = _split(line[len("EPOCHS ") :])
            epochs = [_sum_events(totals.get(n, {}) for n in range(a + 1, b + 1)) for a, b in stretches]
            fewest = min(epochs, key=lambda events: events["Ir"])
            per_step[name] = {
                "Ir": fewest["Ir"] / overhead.STEPS,
                "L1": sum(fewest.get(e, 0) for e in ("I1mr", "D1mr", "D1mw")) / overhead.STEPS,
                "L2": sum(fewest.get(e, 0) for e in ("ILmr", "DLmr", "DLmw")) / overhead.STEPS,
            }
            spread[name] = max(e["Ir"] for e in epochs) / fewest["Ir"] - 1
    import torch

    plain = per_step[_PLAIN]
    columns = [("Ir", "instructions/step", 17)] + ([("L1", "L1 misses/step", 14), ("L2", "L2 misses/step", 14)]
                                                   if args.cache_sim else [])
    print(f"torch {torch.__version__}, 1 thread, MLP 32-64-1, batch 32, {overhead.STEPS} steps/epoch, {args.epochs} epochs "
          "each; per step of the epoch with the fewest instructions (ratios against the plain loop), and how "
          "many more instructions the epoch with the most had")
    print(f"| {'loop':<30} |" + "".join(f" {title:>{width}} | {'ratio':>6} |" for _, title, width in columns)
          + f" {'spread':>6} |")
    print(f"|{'-' * 32}|" + "".join(f"{'-' * (width + 1)}:|{'-' * 7}:|" for _, _, width in columns) + f"{'-' * 7}:|")
    for name in per_step:  # the order they ran in: the plain loop first
        row = per_step[name]
        cells = "".join(f" {row[key]:{width},.0f} | {row[key] / plain[key]:5.3f}x |" for key, _, width in columns)
        print(f"| {name:<30} |{cells} {spread[name]:5.1%} |")


def _sum_events(dumps: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {"Ir": 0}
    for events in dumps:
        for name, value in events.items():
            total[name] = total.get(name, 0) + value
    return total


def _split(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`"<name> a-b c-d ..."` -> (name, [(a, b), (c, d), ...]); the name may contain spaces."""
    words = text.split(" ")
    stretches = [w for w in words if re.fullmatch(r"\d+-\d+", w)]
    name = " ".join(w for w in words if not re.fullmatch(r"\d+-\d+", w))
    return name, [tuple(map(int, s.split("-"))) for s in stretches]  # type: ignore[misc]


if __name__ == "__main__":
    main()
