"""The ``tlsearch`` command as a user runs it: a subprocess, its exit code, its exact error lines.

The quick error cases run side by side in one module fixture and are checked one test each. The
tiny study has the defaults for storage (sqlite:///tlsearch.db in the working directory) and cache
($TLSEARCH_CACHE, which the runner points into the working directory).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from conftest import FAST, TINY, merge, run_cli, run_many, start_cli, write_toml
from optuna.trial import TrialState

from tlsearch.config import load_config
from tlsearch.export import read_export
from tlsearch.models import create_model
from tlsearch.storage import load_study_config

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _toml(overrides: dict) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        write_toml(d / "bad.toml", merge(TINY, overrides))

    return setup


def _raw(content: bytes | None) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        if content is None:
            (d / "bad.toml").mkdir()
        else:
            (d / "bad.toml").write_bytes(content)

    return setup


def _nothing(d: Path) -> None:
    pass


def _study_without_completed_trial(d: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{d / 's.db'}", study_name="empty")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.01},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 0.1)},
            state=TrialState.PRUNED,
        )
    )


RUN = ["run", "bad.toml"]
QUIET_RUN = ["-q", "run", "bad.toml"]

# id → (setup of the working directory, arguments, exit code, lines stderr must hold exactly).
# tests/test_config.py checks each field error alone; here one file holds several, as a user's may.
CASES: dict[str, tuple[Callable[[Path], None], list[str], int, list[str]]] = {
    "unknown top-level key": (
        _toml({"n_trails": 5}),
        RUN,
        2,
        ["tlsearch: error: bad.toml: n_trails: unknown key"],
    ),
    "several problems, one line each": (
        _toml(
            {
                "nme": "x",
                "data": {"tsk": "y"},
                "finetune": {"epochs": "many"},
                "search": {
                    "lr": {"low": 0.1, "high": 0.01},
                    "lambda": {"low": 0.0, "high": 1.0, "log": True},
                },
                "cv": {"k": 1},
                "regularizer": {"name": "l3"},
            }
        ),
        RUN,
        2,
        [
            "tlsearch: error: bad.toml: nme: unknown key",
            "tlsearch: error: bad.toml: data.tsk: unknown key",
            "tlsearch: error: bad.toml: finetune.epochs: Input should be a valid integer",
            "tlsearch: error: bad.toml: search.lr: empty range: low 0.1 > high 0.01",
            "tlsearch: error: bad.toml: search.lambda: log scale needs low > 0, got 0.0",
            "tlsearch: error: bad.toml: cv.k: Input should be greater than or equal to 2",
            "tlsearch: error: bad.toml: regularizer.name: unknown regularizer 'l3' "
            "(choose from delta, l2, l2sp, none; a plug-in adds more: install its package, or pass "
            "--plugin MODULE)",
        ],
    ),
    "unknown model": (
        _toml({"model": {"name": "resnet"}}),
        RUN,
        2,
        [
            "tlsearch: error: bad.toml: model.name: unknown model 'resnet' (choose from cnn, mlp; "
            "a plug-in adds more: install its package, or pass --plugin MODULE)"
        ],
    ),
    "frozen_blocks beyond the model": (
        _toml({"search": {"frozen_blocks": {"low": 0, "high": 3}}}),
        RUN,
        2,
        ["tlsearch: error: bad.toml: search.frozen_blocks: 3 exceeds the 2 blocks of model 'mlp'"],
    ),
    "missing file": (_nothing, RUN, 2, ["tlsearch: error: bad.toml: file not found"]),
    "malformed TOML": (
        _raw(b'name = "x"\nn_trials = \n'),
        RUN,
        2,
        ["tlsearch: error: bad.toml: invalid TOML: Invalid value (at line 2, column 12)"],
    ),
    "unreadable file": (
        _raw(None),
        RUN,
        2,
        ["tlsearch: error: bad.toml: cannot read: [Errno 21] Is a directory: 'bad.toml'"],
    ),
    "cv.k above the rarest class": (
        _toml({"data": {"shots": 3}, "cv": {"k": 4}}),
        QUIET_RUN,
        2,
        [
            "tlsearch: error: cv.k: 4 stratified folds need at least 4 target samples per class; "
            "the rarest class has 3 (lower cv.k or raise data.shots)"
        ],
    ),
    "export without a completed trial": (
        _study_without_completed_trial,
        ["export", "--storage", "sqlite:///s.db", "--study-name", "empty", "-o", "best.json"],
        1,
        ["tlsearch: error: study 'empty' has no completed trial to export yet"],
    ),
    "export of an unknown study": (
        _study_without_completed_trial,
        ["export", "--storage", "sqlite:///s.db", "--study-name", "nope", "-o", "best.json"],
        1,
        ["tlsearch: error: no study 'nope' in sqlite:///s.db (studies there: empty)"],
    ),
}


@pytest.fixture(scope="module")
def quick_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("cli")
    jobs = {}
    for i, (case_id, (setup, args, _, _)) in enumerate(CASES.items()):
        d = root / f"case{i}"
        d.mkdir()
        setup(d)
        jobs[case_id] = (d, args)
    results = run_many(jobs)
    return {case_id: (jobs[case_id][0], results[case_id]) for case_id in CASES}


@pytest.mark.parametrize("case_id", CASES)
def test_user_error(quick_runs, case_id: str) -> None:
    _, _, code, expected = CASES[case_id]
    d, result = quick_runs[case_id]
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert lines and all(ln.startswith("tlsearch: error: ") for ln in lines), lines
    for line in expected:
        assert line in lines, lines
    if case_id == "unknown top-level key":
        assert lines == expected
    # Nothing half-created: no study database, no checkpoint cache, no export.
    assert not (d / "tlsearch.db").exists()
    assert not (d / "default-cache").exists()
    assert not (d / "best.json").exists()


def test_zero_shots_is_a_user_error(tmp_path: Path) -> None:
    # A built-in task with data.shots = 0 has no labelled target sample: a user error, not a
    # traceback from numpy in check_folds.
    write_toml(tmp_path / "s.toml", merge(TINY, {"data": {"shots": 0}}))
    result = run_cli("-q", "run", "s.toml", cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2
    assert result.stderr.startswith("tlsearch: error: ") and "data.shots" in result.stderr


def _run_until(proc: subprocess.Popen, marker: str) -> list[str]:
    """Read the command's stderr up to the first line holding ``marker``."""
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"{marker!r} never printed:\n{''.join(seen)}")


