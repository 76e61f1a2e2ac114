"""The package's import structure: every import points down the layer table (README, design
notes), no import cycles, no function-level imports of fntk modules, private names stay inside
their package, and no ``sys.path`` edits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fntk"

BASE = {"errors", "settings", "version", "validation", "distributed", "inputs"}
LIBRARY = BASE | {"linearize", "linalg", "likelihoods", "ntk", "operators", "persist", "curvature", "gp",
                  "classify"}
#: unit (top-level module or subpackage of fntk) → the units it may import
ALLOWED = {
    "errors": set(),
    "settings": set(),
    "version": set(),
    "validation": set(),
    "distributed": set(),
    "inputs": {"errors", "settings"},
    "linearize": {"errors", "settings", "distributed", "inputs"},
    "linalg": {"errors"},
    "likelihoods": {"errors"},
    "ntk": BASE | {"linearize", "linalg", "likelihoods"},
    "operators": BASE | {"linearize", "linalg", "likelihoods", "ntk"},
    "persist": BASE | {"linearize", "likelihoods", "ntk"},
    "curvature": {"linalg", "operators"},
    "gp": BASE | {"linearize", "linalg", "likelihoods", "ntk", "operators", "persist"},
    "classify": BASE | {"linearize", "linalg", "likelihoods", "ntk", "operators", "persist"},
    "baselines": {"linearize", "inputs"},
    "metrics": set(),
    "data": set(),
    "experiments": LIBRARY | {"baselines", "metrics", "data"},
    "cli": {"distributed", "experiments"},
    "__init__": LIBRARY,
    "__main__": {"cli"},
}


def _modules() -> dict[str, Path]:
    return {".".join(("fntk", *p.relative_to(SRC).with_suffix("").parts)): p for p in SRC.rglob("*.py")}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package(module, path).split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]):
    """(imported fntk module, line, names, at module level) for every import of an fntk module."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fntk":
                    yield a.name, node.lineno, [], id(node) in top
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target.split(".")[0] != "fntk":
                continue
            names = [a.name for a in node.names]
            # "from pkg import submodule" imports the submodule
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            for t in subs or [target]:
                yield t, node.lineno, [n for n in names if f"{target}.{n}" not in known], id(node) in top


MODULES = _modules()
EDGES = [(m, *imp) for m, p in MODULES.items() for imp in _imports(m, p, set(MODULES))]


def test_every_unit_is_in_the_layer_table():
    assert {_unit(m) for m in MODULES} <= set(ALLOWED), {_unit(m) for m in MODULES} - set(ALLOWED)


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_imports_point_down_the_layer_table(unit):
    bad = [
        f"{m}:{line} imports {t}"
        for m, t, line, _, _ in EDGES
        if _unit(m) == unit and _unit(t) != unit and _unit(t) not in ALLOWED[unit] and t != "fntk"
    ]
    assert not bad, bad


def test_no_function_level_imports_of_fntk():
    bad = [f"{m}:{line} imports {t}" for m, t, line, _, top in EDGES if not top]
    assert not bad, bad


def test_private_names_stay_in_their_package():
    bad = []
    for m, t, line, names, _ in EDGES:
        for n in names:
            pkg_m, pkg_t = _package(m, MODULES[m]), t if MODULES.get(t, Path()).name == "__init__.py" else (
                t.rsplit(".", 1)[0])
            if n.startswith("_") and not n.startswith("__") and pkg_m != pkg_t:
                bad.append(f"{m}:{line} imports {t}.{n}")
        if t.rsplit(".", 1)[-1].startswith("_") and not t.endswith("__init__") and (
                _package(m, MODULES[m]) != t.rsplit(".", 1)[0]):
            bad.append(f"{m}:{line} imports the private module {t}")
    assert not bad, bad


def test_no_private_reaches_into_linearized():
    """Outside fntk.linearize nothing touches a Linearized's private attributes (``lin._x``)."""
    bad = []
    for m, p in MODULES.items():
        if _unit(m) == "linearize":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            private = isinstance(node, ast.Attribute) and node.attr[:1] == "_" and node.attr[:2] != "__"
            if not private:
                continue
            owner = getattr(node.value, "id", None) or getattr(node.value, "attr", None)
            if owner == "lin":
                bad.append(f"{m}:{node.lineno} .{node.attr}")
    assert not bad, bad


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, t, *_ in EDGES:
        if t in MODULES and t != m:
            graph[m].add(t)
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if t == _package(m, MODULES[m]) and MODULES[t].name == "__init__.py":
                continue  # a module importing its own package's __init__ names (resolved lazily by Python)
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_sys_path_edits():
    bad = [str(p) for p in MODULES.values() if "sys.path" in p.read_text()]
    assert not bad, bad
