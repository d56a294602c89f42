"""Every benchmark still runs: its ``--smoke`` run (the same code path on a tiny budget,
benchmarks/_smoke.py) prints its tables with sane numbers and writes nothing into the repository;
its ``--help`` starts with its usage (it imports only what exists and does no work at import); and
it imports only tlsearch's public API (README, Architecture).

The runs happen in processes of benchmarks/_smoke.py, each of which pays torch's imports once: a
module-scoped fixture runs the benchmarks the selected tests name (all of them for a full run) in
two such processes side by side, the heaviest apart (the rest of the suite runs one test at a
time, and the heavy runs mostly wait on processes of their own).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# The benchmarks; a private helper (benchmarks/_smoke.py) is none.
BENCHMARKS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_the_benchmarks_are_found() -> None:
    assert {"cli_start.py", "search_efficiency.py", "trial_speed.py"} <= {
        p.name for p in BENCHMARKS
    }


# What benchmarks import from outside the public API, by benchmark: trial_speed labels the
# optimizer step of its profile by the internal optimizer's class, and asks the schedule whether
# it stacks a trial's folds (benchmarks/trial_speed.py: "What this benchmark asks of tlsearch's
# fine-tuning internals").
NOT_PUBLIC = {
    "trial_speed.py": {
        "tlsearch.training.adam.FusedAdam",
        "tlsearch.training.Recipe",
        "tlsearch.training.TrialFolds",
    }
}


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
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


# --- the smoke runs -----------------------------------------------------------------------------


# What a study, an export, a figure or a checkpoint would leave at the top level (other files
# there are others' to edit, perhaps while the runs run).
RUN_OUTPUTS = (".db", ".db-journal", ".db-wal", ".db-shm", ".json", ".png", ".pt")


def _outputs() -> dict[str, tuple[int, int]]:
    """What a run could overwrite or add in the repository, by size and mtime: every file under
    benchmarks/ (the committed figures, grids and caches) and the run outputs at the top level."""
    files = [p for p in BENCH.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [p for p in ROOT.iterdir() if p.is_file() and p.name.endswith(RUN_OUTPUTS)]
    return {str(p.relative_to(ROOT)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@dataclass
class Runs:
    """What the runners left: each benchmark's output directory and results, and what the
    working directory and the repository gained or changed."""

    out: dict[str, Path]
    results: dict[str, dict]
    left_in_cwd: list[str]
    changed: list[str]

    def text(self, name: str, suffix: str) -> str:
        return (self.out[name] / f"{name}{suffix}").read_text()

    def output(self, name: str) -> str:
        run = self.results[name]["smoke"]
        err = self.text(name, ".err")
        assert run["exit"] == 0, f"{name} --smoke exited {run['exit']}:\n{err[-5000:]}"
        return self.text(name, ".out")


def _selected(session: pytest.Session) -> list[str]:
    """The benchmarks whose smoke runs the selected tests read (all, for a test of them all)."""
    names: set[str] = set()
    for item in session.items:
        if "smoke" not in getattr(item, "fixturenames", ()):
            continue
        script = getattr(item, "callspec", None) and item.callspec.params.get("script")
        if not script:
            return [p.stem for p in BENCHMARKS]
        names.add(script.stem)
    return sorted(names)


# Rough seconds of each smoke run, to share them between the two processes (others: 0.5).
WEIGHTS = {
    "workers": 4.0,
    "busy_host": 2.0,
    "trial_speed": 2.0,
    "cli_start": 1.0,
    "augmentation": 1.0,
}


def _lanes(names: list[str], n: int = 2) -> list[list[str]]:
    """``names`` shared among ``n`` lanes, each next-heaviest run to the lightest lane."""
    lanes: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for name in sorted(names, key=lambda m: -WEIGHTS.get(m, 0.5)):
        i = load.index(min(load))
        lanes[i].append(name)
        load[i] += WEIGHTS.get(name, 0.5)
    return [lane for lane in lanes if lane]


@pytest.fixture(scope="module")
def smoke(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Every selected benchmark's ``--help`` and ``--smoke``, in two runner processes side by
    side, in an empty working directory."""
    tmp = tmp_path_factory.mktemp("smoke")
    cwd = tmp / "cwd"
    cwd.mkdir()
    before = _outputs()
    lanes = {tmp / f"lane{i}": names for i, names in enumerate(_lanes(_selected(request.session)))}
    procs = [
        subprocess.Popen(
            [sys.executable, str(BENCH / "_smoke.py"), str(out), *names],
            cwd=cwd,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for out, names in lanes.items()
    ]
    try:
        logs = [proc.communicate(timeout=1200)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # none left running if one timed out (a no-op on those that ended)
            proc.wait()
    after = _outputs()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    out: dict[str, Path] = {}
    results: dict[str, dict] = {}
    for (lane, names), log in zip(lanes.items(), logs, strict=True):
        assert (lane / "results.json").is_file(), log
        results |= json.loads((lane / "results.json").read_text())
        out |= dict.fromkeys(names, lane)
        # The seconds of each run, for `pytest -s` (the machine is shared: rough).
        print(f"\n{lane.name}:\n{log}", end="")
    return Runs(out, results, sorted(p.name for p in cwd.iterdir()), changed)


def test_smoke_runs_write_nothing_into_the_repository(smoke: Runs) -> None:
    """Each run's studies, caches, grids and figures went to its --smoke-dir: none into the
    repository (no figure over a committed one), none into the working directory."""
    assert smoke.changed == []
    assert smoke.left_in_cwd == []


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_starts(script: Path, smoke: Runs) -> None:
    """``--help`` exits 0 with the script's usage: it imports only what exists, and no work is
    done at import."""
    run = smoke.results[script.stem]["help"]
    text = smoke.text(script.stem, ".help")
    assert run["exit"] == 0, smoke.text(script.stem, ".err")
    assert text.startswith(f"usage: {script.name}"), text
    assert "--smoke" in text


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_smoke_run(script: Path, smoke: Runs) -> None:
    """The smoke run exits 0 and prints its tables, with sane numbers (the checks below)."""
    CHECKS[script.stem](smoke.output(script.stem), smoke.out[script.stem] / script.stem)


# --- what each smoke run must print -------------------------------------------------------------

NUMBER = r"[-+−]?\d+(?:\.\d+)?"


def _rows(text: str, header: str) -> list[list[str]]:
    """The rows of the space-aligned table whose header line starts with ``header``: its lines up
    to the first blank or unaligned one, split at runs of two or more spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header))
    width = len(re.split(r"\s{2,}", lines[start].strip()))
    rows = []
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != width:
            break
        rows.append(cells)
    return rows


def _markdown(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _number(cell: str) -> float:
    """The first number in a table cell (``1.2x``, ``0.288``, ``+6.3 pp``, ``**0.5**``)."""
    return float(re.search(NUMBER, cell).group().replace("−", "-"))  # type: ignore[union-attr]


def check_trial_speed(text: str, _: Path) -> None:
    trials = re.findall(r"^trial (\d+) \(frozen_blocks=(\d+)\): ", text, re.M)
    assert trials == [("0", "0"), ("1", "1"), ("2", "2")], trials
    rows = _rows(text, "objective  threads")
    assert [r[:2] for r in rows] == [
        ["naive", "1"],
        ["tlsearch", "1"],
        ["naive", "1"],
        ["tlsearch", "1"],
        ["plain path", "1"],
    ]
    for row in rows:
        assert _number(row[2]) > 0 and 0 <= _number(row[6]) <= 1, row
    # The step against its bare forward+backward at each depth and over the trial mix.
    steps = _rows(text, "frozen  step ms")
    assert [r[0] for r in steps] == ["0", "1", "2", "trial mix"], steps
    assert all(_number(r[2]) > 0 for r in steps), steps
    mix = re.search(
        r"bare forward\+backward: (\S+)x over the trial mix \(goal: at most 1.2x\)", text
    )
    assert mix and float(mix[1]) == _number(steps[-1][3]), text
    assert _rows(text, "model  frozen  trained block params"), "folds together vs one by one"
    assert re.search(r"^ +total +\S+ s +\S+ s$", text, re.M), "the profile's total"
    assert "speedup (medians, the trial mix) = less work x faster arithmetic" in text
    resnet = _rows(text, "frozen  trained block params  tlsearch s/trial")
    assert [r[0] for r in resnet] == ["0", "1", "2", "3", "4"], resnet
    assert re.search(rf"^speedup: {NUMBER}x$", text.splitlines()[-1]), text[-300:]


def check_augmentation(text: str, _: Path) -> None:
    for variant in ("off", "on"):
        assert re.search(
            rf"^digits-noisy seed 0 sampler 0 {variant}: selected ({NUMBER}), plain ({NUMBER}) "
            rf"\((none|translate|affine|erase|mixup|cutmix)\), {NUMBER} s$",
            text,
            re.M,
        ), text
    rows = _rows(text, "task ")
    assert [r[:2] for r in rows] == [["digits-noisy", "choosing"]], rows
    assert all(_number(cell) > 0 for cell in rows[0][-1].split("/")), rows


def check_transfer_pays(text: str, _: Path) -> None:
    seed = re.search(
        rf"^seed 0: scratch ({NUMBER})  plain fine-tuning ({NUMBER})  tuned ({NUMBER})", text, re.M
    )
    assert seed, text
    assert all(0 <= float(x) <= 1 for x in seed.groups()), seed.groups()
    assert re.search(r"^tuned beats both baselines on [01]/1 seeds$", text, re.M), text
    assert re.search(rf"^tuned − plain fine-tuning: mean {NUMBER} pp$", text, re.M), text


def check_regularizers(text: str, _: Path) -> None:
    rows = _markdown(text, "| method |")
    methods = ["L2", "L2 + BSS", "L2-SP", "L2-SP + BSS", "DELTA", "DELTA + BSS"]
    assert [r[0] for r in rows] == methods, rows
    assert all(0 <= _number(r[4]) <= 1 for r in rows), rows
    assert re.search(r"^screen \d+ s, total \d+ s", text, re.M), text


def check_cli_start(text: str, _: Path) -> None:
    rows = _rows(text, "command  ")
    assert [r[0] for r in rows] == [
        "tlsearch --help",
        "tlsearch run BAD.toml (a typo)",
        "tlsearch status (finished study)",
    ], rows
    assert all(_number(r[1]) > 0 and _number(r[3]) > 0 for r in rows), rows
    assert "n_trails" in text  # the typo's line names the key


def check_busy_host(text: str, _: Path) -> None:
    rows = _markdown(text, "| scenario |")
    assert [r[0] for r in rows] == ["alone"], rows
    assert _number(rows[0][1]) > 0 and ">" not in rows[0][1], rows
    # The adaptive policy's thread line, read from the run's own output.
    assert re.search(r"^  alone: \d+ thread\(s\) \(\d+ cores", text, re.M), text


def check_workers(text: str, _: Path) -> None:
    rows = _rows(text, "backend  ")
    assert [r[:3] for r in rows] == [["sqlite", "2", "4"]], rows
    assert all(_number(cell) > 0 for cell in rows[0][3:]), rows


def check_search_efficiency(text: str, out: Path) -> None:
    rows = _rows(text, "sampler + pruner")
    samplers, pruners = ["random", "tpe", "gp"], ["none", "median", "wilcoxon"]
    assert [r[0] for r in rows] == [f"{s} + {p}" for s in samplers for p in pruners], rows
    assert all(0 <= _number(r[5]) <= 1 for r in rows), rows
    assert re.search(r"^grid: 12 points", text, re.M), text
    assert (out / "search_efficiency.png").stat().st_size > 0
    assert f"curves: {out / 'search_efficiency.png'}" in text


def check_selection(text: str, _: Path) -> None:
    rules = ["best", "loss", "one_se", "gate", "confirm", "confirm_gate"]
    for space in ("multiplier searched", "multiplier 0.1"):
        lofo = text.split(f"Leave-one-family-out ({space})")[1]
        rows = _markdown(lofo, "| rule (settings chosen on the other families) |")
        assert [r[0] for r in rows] == rules, rows
        assert all(r[-1] in ("0/2", "1/2", "2/2") for r in rows), rows
        variants = _markdown(text.split(f"Variants on every task ({space})")[1], "| variant |")
        assert len(variants) == len(rules), variants


def check_fidelity(text: str, out: Path) -> None:
    rows = _markdown(text, "| pruner |")
    assert len(rows) == 13 and rows[0][0] == "none", rows
    assert rows[0][1:] == ["+0.0 / 1.00"] * 3, rows[0]
    for row in rows:
        shares = [float(cell.split("/")[1]) for cell in row[1:]]
        assert all(0 < s <= 1 for s in shares), row
    assert (out / "fidelity.png").stat().st_size > 0
    assert f"figure: {out / 'fidelity.png'}" in text


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "augmentation": check_augmentation,
    "busy_host": check_busy_host,
    "cli_start": check_cli_start,
    "fidelity": check_fidelity,
    "regularizers": check_regularizers,
    "search_efficiency": check_search_efficiency,
    "selection": check_selection,
    "transfer_pays": check_transfer_pays,
    "trial_speed": check_trial_speed,
    "workers": check_workers,
}
