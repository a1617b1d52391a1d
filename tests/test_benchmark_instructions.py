"""benchmarks/instructions.py's parsing: the cache geometry handed to callgrind and the per-dump events
read back (the valgrind run itself is a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "instructions.py"


@pytest.fixture(scope="module")
def instructions():
    sys.path.insert(0, str(_PATH.parent))  # it imports overhead.py from beside it
    try:
        spec = importlib.util.spec_from_file_location("instructions", _PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(_PATH.parent))


def _cache(root: Path, index: int, level: int, kind: str, size: str, ways: int) -> None:
    directory = root / f"index{index}"
    directory.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size), ("ways_of_associativity", ways),
                        ("coherency_line_size", 64)):
        (directory / name).write_text(f"{value}\n")


def test_cache_options_take_the_l1_caches_and_the_l2_as_last_level(instructions, tmp_path, monkeypatch) -> None:
    _cache(tmp_path, 0, 1, "Data", "48K", 12)
    _cache(tmp_path, 1, 1, "Instruction", "32K", 8)
    _cache(tmp_path, 2, 2, "Unified", "2048K", 16)
    _cache(tmp_path, 3, 3, "Unified", "260M", 20)
    monkeypatch.setattr(instructions, "_CACHE_SYSFS", str(tmp_path))
    assert sorted(instructions._cache_options()) == sorted(
        ["--cache-sim=yes", "--D1=49152,12,64", "--I1=32768,8,64", "--LL=2097152,16,64"])


def test_cache_options_without_an_l2_exit_with_a_message(instructions, tmp_path, monkeypatch) -> None:
    _cache(tmp_path, 0, 1, "Data", "48K", 12)
    _cache(tmp_path, 1, 1, "Instruction", "32K", 8)
    monkeypatch.setattr(instructions, "_CACHE_SYSFS", str(tmp_path))
    with pytest.raises(SystemExit, match="no L1 and L2 cache geometry"):
        instructions._cache_options()


def test_dump_events_are_read_by_name_and_summed(instructions, tmp_path) -> None:
    prefix = os.path.join(tmp_path, "callgrind.out")
    Path(prefix + ".1").write_text("version: 1\nevents: Ir I1mr D1mr\nsummary: 100 7 3\n")
    Path(prefix + ".2").write_text("version: 1\nevents: Ir I1mr D1mr\ntotals: 50 1 2\n")
    Path(prefix + ".3").write_text("version: 1\n")  # a dump in which nothing ran
    Path(prefix).write_text("events: Ir\nsummary: 999\n")  # the final dump has no number: not an epoch's
    totals = instructions._dump_totals(prefix)
    assert totals == {1: {"Ir": 100, "I1mr": 7, "D1mr": 3}, 2: {"Ir": 50, "I1mr": 1, "D1mr": 2}, 3: {}}
    assert instructions._sum_events(totals[n] for n in (1, 2, 3)) == {"Ir": 150, "I1mr": 8, "D1mr": 5}
    assert instructions._sum_events([]) == {"Ir": 0}
