"""The package's layers, read from the source with ``ast``: no import cycles, and every import points down.

Every ``import``/``from ... import`` counts, relative or absolute, at module level or inside a function
(a lazy import is still a dependency); only ``if TYPE_CHECKING:`` blocks are left out (never executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

from capaboost.data.task_specs import METRIC_FACTS, TASK_OPTIONS, TASK_SPECS, task_help
from capaboost.train.tasks import TASK_CLASSES, TASKS

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "capaboost"
CORE = ("capaboost.masks", "capaboost.packing", "capaboost.config", "capaboost.tuner", "capaboost.lora", "capaboost.adapter",
        "capaboost.prefix", "capaboost.quantize", "capaboost.export", "capaboost.accounting")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """capaboost module -> the capaboost modules it imports (``from pkg import name`` counts as pkg.name when
    that is a module, else as pkg)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_relative_absolute_and_lazy_imports():
    graph = import_graph()
    assert "capaboost.data.protocols" in graph["capaboost.data.glue"]  # absolute, module level
    assert "capaboost.train.errors" in graph["capaboost.train.methods"]  # relative, module level
    assert "capaboost.train.methods" in graph["capaboost.train.run_config"]  # relative, inside a function
    assert "capaboost" in graph["capaboost.train.trained"]  # `import capaboost` inside a function
    assert "capaboost.train.run_config" not in graph["capaboost.train.methods"]  # TYPE_CHECKING only


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_data_imports_nothing_from_train():
    graph = import_graph()
    upward = {m: sorted(t for t in ts if _under(t, ("capaboost.train", "capaboost.cli")))
              for m, ts in graph.items() if _under(m, ("capaboost.data",))}
    assert not {m: ts for m, ts in upward.items() if ts}


def test_core_modules_import_nothing_from_train_data_or_cli():
    graph = import_graph()
    upward = {m: sorted(t for t in ts if _under(t, ("capaboost.train", "capaboost.data", "capaboost.cli")))
              for m, ts in graph.items() if _under(m, CORE)}
    assert not {m: ts for m, ts in upward.items() if ts}


# ---------------------------------------------------------------- the task table and its readers


def test_every_task_row_has_a_runner_class_and_consistent_facts():
    assert list(TASKS) == list(TASK_SPECS)
    assert {spec.family for spec in TASK_SPECS.values()} == set(TASK_CLASSES)
    for name, spec in TASK_SPECS.items():
        assert spec.main_metric in spec.metrics, name
        assert all(metric in METRIC_FACTS for metric in spec.metrics), name
        assert name in task_help(), name
    for option, users in TASK_OPTIONS.items():
        assert all(option in TASK_SPECS[user].options for user in users)
    assert not TASK_SPECS["causal-lm"].greater_is_better and TASK_SPECS["sst2"].greater_is_better
