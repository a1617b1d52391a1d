"""Every Python snippet in README.md and docs/*.md runs as written.

README.md's ```python fences each run on their own, in a fresh namespace: a reader may copy any one
of them, so each defines (or imports) everything it uses. A docs/*.md file's fences run in order in one
namespace (a later snippet may use what an earlier one defined), after a prelude that defines only
small stand-in data and objects the prose assumes (`model`, `train_loader`, `val_loader`,
`test_loader`, `loader`, `optimizer`, `opt`, `loss_fn`, `train_set`); imports are the snippets' own.
All run in a temporary directory. A fence right after the HTML comment `<!-- no-run: reason -->` is
skipped (it needs torchrun, say); the test lists those.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<marker><!--\s*no-run:[^>]*-->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)

PRELUDE = '''
import torch as _torch
from torch.utils.data import DataLoader as _DataLoader, TensorDataset as _TensorDataset

_generator = _torch.Generator().manual_seed(0)

def _classification(n):
    x = _torch.randn(n, 64, generator=_generator)
    return _TensorDataset(x, x[:, :10].argmax(dim=1))

train_set = _classification(64)
train_loader = loader = _DataLoader(train_set, batch_size=16)
val_loader = test_loader = _DataLoader(_classification(32), batch_size=16)
model = _torch.nn.Sequential(_torch.nn.Linear(64, 32), _torch.nn.ReLU(), _torch.nn.Linear(32, 10))
optimizer = opt = _torch.optim.SGD(model.parameters(), lr=0.01)
loss_fn = _torch.nn.functional.cross_entropy
'''


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
    standalone = path.name == "README.md"  # each of its snippets defines what it uses
    namespace: dict = {"__name__": "__docs__"}
    if not standalone:
        exec(compile(PRELUDE, "<prelude>", "exec"), namespace)
    for line, code, skipped in snippets(path):
        if skipped:
            continue
        if standalone:
            namespace = {"__name__": "__docs__"}
        try:
            exec(compile("\n" * (line - 1) + code, str(path.relative_to(ROOT)), "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{path.relative_to(ROOT)}:{line}: the snippet raised {type(exc).__name__}: {exc}") from exc
    assert os.getcwd() == str(tmp_path)
