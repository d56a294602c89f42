"""The package's shape: import-linter's contracts (pyproject.toml), no import cycle at module level,
and a torch-free front (the CLI's quick commands and ``tlsearch.load_config`` never load torch)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, cli_env, merge, tiny_study, write_toml

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    # No cache: a stale one could hide an import just added.
    out = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    report = out.stdout[max(out.stdout.find("Contracts"), 0) :] + out.stderr
    assert out.returncode == 0, report
    assert "0 broken" in out.stdout, report


# ---------------------------------------------------------------------------------------------
# Import cycles among module-level imports (an import inside a function runs when it is called,
# after every module is loaded: that is how a lazy import breaks a cycle).


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: not inside a function, not
    under ``if TYPE_CHECKING:``; inside ``if``/``try``/``with`` blocks and class bodies they do."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.ClassDef):
            found += _module_level_imports(node.body)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            found += _module_level_imports(node.body)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                found += _module_level_imports(block)
            for handler in node.handlers:
                found += _module_level_imports(handler.body)
    return found


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_graph(src: Path, package: str) -> dict[str, set[str]]:
    """``package``'s modules (under ``src``) → the package modules their module-level imports run.

    Importing ``a.b.c`` runs ``a`` and ``a.b`` first, except the importer's own packages, which
    are already loading when it runs; ``from a.b import name`` reads ``name`` from ``a.b``, so it
    needs ``a.b`` even then, unless ``name`` is a submodule.
    """
    modules: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own = {name, *_ancestors(name)}
        edges: set[str] = set()

        def load(target: str, edges: set[str] = edges, own: set[str] = own) -> None:
            edges.update(m for m in (*_ancestors(target), target) if m in modules and m not in own)

        for node in _module_level_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    load(alias.name)
                continue
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, base] if base else here)
            load(base)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    load(f"{base}.{alias.name}")
                elif base in modules and base != name:
                    edges.add(base)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_level_import_cycle() -> None:
    graph = module_graph(ROOT, "tlsearch")
    assert "tlsearch.study.setup" in graph and "tlsearch.storage" in graph["tlsearch.study.setup"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_check_sees_what_python_runs(tmp_path: Path) -> None:
    """A cycle through a package's ``__init__`` is one; a function-level or TYPE_CHECKING import
    is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (pkg / "sub" / "b.py").write_text("from pkg.sub import c\nB = 1\n")
    (pkg / "sub" / "c.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg import d\n"
        "def f():\n    from pkg import d\n"
    )
    (pkg / "d.py").write_text("from . import a\n")
    graph = module_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == set() and graph["pkg.d"] == {"pkg.a"}
    assert find_cycle(graph) is None

    # c importing its package's __init__, which imports b, which imports c.
    (pkg / "sub" / "c.py").write_text("from pkg.sub import B\n")
    assert find_cycle(module_graph(tmp_path, "pkg")) == [
        "pkg.sub",
        "pkg.sub.b",
        "pkg.sub.c",
        "pkg.sub",
    ]
    (pkg / "sub" / "c.py").write_text("")
    # d → a at module level, a → d through a module-level import of a sibling package's module.
    (pkg / "a.py").write_text("import pkg.d\n")
    assert find_cycle(module_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.d", "pkg.a"]


# ---------------------------------------------------------------------------------------------
# The torch-free front, each in a fresh interpreter


def _front(code: str, cwd: Path) -> tuple[dict, subprocess.CompletedProcess[str]]:
    """Run ``code`` in a new interpreter; it ends by printing a JSON line, returned parsed."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=cli_env(cwd),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip(), out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out


def _cli(argv: list[str], cwd: Path) -> tuple[dict, subprocess.CompletedProcess[str]]:
    code = f"""
import json, sys
from tlsearch.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"exit": code, "torch": "torch" in sys.modules}}))
"""
    return _front(code, cwd)


def test_help_loads_no_torch(tmp_path: Path) -> None:
    seen, out = _cli(["--help"], tmp_path)
    assert seen == {"exit": 0, "torch": False}, out.stderr
    assert "usage: tlsearch" in out.stdout


def test_a_study_file_typo_loads_no_torch(tmp_path: Path) -> None:
    write_toml(tmp_path / "bad.toml", merge(TINY, {"n_trails": 3}))
    seen, out = _cli(["run", "bad.toml"], tmp_path)
    assert out.stderr == "tlsearch: error: bad.toml: n_trails: unknown key\n"
    assert seen == {"exit": 2, "torch": False}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("finished")
    study, url = tiny_study(tmp)
    return url, study.study_name


def test_status_loads_no_torch(tmp_path: Path, finished_study: tuple[str, str]) -> None:
    url, name = finished_study
    seen, out = _cli(["status", "--storage", url, "--study-name", name], tmp_path)
    assert seen == {"exit": 0, "torch": False}, out.stderr
    assert f"study '{name}'" in out.stdout
    assert "4 complete" in out.stdout


def test_load_config_loads_neither_torch_nor_optuna(tmp_path: Path) -> None:
    write_toml(tmp_path / "study.toml", TINY)
    code = """
import json, sys
import tlsearch
cfg = tlsearch.load_config("study.toml")
print(json.dumps({"name": cfg.name, "loaded": sorted({"torch", "optuna"} & set(sys.modules))}))
"""
    seen, out = _front(code, tmp_path)
    assert seen == {"name": "tiny", "loaded": []}, out.stderr
