"""The package's import graph: no cycles (lazy imports included), layers import downward, config is a torch-free leaf."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dnet_fast"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


EXTENSION = "dnet_fast._C"  # the compiled module (no .py source)


def _resolve(name: str) -> str | None:
    """The dnet_fast module an import of ``name`` loads (a name inside a module resolves to the module)."""
    while name and name not in MODULES and name != EXTENSION:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every dnet_fast module ``module`` imports, at the top or inside functions (lazy imports count)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
    resolved = {_resolve(n) for n in found if n == "dnet_fast" or n.startswith("dnet_fast.")}
    return {m for m in resolved if m is not None and m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# The layers of docs/ARCHITECTURE.md, bottom first. A module may import its own layer and the ones below, never one
# above (cycles inside a layer are caught by the cycle test). A module is placed by its longest listed prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0 leaves: no dnet_fast imports (besides the package's version)
    ("dnet_fast", "dnet_fast.config", "dnet_fast.registry", "dnet_fast.atomic", "dnet_fast.stats"),
    # 1 core services: the C++ facades and their twin, on-disk formats, checkpoints, environment, collectives
    ("dnet_fast._reference", "dnet_fast.sampling", "dnet_fast.metrics", "dnet_fast.shardformat",
     "dnet_fast.shardverify", "dnet_fast.checkpoint", "dnet_fast.info", "dnet_fast.distributed"),
    # 2 components, each behind a registry
    ("dnet_fast.models", "dnet_fast.losses", "dnet_fast.schedule", "dnet_fast.data", "dnet_fast.meta",
     "dnet_fast.stage2", "dnet_fast.stage2.methods", "dnet_fast.stage2.features"),
    # 3 assembly: the step, the stack builder, the name check, the converters
    ("dnet_fast.step", "dnet_fast.stack", "dnet_fast.plugins", "dnet_fast.convert"),
    # 4 runs: the loops of both stages, evaluation and what a run directory holds
    ("dnet_fast.runlog", "dnet_fast.rundir", "dnet_fast.history", "dnet_fast.records", "dnet_fast.evaluation",
     "dnet_fast.engine", "dnet_fast.stage2.train"),
    # 5 analysis of finished runs
    ("dnet_fast.report", "dnet_fast.plots", "dnet_fast.compare"),
    # 6 the command line
    ("dnet_fast.cli", "dnet_fast.__main__"),
)


def _layer(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_every_module_has_a_layer():
    assert all(_layer(m) >= 0 for m in MODULES)
    assert _layer("dnet_fast.stage2.train") == 4
    assert _layer("dnet_fast.stage2.methods") == 2
    assert _layer("dnet_fast.meta.phases") == 2
    assert _layer("dnet_fast.convert.cli") == 3


def test_imports_flow_down_the_layers():
    upward = sorted(f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
                    for m, deps in GRAPH.items() for d in deps if d != EXTENSION and _layer(d) > _layer(m))
    assert upward == []


def test_the_walk_sees_lazy_and_relative_imports():
    # a cycle made only of a lazy import must be found
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert "dnet_fast.plugins" in GRAPH["dnet_fast.engine"]
    assert "dnet_fast.engine" in GRAPH["dnet_fast.cli"]  # cli imports the engine inside a function


def test_no_import_cycle_among_dnet_fast_modules():
    assert _cycles(GRAPH) == []


def test_data_does_not_import_convert():
    arrows = {(m, d) for m in GRAPH if m.startswith("dnet_fast.data") for d in GRAPH[m]
              if d.startswith("dnet_fast.convert")}
    assert arrows == set()


@pytest.mark.parametrize("leaf", ["dnet_fast.config", "dnet_fast.registry", "dnet_fast.atomic"])
def test_leaf_modules_import_no_dnet_fast_module(leaf):
    assert GRAPH[leaf] <= {"dnet_fast"}


def test_the_extension_is_reached_only_through_sampling():
    # sampling.py loads _C with importlib (one place, so DNET_FAST_C_PATH can swap in the sanitizer build)
    assert {m for m, deps in GRAPH.items() if EXTENSION in deps} == set()
    assert "_load_extension" in MODULES["dnet_fast.sampling"].read_text()


def test_loading_a_config_does_not_import_torch():
    code = "import sys, dnet_fast.config as c; c.load_config(None, []); c.load_config('demo'); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "False"
