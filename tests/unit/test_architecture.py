"""The package's shape, checked: no import cycles between its modules, `dapo.config` a leaf that
imports no torch, one place that prints, and engines chosen by a registry of import strings."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from toy_run import REPO

SRC = REPO / "src" / "dapo"


def imports_of(path: Path) -> set[str]:
    """Every dapo module `path` imports, at the top or inside a function; imports that only serve
    type hints (`if TYPE_CHECKING:`) are left out: they never run."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dapo."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dapo"):
            if node.module == "dapo":  # from dapo import distributed
                found.update(f"dapo.{a.name}" for a in node.names if (SRC / f"{a.name}.py").exists())
            else:
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {f"dapo.{p.stem}": p for p in SRC.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_by_hand():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_config_is_a_leaf_that_imports_no_torch():
    assert import_graph()["dapo.config"] <= {"dapo.errors"}
    code = "import sys, dapo.config, dapo.cli; dapo.config.DAPOConfig(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_only_progress_and_the_cli_print():
    """Warnings go through the run's Reporter (or a `warn` callable); the console is progress.py's.
    The CLI prints its results; models.py says once that it fetches the default model."""
    allowed = {"progress.py", "cli.py", "models.py", "launch.py"}
    printing = sorted(p.name for p in SRC.glob("*.py") if p.name not in allowed and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        for n in ast.walk(ast.parse(p.read_text()))))
    assert printing == []


def test_engines_are_registered_by_import_string_and_loaded_when_named():
    from dapo.engines import ENGINES, RolloutEngine, engine_class
    from dapo.errors import CheckpointError, ConfigError
    from dapo.rollout import HFEngine

    assert ENGINES["hf"] == "dapo.rollout:HFEngine" and engine_class("hf") is HFEngine
    with pytest.raises(ConfigError, match="unknown rollout engine 'nope'; known: hf, vllm"):
        engine_class("nope")
    # The base class's defaults: nothing to close, no state, and a state it does not keep is refused.
    engine = HFEngine(None, pad_id=0)
    engine.close()
    assert engine.state_dict() == {}
    engine.load_state_dict({})
    with pytest.raises(CheckpointError, match="rollout-engine state \\['calls'\\], which HFEngine does not keep"):
        engine.load_state_dict({"calls": 3})
    assert issubclass(HFEngine, RolloutEngine)
    # The vLLM engine's module is imported only when asked for.
    code = "import sys, dapo.engines, dapo.trainer; print('dapo.vllm_engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("module", sorted(p.stem for p in SRC.glob("*.py") if ">>> " in p.read_text()))
def test_docstring_examples(module):
    """The `>>>` examples in docstrings (refill and skip arithmetic, mini-batch cuts, thread splits)
    are worked numbers: they must hold."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"dapo.{module}"))
    assert result.attempted and not result.failed
