"""The package's layers: no import cycles, and no import upward (modules/ knows nothing of distributed/
or app/; the library nothing of the app or of the benchmarks and their baselines)."""

import ast
from typing import Dict, List, Set

from tests.helpers import ROOT

PACKAGE = ROOT / "torchrec_multihash"


def _imports() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports anywhere (module level, in functions, under TYPE_CHECKING)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchrec_multihash"):
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("torchrec_multihash")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = _imports()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 200  # the graph was read
    assert _cycles(graph) == []
    # the check finds one: a module importing its importer
    graph["torchrec_multihash.modules.combine"].add("torchrec_multihash.modules.multihash_embedding_bag")
    assert ["torchrec_multihash.modules.combine", "torchrec_multihash.modules.multihash_embedding_bag"] in _cycles(graph)


def test_modules_do_not_import_upward():
    upward = {
        name: sorted(m for m in deps if m.startswith(("torchrec_multihash.distributed", "torchrec_multihash.app")))
        for name, deps in _imports().items()
        if name.startswith("torchrec_multihash.modules")
    }
    assert {name: deps for name, deps in upward.items() if deps} == {}
    library = ("modules", "distributed", "datasets", "learned", "inference", "auto")
    into_app = {
        name: sorted(m for m in deps if m.startswith(("torchrec_multihash.app", "torchrec_multihash.bench")))
        for name, deps in _imports().items()
        if name.split(".")[1:2] and name.split(".")[1] in library
    }
    assert {name: deps for name, deps in into_app.items() if deps} == {}


def test_every_function_fits_on_a_screen():
    # 80 lines at most: a function longer than that is split by what it does
    long = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "launch").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
