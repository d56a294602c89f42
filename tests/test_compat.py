"""A study made by the previous release still works: resumed, joined, exported, shown.

``tests/fixtures/v0_1`` holds ``study.toml``, ``study.db`` and ``cache/``: the study 'legacy' with two
complete trials and the checkpoint it was pretrained from, made by tlsearch 0.1 (commit d565cbf).
Its stored search hash is 0.1's (unversioned), its stored config has every option 0.1 wrote, and its
checkpoint is recorded by path and SHA-256 only.

The checkpoint file is kept because pretraining does not give the same bytes on every CPU: MKL's
GEMM kernels differ between CPU kinds (the first fixture, made on another machine, gave other bytes
on an AMD EPYC whatever MKL_CBWR said), and with the thread count (one thread takes another path;
0.1 pretrained with 2). So the tests resume from the kept file, and pretraining here runs with
2 threads, not the suite's 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import start_cli
from optuna.trial import TrialState

from tlsearch import __version__
from tlsearch.errors import CheckpointError
from tlsearch.storage import ATTR_CHECKPOINT, ATTR_CONFIG, ATTR_HASH, ATTR_VERSION
from tlsearch.workers import join_study

FIXTURE = Path(__file__).parent / "fixtures" / "v0_1"
# How the fixture's checkpoint was pretrained (see above).
TWO_THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
WHERE = ("--storage", "sqlite:///study.db", "--study-name", "legacy")


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A copy of the fixture folder; the fixture itself is never opened for writing."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "v0_1"))


def _load(d: Path) -> optuna.Study:
    return optuna.load_study(study_name="legacy", storage=f"sqlite:///{d / 'study.db'}")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = start_cli(*args, cwd=cwd, env=TWO_THREADS)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@contextmanager
def _two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_recorded(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state,
        "params": trial.params,
        "distributions": trial.distributions,
        "value": trial.value,
        "user_attrs": trial.user_attrs,
    }


def test_run_resumes_it_without_allow_config_change(legacy: Path) -> None:
    before = _load(legacy)
    old_trials = [_as_recorded(t) for t in before.get_trials(deepcopy=False)]
    old_checkpoint = before.user_attrs[ATTR_CHECKPOINT]
    assert len(old_trials) == 2 and ":" not in before.user_attrs[ATTR_HASH], "0.1's own study"

    result = _run("run", "study.toml", "--n-trials", "3", cwd=legacy)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # The kept checkpoint is used, not pretrained again: no warning of another start point.
    assert "started from checkpoint" not in result.stderr, result.stderr

    after = _load(legacy)
    trials = after.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [_as_recorded(t) for t in trials[:2]] == old_trials, "finished trials untouched"
    assert trials[2].number == 2 and set(trials[2].params) == set(old_trials[0]["params"])
    checkpoint = after.user_attrs[ATTR_CHECKPOINT]
    assert checkpoint["sha256"] == old_checkpoint["sha256"]
    assert checkpoint["key"] == old_checkpoint["key"]
    assert Path(checkpoint["path"]).parent == legacy / "cache"
    assert after.user_attrs[ATTR_CONFIG]["n_trials"] == 3
    assert after.user_attrs[ATTR_HASH].startswith("2:")
    assert after.user_attrs[ATTR_VERSION] == __version__


def test_a_joining_worker_uses_its_copy_and_checks_the_recorded_hash(legacy: Path) -> None:
    study = _load(legacy)
    recorded = study.user_attrs[ATTR_CHECKPOINT]
    # The creating host's cache is not on this one; this host's cache holds a copy of the file.
    gone = {**recorded, "path": str(legacy / "creating-host" / Path(recorded["path"]).name)}
    study.set_user_attr(ATTR_CHECKPOINT, gone)
    url = f"sqlite:///{legacy / 'study.db'}"
    here = legacy / "this-host-cache"
    shutil.copytree(legacy / "cache", here)

    with _two_threads():
        joined, _storage, ctx = join_study(url, "legacy", cache_dir=here)
    assert ctx.checkpoint.path.parent == here, "this host's copy"
    assert ctx.checkpoint.sha256 == recorded["sha256"]
    assert ctx.checkpoint.key == recorded["key"]
    assert ctx.cfg.model.name == "mlp" and ctx.cfg.model.options["hidden"] == [16, 16]
    assert joined.user_attrs[ATTR_CHECKPOINT] == gone, "joining records nothing"

    # A stored hash this host's pretraining does not reproduce: the worker stops, one line.
    study.set_user_attr(ATTR_CHECKPOINT, {**gone, "sha256": "0" * 64})
    with pytest.raises(CheckpointError) as err:
        join_study(url, "legacy", cache_dir=here)
    (line,) = str(err.value).splitlines()
    assert line.startswith(
        f"pretraining on this host gave a checkpoint with SHA-256 {ctx.checkpoint.sha256[:12]}…"
    )

    # The same through `tlsearch worker`: exit 1, that line alone on stderr.
    result = _run("-q", "worker", *WHERE, "--cache-dir", str(here), cwd=legacy)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"tlsearch: error: {line}"]
    assert len(_load(legacy).get_trials(deepcopy=False)) == 2


def test_export_and_status_read_it(legacy: Path) -> None:
    export = start_cli("export", *WHERE, "-o", "best.json", "--trials", "trials.csv", cwd=legacy)
    status = start_cli("status", *WHERE, cwd=legacy)
    out, err = export.communicate(timeout=300)
    assert export.returncode == 0, err
    out, err = status.communicate(timeout=300)
    assert status.returncode == 0, err

    best = json.loads((legacy / "best.json").read_text())
    assert best["study_name"] == "legacy" and best["trial_number"] == 1
    # Today's rule needs a confirmation round the old study never ran: it says so in one line
    # and exports what the study exported before, Optuna's best.
    assert best["selection"]["rule"] == "confirm"
    assert best["selection"]["reason"] == (
        "confirm: this study runs no confirmation round (select.confirm = 0); exported Optuna's "
        "best trial, trial 1"
    )
    assert best["cv_mean"] == pytest.approx(0.11)
    assert best["fold_scores"] == [0.14, 0.08]
    assert best["searched_params"]["frozen_blocks"] == 1
    assert best["params"]["frozen_blocks"] == 1
    assert best["params"]["lambda"] == pytest.approx(0.01511933646764101)
    assert best["config"]["model"]["hidden"] == [16, 16]
    rows = (legacy / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and "fold_1" in rows[0].split(",")

    assert "trials: 2 complete, 0 pruned, 0 fail, 0 running, 0 waiting" in out
    assert "budget: 2 of 2 trials done" in out
    assert "best: trial 1, cv 0.1100" in out


# tests/fixtures/v0_3: a study made by tlsearch 0.3 (00f26ce), before augmentation was searched:
# its stored config has no search.augment, and its baselines are the two of then.
BEFORE_AUGMENTATION = Path(__file__).parent / "fixtures" / "v0_3"


def test_a_study_made_before_augmentation_resumes_without_it(tmp_path: Path) -> None:
    d = Path(shutil.copytree(BEFORE_AUGMENTATION, tmp_path / "v0_3"))
    url = f"sqlite:///{d / 'study.db'}"
    before = optuna.load_study(study_name="before-augmentation", storage=url)
    old = [_as_recorded(t) for t in before.get_trials(deepcopy=False)]
    old_hash = before.user_attrs[ATTR_HASH]

    result = _run("run", "study.toml", "--n-trials", "5", cwd=d)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    after = optuna.load_study(study_name="before-augmentation", storage=url)
    trials = after.get_trials(deepcopy=False)
    assert [_as_recorded(t) for t in trials[:3]] == old, "finished trials untouched"
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    # Its space as it was: no augmentation asked, no augmented reference trial enqueued.
    assert all("augment" not in t.params for t in trials)
    assert all(t.user_attrs.get("baseline") != "plain_augmented" for t in trials)
    assert set(trials[3].params) == set(old[2]["params"])
    assert after.user_attrs[ATTR_HASH] == old_hash
    stored = after.user_attrs[ATTR_CONFIG]
    assert stored["search"]["augment"] == "none"
    assert stored["search"]["baselines"] == ["plain_finetuning", "scratch"]
