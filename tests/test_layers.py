"""The layering of issue 15: the engine does not know the simulator; no module reaches up."""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

import batchrunner
from batchrunner.engine import endpoint as local
from batchrunner.errors import UsageError

PACKAGE = Path(batchrunner.__file__).parent


def test_importing_the_engine_does_not_import_the_simulator() -> None:
    code = (
        "import sys, batchrunner.engine.runner\n"
        "assert 'batchrunner.engine.runner' in sys.modules\n"
        "print('batchrunner.simulator' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, check=True)
    assert done.stdout.strip() == "False"


def test_the_command_line_starts_without_pandas_or_jsonschema() -> None:
    """Each costs a tenth of a second or more to import: `status`, `--help` and runs without a
    schema need neither (a module-level `pa.scalar` once pulled pandas in)."""
    code = (
        "import sys, batchrunner.cli.commands, batchrunner.engine.runner\n"
        "print(sorted(m for m in ('pandas', 'jsonschema') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, check=True)
    assert done.stdout.strip() == "[]"


def test_a_local_endpoint_starts_the_simulator_only_when_asked() -> None:
    async def main() -> tuple[str, str]:
        async with local.endpoint(True) as (url, key):
            assert "batchrunner.simulator" in sys.modules
            return url, key

    url, key = asyncio.run(main())
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url.rstrip("/")), url
    assert key.startswith("sk-ru-local-")


def test_a_remote_endpoint_needs_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RU_LLM_API_KEY", raising=False)

    async def main() -> None:
        async with local.endpoint(False, "http://127.0.0.1:9/v1", None):
            pass

    with pytest.raises(UsageError):
        asyncio.run(main())


# The layers, lowest first: a module imports its own sub-package and the layers below it,
# never one beside or above, not even inside a function (imports under `if TYPE_CHECKING:` are for type
# hints only and not counted). The simulator is the server side: beside the client side, it
# takes from the package only the base values and the duration grammar.
LAYERS: list[set[str]] = [
    {"_version", "errors", "results", "clock", "redaction"},
    {"samples"},
    {"answers"},
    {"config"},
    {"store"},
    {"inputs"},
    {"transport", "cache", "simulator"},
    {"engine"},
    {"reports", "viewer"},
    {"api", "structured"},
    {"cli"},
    {"__init__", "__main__"},
]
SIMULATOR_MAY_IMPORT = {"batchrunner.errors", "batchrunner.config.durations"}


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Every module of `package` -> the package's modules it imports, at any depth of its code
    (function-level imports included; `if TYPE_CHECKING:` blocks left out)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for child in ast.walk(stmt)
        }
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from pkg import module` imports the module
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for number, names in enumerate(LAYERS):
        if top in names:
            return number
    raise AssertionError(f"{module}: its folder has no layer in LAYERS")


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _top(source) == _top(target):
                continue
            if _top(source) == "simulator":
                if target not in SIMULATOR_MAY_IMPORT:
                    wrong.append(f"{source} -> {target} (the simulator takes only the base)")
            elif layer_of(target) >= layer_of(source):
                wrong.append(f"{source} -> {target}")
    return wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_and_no_arrow_up() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 50  # the whole package was read
    assert circles(graph) == []
    assert arrows_up(graph) == []


def test_the_graph_test_sees_a_circle_and_an_arrow_up(tmp_path: Path) -> None:
    """The check above can fail: a made-up package with a function-level arrow up and a
    circle through relative imports is caught; a type-hint-only import is not an arrow."""
    package = tmp_path / "batchrunner"
    for folder in ("store", "engine"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "store" / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from batchrunner.engine.run import Run\n"
        "def f():\n    from batchrunner.engine import run\n"
    )
    (package / "store" / "b.py").write_text("from . import c\n")
    (package / "store" / "c.py").write_text("from .b import thing\n")
    (package / "engine" / "run.py").write_text("from ..store import a\n")
    graph = import_graph(package)
    assert arrows_up(graph) == ["batchrunner.store.a -> batchrunner.engine.run"]
    assert circles(graph) == [["batchrunner.engine.run", "batchrunner.store.a"],
                              ["batchrunner.store.b", "batchrunner.store.c"]]


def test_no_module_imports_the_package_init() -> None:
    """The package `__init__` is the public face; no module of the package takes names from
    it (sub-packages and modules are imported by their own names)."""
    graph = import_graph(PACKAGE)
    offenders = sorted(source for source, targets in graph.items()
                       if "batchrunner" in targets and source != "batchrunner.__main__")
    assert offenders == []


def test_the_architecture_page_names_every_folder_and_module() -> None:
    """ARCHITECTURE.md is drawn from the tree: a module or a folder it does not name is a
    change it has not caught up with."""
    page = (PACKAGE.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py" and f"`{path.name}`" not in page
        and f"`{path.parent.name}/{path.name}`" not in page
    ]
    missing += [f"{folder.name}/" for folder in sorted(PACKAGE.iterdir())
                if (folder / "__init__.py").exists() and f"`{folder.name}/`" not in page]
    assert missing == []
