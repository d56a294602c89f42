"""tlsearch.status: trials by state, best trial, running trials and their heartbeats, the ETA."""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import TINY, merge, run_cli
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tlsearch.config import config_from_dict
from tlsearch.status import heartbeat_ages, status_table
from tlsearch.storage import ATTR_CONFIG

DISTRIBUTIONS = {
    "lambda": FloatDistribution(1e-4, 1.0, log=True),
    "lr": FloatDistribution(1e-3, 3e-2, log=True),
    "frozen_blocks": IntDistribution(0, 2),
}
START = dt.datetime(2026, 1, 1, 12, 0, 0)


def _finished(
    number: int, state: TrialState, seconds: float, value: float | None, **attrs: Any
) -> FrozenTrial:
    return FrozenTrial(
        number=number,
        state=state,
        value=value,
        datetime_start=START,
        datetime_complete=START + dt.timedelta(seconds=seconds),
        params={"lambda": 0.1 * (number + 1), "lr": 0.001, "frozen_blocks": 1},
        distributions=DISTRIBUTIONS,
        user_attrs=dict(attrs),
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def _study(tmp_path: Path, n_trials: int = 10, running: bool = True) -> tuple[str, optuna.Study]:
    """A study in SQLite as workers leave it: complete, pruned, failed and one running trial.

    Trials are added, not run, so their durations are exact: 60 s, 60 s and 30 s (mean 50 s).
    """
    url = f"sqlite:///{tmp_path / 'status.db'}"
    # Optuna records heartbeats only for a storage with an interval; workers run with one.
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=60)
    study = optuna.create_study(storage=storage, study_name="tiny", direction="maximize")
    cfg = config_from_dict(merge(TINY, {"n_trials": n_trials, "storage": url}))
    study.set_user_attr(ATTR_CONFIG, cfg.to_dict())
    # The accuracy's standard error comes from the fold scores: std(ddof=1)/√4 = 0.0577 here.
    study.add_trial(_finished(0, TrialState.COMPLETE, 60, 0.8, fold_scores=[0.6, 0.8, 0.8, 1.0]))
    study.add_trial(_finished(1, TrialState.COMPLETE, 60, 0.9, fold_scores=[0.8, 0.8, 1.0, 1.0]))
    study.add_trial(_finished(2, TrialState.PRUNED, 30, None))
    study.add_trial(_finished(3, TrialState.FAIL, 5, None))
    if running:
        with warnings.catch_warnings():
            # Optuna warns that heartbeats belong to Study.optimize; here a test plays the worker.
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask(DISTRIBUTIONS)
        trial.report(0.7, 0)
        storage.record_heartbeat(trial._trial_id)
    return url, study


def test_status_counts_best_running_and_eta(tmp_path: Path) -> None:
    url, study = _study(tmp_path)
    running = study.get_trials(states=(TrialState.RUNNING,))[0]
    beats = heartbeat_ages(url, "tiny")
    assert set(beats) == {4} and 0 <= beats[4] < 60
    now = running.datetime_start + dt.timedelta(seconds=20)
    text = status_table(study, heartbeats=beats, storage_label=url, now=now)
    lines = text.splitlines()
    assert lines[0] == f"study 'tiny' in {url}"
    assert "trials: 2 complete, 1 pruned, 1 fail, 1 running, 0 waiting" in lines
    assert "budget: 3 of 10 trials done (complete or pruned)" in lines
    assert "best: trial 1, cv 0.9000 ± 0.0577 SE: lambda=0.2 lr=0.001 frozen_blocks=1" in lines
    header = next(i for i, line in enumerate(lines) if "heartbeat" in line)
    assert lines[header].split() == [
        "trial",
        "started",
        "running",
        "heartbeat",
        "steps",
        "reported",
        "params",
    ]
    row = lines[header + 1].split()
    assert row[0] == "4" and row[3] == "20s"  # started, then 20 s of running
    assert "ago" in lines[header + 1] and "frozen_blocks=" in lines[header + 1]
    # 7 trials left × 50 s mean, less the 20 s the running trial has spent, on one worker: 330 s.
    done = now + dt.timedelta(seconds=330)
    assert lines[-1] == (
        "ETA: (50s mean of 3 finished × 7 left − 20s spent by running trials) ÷ 1 worker(s) "
        f"≈ 5.5 min, done near {done:%H:%M}"
    )


def test_status_before_any_trial_finished_and_after_the_budget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(storage=url, study_name="tiny", direction="maximize")
    study.set_user_attr(ATTR_CONFIG, config_from_dict(merge(TINY, {"n_trials": 3})).to_dict())
    text = status_table(study)
    assert "best: no completed trial yet" in text
    assert "running: none" in text
    assert text.endswith("ETA: unknown until a trial finishes")

    (tmp_path / "done").mkdir()
    _, done = _study(tmp_path / "done", n_trials=3, running=False)
    assert status_table(done).endswith("ETA: the budget is used; the study is done")


@pytest.mark.slow
def test_status_command(tmp_path: Path) -> None:
    url, _ = _study(tmp_path)
    result = run_cli("status", "--storage", url, "--study-name", "tiny", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "trials: 2 complete, 1 pruned, 1 fail, 1 running, 0 waiting" in out
    assert "best: trial 1, cv 0.9000" in out
    assert "running (1):" in out and " ago " in out
    assert "ETA: (50s mean of 3 finished × 7 left − " in out
