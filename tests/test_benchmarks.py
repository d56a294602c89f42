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


def test_trial_speed_runs_exactly_the_trials_it_labels(tmp_path: Path) -> None:
    """benchmarks/trial_speed.py's tlsearch studies run the queued trials alone, in their order:
    a study's baseline trials ran first before, so the trial labelled frozen_blocks = 2 ran at
    depth 0."""
    from conftest import FAST, merge

    import tlsearch

    sys.path.insert(0, str(BENCHMARKS[0].parent))
    try:
        import trial_speed
    finally:
        sys.path.pop(0)
    base = tlsearch.config_from_dict(
        merge(FAST, {"pretrain": {"cache_dir": str(tmp_path / "cache")}, "n_trials": 30})
    )
    params = trial_speed.trial_params(base, per_depth=1)
    variant, _, _ = trial_speed.tlsearch_variant(base, tmp_path, "tlsearch", 1, params)
    for _ in params:
        variant.step()
    ran = variant.study.get_trials(deepcopy=False)
    assert [t.params["frozen_blocks"] for t in ran] == [p["frozen_blocks"] for p in params]
    assert [t.params["frozen_blocks"] for t in ran] == [0, 1, 2]
    assert not any("baseline" in t.user_attrs for t in ran)
