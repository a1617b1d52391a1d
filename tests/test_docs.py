"""Every Python snippet in README.md and docs/*.md runs as written, on its own.

A reader may copy any one ```python fence, so each runs alone in a fresh namespace with nothing
defined before it: it imports what it uses and makes its own small data. All run in a temporary
directory. A fence right after the HTML comment `<!-- no-run: reason -->` is skipped (it needs
torchrun, say); the test lists those.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<marker><!--\s*no-run:[^>]*-->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)


def snippets(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, skipped) of every ```python fence of `path`."""
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start("code")) + 1, match.group("code"), match.group("marker") is not None)
        for match in FENCE.finditer(text)
    ]


def test_there_are_snippets_and_few_are_skipped() -> None:
    found = {path.name: snippets(path) for path in FILES}
    assert sum(len(s) for s in found.values()) >= 20
    skipped = [(name, line) for name, s in found.items() for line, _, skip in s if skip]
    # only what needs torchrun: README's DDP example and distributed.md's launched scripts
    assert all(name in ("README.md", "distributed.md") for name, _ in skipped) and len(skipped) <= 3, skipped


@pytest.mark.slow  # ~15 s: the README's snippets train for 10, 20 and 100 epochs
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_snippets_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for line, code, skipped in snippets(path):
        if skipped:
            continue
        namespace: dict = {"__name__": "__docs__"}  # each snippet alone: nothing from a prelude or an earlier one
        try:
            exec(compile("\n" * (line - 1) + code, str(path.relative_to(ROOT)), "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{path.relative_to(ROOT)}:{line}: the snippet raised {type(exc).__name__}: {exc}") from exc
    assert os.getcwd() == str(tmp_path)
