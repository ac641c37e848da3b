"""kvstress's dependencies point one way: no import circle, no module reaching another's private names,
and the CLI answering `plot`, `report` and bad options without loading torch or transformers.

The graph is read with `ast` from the source, every import counted: top-level ones and those
inside functions (which hide a circle from Python, not from a reader), relative ones resolved.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "kvstress"
HEAVY = ("torch", "transformers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name a `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _kvstress_module(name: str) -> str | None:
    """The kvstress module `name` is, or is inside (a name imported from it); None outside kvstress."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str):
    """(imported kvstress module, names bound to kvstress modules, names imported from them, node)."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _kvstress_module(alias.name)
                if target:
                    yield target, {alias.asname: target} if alias.asname else {}, [], node
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:  # `from . import models`: the module itself
                    yield submodule, {alias.asname or alias.name: submodule}, [], node
                else:
                    target = _kvstress_module(source)
                    if target:
                        yield target, {}, [alias.name], node


def import_graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _, _ in _imports(module) if target != module} for module in MODULES}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each one circle or more."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses() -> list[str]:
    """`from kvstress.x import _y` and `x._y` (x a kvstress module) in a module other than x."""
    found = []
    for module, path in MODULES.items():
        bound: dict[str, str] = {}
        for target, names, imported, node in _imports(module):
            bound.update(names)
            found += [f"{module}:{node.lineno} imports {target}.{name}" for name in imported
                      if _private(name) and target != module]
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr)
                    and bound.get(node.value.id, module) != module):
                found.append(f"{module}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return found


def test_the_walker_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "kvstress.spec" in graph["kvstress.config"]  # top level, relative
    assert "kvstress.sweep" in graph["kvstress.cli"]  # inside a command's function
    assert "kvstress.spec" in graph["kvstress.caches.base"] or "kvstress.errors" in graph["kvstress.caches.base"]  # ..
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_no_module_uses_another_modules_private_names():
    assert private_uses() == []


def test_reading_code_imports_only_the_results_format_and_the_events():
    graph = import_graph()
    for reader in ("kvstress.tables", "kvstress.plot", "kvstress.report"):
        allowed = {"kvstress.results", "kvstress.events", "kvstress.errors", "kvstress.sizes", "kvstress.control"}
        assert graph[reader] <= allowed, f"{reader} imports {sorted(graph[reader] - allowed)}"


def test_measuring_code_never_imports_reporting_code():
    graph = import_graph()
    reporting = {"kvstress.tables", "kvstress.plot", "kvstress.report", "kvstress.cli"}
    for module, targets in graph.items():
        if module not in reporting | {"kvstress.__main__"}:
            assert not targets & reporting, f"{module} imports {sorted(targets & reporting)}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`kvstress ARGS` in a fresh interpreter, which then says whether torch or transformers loaded."""
    code = ("import sys\nfrom kvstress.cli import app\n"
            "try:\n    app(args=sys.argv[1:], prog_name='kvstress')\n"
            "except SystemExit as end:\n    code = end.code\n"
            f"print('HEAVY:', [name for name in {HEAVY!r} if name in sys.modules])\n"
            "sys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)


@pytest.mark.parametrize("command", ["plot", "report"])
def test_plot_and_report_load_neither_torch_nor_transformers(command):
    result = _cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "HEAVY: []" in result.stdout


# A built-in method named: `--method all` (the default) also asks the installed policy plugins
# whether they run in `all`, and a plugin (the example one, which other tests install) is free
# to import torch.
@pytest.mark.parametrize("args, error", [
    (["sweep", "-m", "h2o_4_4"], "method spec 'h2o_4_4' should look like h2o_S_W_C"),
    (["sweep", "-m", "h2o", "--lengths", "4k,2k"], "--lengths must increase"),
    (["ppl", "-m", "h2o", "--books", "3,,moby"], "an empty book"),
    (["ppl", "-m", "h2o", "--books", "0"], "asked for 0 PG-19 books"),
], ids=["spec", "lengths", "books", "no-books"])
def test_bad_options_are_answered_before_torch_loads(args, error, tmp_path):
    result = _cli(*args, "--out", str(tmp_path / "r.json"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert error in result.stdout + result.stderr
    assert "HEAVY: []" in result.stdout
    assert not (tmp_path / "r.json").exists()
