"""Per-step instruction counts of `benchmarks/overhead.py`'s contenders, under valgrind's callgrind.

Timings on a shared virtual machine drift by tens of percent between runs, so a difference of a few
percent between `fit` and a plain loop cannot be told apart from noise. An instruction count can: it
is the same run after run, whatever else the machine is doing. This script runs the same workload as
overhead.py (the same model, batches and contenders, imported from it) in one process under
`valgrind --tool=callgrind`; every reading of the benchmark's clock dumps the counters, so each epoch's
instructions are known exactly (user-space instructions of every thread of the process).

Instructions are not time: a wait in `fsync`, a cache miss or a branch mispredicted count for nothing
here, so the usual kit's checkpoint costs more in time than in instructions (see overhead.py for the
times). Start-up is not counted (instrumentation is switched on after the imports and a warm-up run).

Usage: python benchmarks/instructions.py [--epochs 3]   (about two minutes; needs valgrind)
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # beside this script

_CHILD = "TORCHCALLBACKS_CALLGRIND_GO"  # set in the process under callgrind: the file that says "go"
_CONTENDERS = (
    "plain PyTorch loop",
    "torchcallbacks.fit verbose=0",
    "torchcallbacks.fit verbose=1",
    "fit verbose=0 + usual kit",
    "fit verbose=0 + kit, async",
)


def child(epochs: int) -> None:
    """Runs under callgrind: warm up, wait for instrumentation, then run each contender, reading the
    clock through `os.sched_yield` (each call dumps the counters: callgrind's --dump-before)."""
    import torch

    ob = overhead

    torch.set_num_threads(1)
    batches = ob.make_batches()
    runs = {
        "plain PyTorch loop": ob.plain_loop,
        "torchcallbacks.fit verbose=0": ob.torchcallbacks_fit(0),
        "torchcallbacks.fit verbose=1": ob.torchcallbacks_fit(1),
        "fit verbose=0 + usual kit": ob.torchcallbacks_fit(0, with_kit=True),
        "fit verbose=0 + kit, async": ob.torchcallbacks_fit(0, with_kit=True, async_save=True),
    }
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
        if name == "plain PyTorch loop":
            pairs = list(zip(marks[0::2], marks[1::2], strict=True))
        else:
            pairs = list(zip(marks[1::2], marks[2::2], strict=False))
        print("EPOCHS", name, " ".join(f"{a}-{b}" for a, b in pairs[1:]), flush=True)


def _dump_totals(prefix: str) -> dict[int, int]:
    """Instructions of each numbered dump `prefix.<n>`."""
    totals = {}
    for path in glob.glob(prefix + ".*"):
        part = path.rsplit(".", 1)[1]
        if part.isdigit():
            with open(path) as file:
                match = re.search(r"^(?:summary|totals): (\d+)", file.read(), re.MULTILINE)
            totals[int(part)] = int(match.group(1)) if match else 0
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per contender")
    args = parser.parse_args()
    if os.environ.get(_CHILD):
        child(args.epochs)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind (with callgrind_control) is needed: e.g. apt-get install valgrind")
    with tempfile.TemporaryDirectory() as tmp:
        out, go = os.path.join(tmp, "callgrind.out"), os.path.join(tmp, "go")
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-before=sched_yield",
            f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__), "--epochs", str(args.epochs),
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
    per_step: dict[str, float] = {}
    spread: dict[str, float] = {}
    for line in lines:
        if line.startswith("EPOCHS "):
            name, stretches = _split(line[len("EPOCHS ") :])
            counts = [sum(totals.get(n, 0) for n in range(a + 1, b + 1)) for a, b in stretches]
            per_step[name] = min(counts) / overhead.STEPS
            spread[name] = max(counts) / min(counts) - 1
    import torch

    plain = per_step["plain PyTorch loop"]
    print(f"torch {torch.__version__}, 1 thread, MLP 32-64-1, batch 32, {overhead.STEPS} steps/epoch, {args.epochs} epochs "
          "each; instructions per step of the epoch with the fewest, and how many more the one with the most had")
    print(f"| {'loop':<30} | {'instructions/step':>17} | {'ratio':>6} | {'spread':>6} |")
    print(f"|{'-' * 32}|{'-' * 18}:|{'-' * 7}:|{'-' * 7}:|")
    for name in _CONTENDERS:
        print(f"| {name:<30} | {per_step[name]:17,.0f} | {per_step[name] / plain:5.3f}x | {spread[name]:5.1%} |")


def _split(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`"<name> a-b c-d ..."` -> (name, [(a, b), (c, d), ...]); the name may contain spaces."""
    words = text.split(" ")
    stretches = [w for w in words if re.fullmatch(r"\d+-\d+", w)]
    name = " ".join(w for w in words if not re.fullmatch(r"\d+-\d+", w))
    return name, [tuple(map(int, s.split("-"))) for s in stretches]  # type: ignore[misc]


if __name__ == "__main__":
    main()