def test_ctrl_c_while_pretraining(tmp_path: Path) -> None:
    write_toml(tmp_path / "s.toml", merge(TINY, {"pretrain": {"epochs": 5000}}))
    proc = start_cli("run", "s.toml", cwd=tmp_path)
    try:
        _run_until(proc, "pretraining the source model")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in err, err
    assert "tlsearch: error" not in err, err
    assert proc.returncode == 130


def _finished(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(states=FINISHED)


@pytest.mark.slow
def test_interrupted_run_resumes_to_exactly_n_trials(tmp_path: Path) -> None:
    n = 6
    study = merge(
        TINY,
        {
            "name": "resume",
            "n_trials": n,
            "storage": "sqlite:///study.db",
            # Long enough that the trials after the first are still running when SIGINT comes
            # (30 epochs: the whole study could end first, 0.7 s, and the signal find no run).
            "finetune": {"epochs": 80},
        },
    )
    write_toml(tmp_path / "s.toml", study)
    url = f"sqlite:///{tmp_path / 'study.db'}"

    proc = start_cli("run", "s.toml", cwd=tmp_path)
    try:
        _run_until(proc, f"[1/{n}] trial 0")
        assert len(_finished(url, "resume")) >= 1  # stored before we interrupt
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "finished trials are kept; run the same command to resume" in err
    assert out.startswith("study 'resume': ")
    kept = _finished(url, "resume")
    assert 1 <= len(kept) < n

    result = run_cli("run", "s.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "pretrained checkpoint (cached)" in result.stderr
    after = optuna.load_study(study_name="resume", storage=url)
    finished = after.get_trials(states=FINISHED)
    assert len(finished) == n
    by_number = {t.number: t for t in finished}
    for t in kept:
        assert by_number[t.number].params == t.params and by_number[t.number].value == t.value
    # Only an interrupted trial may be left over, as FAIL (or RUNNING if cut mid-write).
    assert len(after.get_trials()) - n <= 1


@pytest.mark.slow
def test_run_export_final(tmp_path: Path) -> None:
    study = merge(
        TINY,
        {
            "n_trials": 4,
            "storage": "sqlite:///study.db",
            "pretrain": {"cache_dir": "cache"},
            "pruner": {"name": "median", "n_startup_trials": 2},
        },
    )
    write_toml(tmp_path / "tiny.toml", study)

    run = run_cli("run", "tiny.toml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "[4/4] trial 3: " in run.stderr
    assert run.stdout.startswith("study 'tiny': ")
    assert (tmp_path / "cache").is_dir() and not (tmp_path / "default-cache").exists()

    export = run_cli(
        "export",
        "--storage",
        "sqlite:///study.db",
        "--study-name",
        "tiny",
        "-o",
        "best.json",
        cwd=tmp_path,
    )
    assert export.returncode == 0, export.stderr
    best = read_export(tmp_path / "best.json")
    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert best.config == load_study_config(stored)
    assert best.config.search_hash() == load_config(tmp_path / "tiny.toml").search_hash()
    trial = stored.best_trial
    assert best.data["trial_number"] == trial.number
    assert best.data["searched_params"] == trial.params

    final = run_cli("final", "best.json", cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    lines = final.stdout.splitlines()
    rule, reason = best.data["selection"]["rule"], best.data["selection"]["reason"]
    assert lines[0] == f"selected by {reason}" and reason.startswith(f"{rule}: ")
    models = ["tuned", "plain_finetuning", "scratch"]
    assert [ln.split(":")[0].strip() for ln in lines[1:4]] == models, lines
    assert lines[4].startswith("plain fine-tuning settings: "), lines
    metrics = json.loads((tmp_path / "best.final.json").read_text())
    assert metrics["study_name"] == "tiny"
    assert metrics["tuned"]["cv_mean"] == trial.user_attrs["cv_mean"]
    for name in models:
        assert 0.0 <= metrics[name]["test_accuracy"] <= 1.0, name
    assert metrics["tuned"]["params"] == best.params.to_dict()
    state = torch.load(tmp_path / "best.final.pt", weights_only=True)
    model = create_model(best.config.model, (1, 8, 8), 10)
    model.load_state_dict(state)


def test_small_friction(tmp_path: Path) -> None:
    """-q after the subcommand, --study-name optional for a storage holding one study, the
    worker's --max-trials (and its old spelling), durations for --timeout."""
    from conftest import tiny_study

    _, url = tiny_study(tmp_path)
    jobs = {
        "quiet after": (tmp_path, ["status", "-q", "--storage", url]),
        "export": (tmp_path, ["export", "--storage", url, "-o", str(tmp_path / "b.json")]),
        "worker help": (tmp_path, ["worker", "--help"]),
        "timeout": (tmp_path, ["run", "--timeout", "soon", "x.toml"]),
    }
    out = run_many(jobs)
    assert out["quiet after"].returncode == 0, out["quiet after"].stderr
    assert out["quiet after"].stdout.startswith("study 'tiny' in ")
    assert out["export"].returncode == 0 and json.loads((tmp_path / "b.json").read_text())
    assert "--max-trials N, --n-trials N" in out["worker help"].stdout
    assert out["timeout"].returncode == 2
    assert "expected seconds or a duration such as 90s, 10m, 2h; got 'soon'" in (
        out["timeout"].stderr
    )
    # Two studies: the name is needed, and the error says which are there.
    optuna.create_study(study_name="other", storage=url)
    two = run_cli("status", "--storage", url, cwd=tmp_path)
    assert two.returncode == 1
    assert two.stderr.strip().endswith("holds 2 studies (tiny, other): pass --study-name")


# --- status, export and report find the study `run` made: the study file's, else ./tlsearch.db ---


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where `tlsearch run studies/s.toml` made study 'tiny' in ./tlsearch.db (the
    study file's relative storage: relative to where run ran, as README's first commands)."""
    d = tmp_path_factory.mktemp("ran").resolve()
    (d / "studies").mkdir()
    study = merge(
        FAST, {"n_trials": 2, "storage": "sqlite:///tlsearch.db", "pretrain": {"cache_dir": "c"}}
    )
    write_toml(d / "studies" / "s.toml", study)
    result = run_cli("-q", "run", "studies/s.toml", cwd=d)
    assert result.returncode == 0, result.stderr
    return d


def test_readers_find_the_study_run_made(ran: Path) -> None:
    flags = ["--storage", "sqlite:///tlsearch.db", "--study-name", "tiny"]
    read = f"reading study 'tiny' in {ran / 'tlsearch.db'}"
    # Status first: an export stores its selection, which status then shows.
    status = run_many(
        {
            "file": (ran, ["status", "studies/s.toml"]),
            "bare": (ran, ["status"]),
            "flags": (ran, ["status", *flags]),
        }
    )
    for key, result in status.items():
        assert result.returncode == 0, (key, result.stderr)
        assert result.stdout == status["flags"].stdout, key
    assert status["flags"].stdout.startswith("study 'tiny' in sqlite:///tlsearch.db\n")
    # Which study in which database: one line on stderr, unless both flags named it (as before).
    assert status["file"].stderr.splitlines() == status["bare"].stderr.splitlines() == [read]
    assert status["flags"].stderr == ""

    out = run_many(
        {
            "export file": (ran, ["export", "studies/s.toml", "-o", "a.json"]),
            "export flags": (ran, ["export", *flags, "-o", "b.json"]),
            "report bare": (ran, ["report", "-o", "rep"]),
        }
    )
    for key, result in out.items():
        assert result.returncode == 0, (key, result.stderr)
        assert "Traceback" not in result.stderr
    assert out["export file"].stderr.splitlines()[0] == read
    assert read not in out["export flags"].stderr
    a, b = (json.loads((ran / f).read_text()) for f in ("a.json", "b.json"))
    assert (a["trial_number"], a["selection"]) == (b["trial_number"], b["selection"])
    assert out["report bare"].stdout == "rep/report.html\n"
    assert out["report bare"].stderr.splitlines()[0] == read


def test_flags_win_over_the_study_file(ran: Path, tmp_path: Path) -> None:
    shutil.copy(ran / "tlsearch.db", tmp_path / "copy.db")
    out = run_many(
        {
            "storage": (
                ran,
                ["status", "studies/s.toml", "--storage", f"sqlite:///{tmp_path}/copy.db"],
            ),
            "name": (ran, ["status", "studies/s.toml", "--study-name", "nope"]),
        }
    )
    assert out["storage"].returncode == 0, out["storage"].stderr
    assert out["storage"].stderr == f"reading study 'tiny' in {tmp_path / 'copy.db'}\n"
    assert out["name"].returncode == 2
    assert out["name"].stderr == (
        f"tlsearch: error: studies/s.toml: no study 'nope' in {ran / 'tlsearch.db'} "
        "(studies there: tiny)\n"
    )


def _plain_studies(d: Path, *names: str) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{d / 'tlsearch.db'}")
    for name in names:
        optuna.create_study(storage=storage, study_name=name)
    storage.engine.dispose()


def test_readers_without_a_study_say_which_one_to_name(ran: Path, tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in ("empty", "sub", "two", "none")}
    for d in dirs.values():
        d.mkdir()
    _plain_studies(dirs["two"], "a", "b")
    _plain_studies(dirs["none"])
    (ran / "sub").mkdir(exist_ok=True)
    out = run_many(
        {
            "no database": (dirs["empty"], ["status"]),
            "study file, no database": (ran / "sub", ["export", "../studies/s.toml"]),
            "two studies": (dirs["two"], ["report"]),
            "no study": (dirs["none"], ["export"]),
            "one of two, named": (dirs["two"], ["status", "--study-name", "b"]),
            "missing study file": (dirs["empty"], ["report", "s.toml"]),
        }
    )
    hint = "pass the study file you ran (e.g. studies/digits.toml), or --storage URL"
    errors = {
        "no database": (
            f"no study file or --storage given, and no {dirs['empty'] / 'tlsearch.db'}: {hint}"
        ),
        "study file, no database": (
            f"../studies/s.toml: no study 'tiny': {ran / 'sub' / 'tlsearch.db'} does not exist "
            "(`tlsearch run` makes it; a relative SQLite path is relative to the current "
            "directory)"
        ),
        "two studies": f"{dirs['two'] / 'tlsearch.db'} holds 2 studies (a, b): pass --study-name",
        "no study": f"{dirs['none'] / 'tlsearch.db'} holds no study: {hint}",
        "missing study file": "s.toml: file not found",
    }
    for key, line in errors.items():
        result = out[key]
        assert (result.returncode, result.stdout) == (2, ""), (key, result.stderr)
        assert result.stderr == f"tlsearch: error: {line}\n", key
    # Nothing created where there was nothing: no database, no export, no report.
    assert sorted(p.name for p in dirs["empty"].iterdir()) == []
    assert sorted(p.name for p in (ran / "sub").iterdir()) == []
    assert not (dirs["two"] / "report").exists() and not (dirs["none"] / "best.json").exists()
    named = out["one of two, named"]
    assert named.returncode == 0, named.stderr
    assert named.stdout.startswith("study 'b' in sqlite:///tlsearch.db\n")
