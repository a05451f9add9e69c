"""The package's import graph follows one layer order, with no cycle:

    config, runs, compilation, distributed -> kernels -> models, tokenizer, adapters -> query -> engine -> tasks
    -> training | eval -> cli, server

A module may import its own layer or any layer to its left, never one to its right;
training and eval share a layer but never import each other. Function-level imports
count too (they are still arrows), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import spanjax

ROOT = Path(spanjax.__file__).resolve().parents[1]
# Installed as spanjax.<name> from top-level folders of the repository (pyproject's package-dir).
FOLDERS = {"spanjax": ROOT / "spanjax", "spanjax.kernels": ROOT / "kernels", "spanjax.training": ROOT / "training",
           "spanjax.eval": ROOT / "eval"}  # fmt: skip

# Sub-package (or module) of spanjax -> layer rank. Equal ranks may import each other,
# except the pairs in SIBLINGS.
LAYERS = {
    "spanjax": 0,  # the package root (__init__, __main__ are ranked below)
    "spanjax.config": 0,
    "spanjax.runs": 0,
    "spanjax.compilation": 0,
    "spanjax.distributed": 0,  # multi-host initialisation: imports only jax
    "spanjax.kernels": 1,
    "spanjax.models": 2,
    "spanjax.tokenizer": 2,
    "spanjax.adapters": 2,
    "spanjax.query": 3,
    "spanjax.engine": 4,
    "spanjax.tasks": 5,
    "spanjax.training": 6,
    "spanjax.eval": 6,
    "spanjax.cli": 7,
    "spanjax.server": 7,
    "spanjax.__main__": 7,
}
SIBLINGS = {("spanjax.training", "spanjax.eval"), ("spanjax.eval", "spanjax.training")}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if pkg == "spanjax" and rel[0] in ("kernels", "training", "eval"):
                continue
            name = ".".join((pkg, *rel))
            out[name.removesuffix(".__init__")] = path
    return out


def layer_of(module: str) -> str:
    best = "spanjax"
    for name in LAYERS:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    return best


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges = collections.defaultdict(set)
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges[name].add(t)
    return edges


def upward_arrows(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = layer_of(src), layer_of(dst)
            if LAYERS[b] > LAYERS[a] or (a, b) in SIBLINGS:
                bad.append(f"{src} ({a}) imports {dst} ({b})")
    return sorted(bad)


def cycles(mods: dict[str, Path], edges: dict[str, set[str]]) -> list[str]:
    # Package __init__ re-exports make a submodule's import of its own package an edge to
    # its parent; that is how Python resolves the package, not a design cycle.
    graph = {m: {t for t in edges[m] if not m.startswith(t + ".")} for m in mods}
    state, stack, found = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                found.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m)
    return found


def test_no_arrow_against_the_layer_order():
    mods = modules()
    assert "spanjax.kernels.span_attention.reference" in mods and "spanjax.training.trainer" in mods
    bad = upward_arrows(import_edges(mods))
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    mods = modules()
    found = cycles(mods, import_edges(mods))
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_checker_finds_a_planted_cycle_and_upward_arrow(tmp_path, monkeypatch):
    pkg = tmp_path / "spanjax"
    (pkg / "query").mkdir(parents=True)
    (pkg / "engine").mkdir()
    for f in ("__init__.py", "query/__init__.py", "engine/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "query" / "a.py").write_text("from spanjax.engine import b\n")
    (pkg / "engine" / "b.py").write_text("def f():\n    from spanjax.query import a\n")
    (pkg / "engine" / "c.py").write_text("from spanjax.query import a\n")
    monkeypatch.setitem(FOLDERS, "spanjax", pkg)
    for k in ("spanjax.kernels", "spanjax.training", "spanjax.eval"):
        monkeypatch.setitem(FOLDERS, k, tmp_path / "none")
    mods = modules()
    edges = import_edges(mods)
    assert "spanjax.query.a (spanjax.query) imports spanjax.engine.b (spanjax.engine)" in upward_arrows(edges)
    assert "spanjax.engine.c" not in " ".join(upward_arrows(edges))  # downward: allowed
    assert "spanjax.engine.b -> spanjax.query.a -> spanjax.engine.b" in cycles(mods, edges)
