"""Every benchmark script still starts: its ``--help`` exits 0, so it imports only what exists (the
public API, README's Architecture section) and does no work at import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def test_the_benchmarks_are_found() -> None:
    assert {"cli_start.py", "search_efficiency.py", "trial_speed.py"} <= {
        p.name for p in BENCHMARKS
    }


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_help(script: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {script.name}"), out.stdout
    assert list(tmp_path.iterdir()) == [], "--help left files behind"


# What benchmarks import from outside the public API, by benchmark: trial_speed labels the
# optimizer step of its profile by the internal optimizer's class.
NOT_PUBLIC = {"trial_speed.py": {"tlsearch.training.adam.FusedAdam"}}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_uses_the_public_api(script: Path) -> None:
    """``tlsearch.<name>`` names only the public API, and nothing else is imported from tlsearch
    but the names listed above."""
    import tlsearch

    imported: set[str] = set()
    attributes: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlsearch"):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("tlsearch.")}
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "tlsearch"
        ):
            attributes.add(node.attr)
    public = {f"tlsearch.{name}" for name in tlsearch.__all__}
    assert imported - public == NOT_PUBLIC.get(script.name, set())
    assert attributes <= set(tlsearch.__all__), attributes - set(tlsearch.__all__)
