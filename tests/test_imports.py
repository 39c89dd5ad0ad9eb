"""The nash_lm package has no import cycle, neither among the imports that run when a module is imported nor
once the imports deferred into function bodies are counted too (a deferred import that closes a circle still
ties the two modules together, e.g. an entry point in a library module that imports the entry-point module).

The import graph is built from the source files with `ast` alone (nothing of nash_lm is imported): an edge
M -> T for every import in M (module level, including `if`/`try`/`with` blocks and class bodies; with
`deferred`, function bodies too; never `if TYPE_CHECKING:`), where T is the deepest nash_lm module the import
names (`from nash_lm import x` is nash_lm.x when x is a module, nash_lm otherwise; relative imports resolved
against M's package), plus the packages that must be initialised on the way to T and are not M's own parents.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "nash_lm"


def _modules() -> dict[str, tuple[str, bool]]:
    """module name -> (path, is_package) for every .py file under nash_lm/."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        rel = os.path.relpath(dirpath, ROOT).split(os.sep)
        for f in files:
            if not f.endswith(".py"):
                continue
            if f == "__init__.py":
                out[".".join(rel)] = (os.path.join(dirpath, f), True)
            else:
                out[".".join(rel + [f[:-3]])] = (os.path.join(dirpath, f), False)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(body, deferred: bool):
    """The Import/ImportFrom statements that run when the module body runs (with `deferred`, also those in
    function bodies)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_nodes(node.body, deferred)
            yield from _import_nodes(node.orelse, deferred)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            for part in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _import_nodes(part, deferred)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
            yield from _import_nodes(node.body, deferred)
            yield from _import_nodes(getattr(node, "orelse", []), deferred)
        elif isinstance(node, ast.ClassDef):
            yield from _import_nodes(node.body, deferred)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and deferred:
            yield from _import_nodes(node.body, deferred)


def _deepest(name: str, modules) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _targets(mod: str, is_pkg: bool, node, modules) -> list[str]:
    if isinstance(node, ast.Import):
        return [t for t in (_deepest(a.name, modules) for a in node.names) if t]
    if node.level:  # relative: resolved against this module's package
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if _deepest(name, modules) is None:
        return []
    out = []
    for alias in node.names:  # `from P import x`: the module P.x when there is one, P itself otherwise
        sub = f"{name}.{alias.name}"
        out.append(sub if sub in modules else _deepest(name, modules))
    return out


def import_graph(deferred: bool = False, modules=None, sources=None) -> dict[str, set[str]]:
    """module -> the nash_lm modules it imports; `modules`/`sources` (name -> source text) replace the files."""
    modules = _modules() if modules is None else modules
    graph = {m: set() for m in modules}
    for mod, (path, is_pkg) in modules.items():
        if sources is not None:
            tree = ast.parse(sources[mod])
        else:
            with open(path) as f:
                tree = ast.parse(f.read(), path)
        own_parents = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")))}
        if is_pkg:
            own_parents.add(mod)
        for node in _import_nodes(tree.body, deferred):
            for t in _targets(mod, is_pkg, node, modules):
                graph[mod].add(t)
                parts = t.split(".")
                for i in range(1, len(parts)):  # the packages initialised on the way to t
                    parent = ".".join(parts[:i])
                    if parent not in own_parents:
                        graph[mod].add(parent)
        graph[mod].discard(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_on_a_made_up_package():
    modules = {"p": ("", True), "p.a": ("", False), "p.b": ("", False), "p.sub": ("", True), "p.sub.c": ("", False),
               "p.d": ("", False)}
    sources = {
        "p": "",
        "p.a": "from p import b\nimport numpy\n",
        "p.b": "def f():\n    from p import a\n",
        "p.sub": "from .c import X\n",
        "p.sub.c": "from .. import d\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\n",
        "p.d": "try:\n    import p.sub.c\nexcept ImportError:\n    pass\n",
    }
    eager = import_graph(False, modules, sources)
    assert eager["p.a"] == {"p.b"} and eager["p.b"] == set()
    assert eager["p.sub"] == {"p.sub.c"} and eager["p.sub.c"] == {"p.d"}
    assert eager["p.d"] == {"p.sub", "p.sub.c"}  # p.sub's __init__ runs on the way to p.sub.c
    assert cycles(eager) == [["p.d", "p.sub", "p.sub.c"]]
    full = import_graph(True, modules, sources)
    assert full["p.b"] == {"p.a"}  # the import deferred into a function
    assert cycles(full) == [["p.a", "p.b"], ["p.d", "p.sub", "p.sub.c"]]


def test_the_graph_sees_known_imports():
    graph = import_graph()
    assert "nash_lm.distributed" in graph["nash_lm.train.metrics"]  # `from nash_lm import distributed`
    assert "nash_lm.models.config" in graph["nash_lm.models"]  # a package's __init__ importing its module


def test_no_import_cycle():
    for deferred in (False, True):
        found = cycles(import_graph(deferred))
        assert not found, f"import cycles (deferred={deferred}): " + "; ".join(" <-> ".join(c) for c in found)
