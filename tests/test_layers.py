"""The package's layers, as docs/architecture.md states them: `training/` on `callbacks/`, `callbacks/`
on `checkpoint/`, all of them on the base modules, and nothing upward; the package root only
re-exports. Every import counts, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "torchcallbacks"
LAYERS = {"training": 3, "callbacks": 2, "checkpoint": 1}  # every other module is a base module (0)


def _layer(module: str) -> int | None:
    """The layer of a dotted module name of ours; None for the package root."""
    parts = module.split(".")
    if parts[0] != "torchcallbacks":
        raise ValueError(module)
    if len(parts) == 1:
        return None
    return LAYERS.get(parts[1], 0)


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of one of our modules in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "torchcallbacks"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torchcallbacks":
            found.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import (the layers are checked on absolute ones)")
    return found


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """Every import of a module by one of a lower layer (or of the package root by anything but the root)."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, package)
        own = _layer(name)
        if own is None:
            continue  # the root re-exports every layer
        for line, imported in _imports(path):
            layer = _layer(imported)
            if layer is None or layer > own:
                problems.append(f"{path.relative_to(package.parent)}:{line} ({name}, layer {own}) imports {imported}")
    return problems


def test_no_module_imports_a_higher_layer_or_the_package_root() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    package = tmp_path / "torchcallbacks"
    (package / "checkpoint").mkdir(parents=True)
    (package / "__init__.py").write_text("from torchcallbacks.training import fit\n")
    (package / "checkpoint" / "files.py").write_text("def f():\n    from torchcallbacks.callbacks.callback import Callback\n")
    (package / "logs.py").write_text("import torchcallbacks\n")
    assert upward_imports(package) == [
        "torchcallbacks/checkpoint/files.py:2 (torchcallbacks.checkpoint.files, layer 1) imports torchcallbacks.callbacks.callback",
        "torchcallbacks/logs.py:1 (torchcallbacks.logs, layer 0) imports torchcallbacks",
    ]


@pytest.mark.parametrize(("module", "layer"), [("torchcallbacks.training.fit", 3), ("torchcallbacks.logs", 0),
                                               ("torchcallbacks.version", 0), ("torchcallbacks.checkpoint", 1)])
def test_layers_of_module_names(module: str, layer: int) -> None:
    assert _layer(module) == layer


# -- torch.distributed: one module talks to process groups -------------------------------------------
#: What each module may import of torch.distributed (docs/architecture.md, "Distributed"): process
#: groups and collectives (`torch.distributed` itself) in distributed.py only; DCP, DTensor and FSDP2's
#: types where FSDP2 states are handled.
DISTRIBUTED = {
    "torchcallbacks.distributed": {"torch.distributed", "torch.distributed.tensor"},
    "torchcallbacks.checkpoint.sharded": {"torch.distributed.checkpoint", "torch.distributed.tensor"},
    "torchcallbacks.checkpoint.dcp_storage": {"torch.distributed.checkpoint"},
    "torchcallbacks.checkpoint.full_weights": {"torch.distributed.tensor"},
    "torchcallbacks.callbacks.loop_state": {"torch.distributed.checkpoint"},
    "torchcallbacks.callbacks.early_stopping": {"torch.distributed.tensor"},
    "torchcallbacks.callbacks.swap_ema_weights": {"torch.distributed.tensor", "torch.distributed.fsdp"},
}


def distributed_imports(package: Path = PACKAGE) -> list[str]:
    """Every import of torch.distributed (or of one of its packages) not in `DISTRIBUTED`: the
    package imported, up to its third part (`torch.distributed.checkpoint.state_dict` counts as
    `torch.distributed.checkpoint`)."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, package)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for imported in names:
                parts = imported.split(".")
                if parts[:2] != ["torch", "distributed"]:
                    continue
                if ".".join(parts[:3]) not in DISTRIBUTED.get(name, set()):
                    problems.append(f"{path.relative_to(package.parent)}:{node.lineno} ({name}) imports {imported}")
    return problems


def test_only_distributed_py_talks_to_process_groups() -> None:
    assert distributed_imports() == []


def test_the_distributed_check_sees_a_collective_imported_elsewhere(tmp_path: Path) -> None:
    package = tmp_path / "torchcallbacks"
    (package / "callbacks").mkdir(parents=True)
    (package / "callbacks" / "model_checkpoint.py").write_text("def f():\n    import torch.distributed as dist\n")
    (package / "callbacks" / "early_stopping.py").write_text("from torch.distributed.checkpoint import save\n")
    (package / "distributed.py").write_text("import torch.distributed as dist\n")
    assert distributed_imports(package) == [
        "torchcallbacks/callbacks/early_stopping.py:1 (torchcallbacks.callbacks.early_stopping) imports "
        "torch.distributed.checkpoint",
        "torchcallbacks/callbacks/model_checkpoint.py:2 (torchcallbacks.callbacks.model_checkpoint) imports torch.distributed",
    ]


# -- fit is the loop: it writes no LoopState field -----------------------------------------------------
def loop_writes(path: Path) -> list[str]:
    """Assignments in `path` to an attribute of something named `loop` (`loop.x = ...`,
    `callbacks.loop.x = ...`) or to `stop_training`: the loop's state is set through LoopState's and
    CallbackList's own methods (`start_run`, the restore phase)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for leaf in ast.walk(target):
                if not isinstance(leaf, ast.Attribute):
                    continue
                owner = leaf.value
                named_loop = (isinstance(owner, ast.Name) and owner.id == "loop") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "loop")
                if named_loop or leaf.attr == "stop_training":
                    found.append(f"{path.name}:{node.lineno} sets {ast.unparse(leaf)}")
    return found


def test_fit_writes_no_loop_state_field() -> None:
    assert loop_writes(PACKAGE / "training" / "fit.py") == []


def test_the_loop_write_check_sees_one(tmp_path: Path) -> None:
    path = tmp_path / "fit.py"
    path.write_text("loop = x.loop\nloop.scaler = s\ncallbacks.loop.initial_epoch, a = 1, 2\ncallbacks.stop_training = False\n")
    assert loop_writes(path) == [
        "fit.py:2 sets loop.scaler", "fit.py:3 sets callbacks.loop.initial_epoch", "fit.py:4 sets callbacks.stop_training",
    ]


# -- checkpoint/: no import cycles -------------------------------------------------------------------
def import_cycles(package: Path = PACKAGE, under: str = "torchcallbacks.checkpoint") -> list[list[str]]:
    """The cycles among the modules under `under` through any of their imports, function-local ones
    included (a function-local import must not be there to hide a cycle)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, package)
        if name == under or not name.startswith(under + "."):
            continue
        graph[name] = {imported for _, imported in _imports(path) if imported.startswith(under + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_checkpoint_modules_import_each_other_without_cycles() -> None:
    assert import_cycles() == []


def test_the_cycle_check_sees_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    package = tmp_path / "torchcallbacks"
    (package / "checkpoint").mkdir(parents=True)
    (package / "checkpoint" / "a.py").write_text("from torchcallbacks.checkpoint.b import f\n")
    (package / "checkpoint" / "b.py").write_text("def f():\n    from torchcallbacks.checkpoint.a import g\n")
    assert import_cycles(package) == [["torchcallbacks.checkpoint.a", "torchcallbacks.checkpoint.b", "torchcallbacks.checkpoint.a"]]
