"""tlsearch.study: create, resume and finish a study within an exact trial budget."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from optuna.trial import TrialState

from tlsearch.config import config_from_dict
from tlsearch.errors import ConfigError, StorageError
from tlsearch.registry import PRUNERS, SAMPLERS
from tlsearch.samplers import make_pruner, make_sampler
from tlsearch.status import status_table
from tlsearch.storage import (
    ATTR_CHECKPOINT,
    ATTR_CONFIG,
    CONFIRM_ATTR,
    load_study_config,
    open_study,
)
from tlsearch.study import ProgressPrinter, make_objective, prepare, run_study, summary_table

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def test_budget_is_the_study_total(tiny) -> None:
    first = run_study(config_from_dict(tiny(n_trials=3)))
    earlier = [(t.number, t.params, t.value) for t in first.get_trials()]
    assert len(first.get_trials(states=FINISHED)) == 3

    again = run_study(config_from_dict(tiny(n_trials=5)))
    trials = again.get_trials()
    assert len(trials) == 5
    assert all(t.state in FINISHED for t in trials)
    assert [(t.number, t.params, t.value) for t in trials[:3]] == earlier

    # A study that has its trials runs none.
    done = run_study(config_from_dict(tiny(n_trials=4)))
    assert len(done.get_trials()) == 5


def test_interrupted_study_resumes_to_exactly_n_trials(tiny) -> None:
    cfg = config_from_dict(tiny(n_trials=4))

    def stop_after_second(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, callbacks=[stop_after_second])
    kept = open_study(cfg.storage, cfg.name).get_trials()
    assert [t.state for t in kept] == [TrialState.COMPLETE] * 2

    study = run_study(cfg)
    trials = study.get_trials()
    assert len(study.get_trials(states=FINISHED)) == 4
    assert [(t.params, t.value) for t in trials[:2]] == [(t.params, t.value) for t in kept]


def test_second_run_uses_the_cached_checkpoint(tiny, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tlsearch")
    cfg = config_from_dict(tiny(n_trials=1))
    study = run_study(cfg)
    assert "pretraining the source model" in caplog.text
    path = Path(study.user_attrs[ATTR_CHECKPOINT]["path"])
    mtime = path.stat().st_mtime_ns

    caplog.clear()
    run_study(config_from_dict(tiny(n_trials=2)))
    assert "pretraining the source model" not in caplog.text
    assert f"pretrained checkpoint (cached): {path}" in caplog.text
    assert path.stat().st_mtime_ns == mtime


def test_study_records_its_config_and_checkpoint(tiny) -> None:
    cfg = config_from_dict(tiny(n_trials=1))
    study = run_study(cfg)
    assert study.user_attrs[ATTR_CONFIG] == cfg.to_dict()
    assert load_study_config(study) == cfg
    ckpt = study.user_attrs[ATTR_CHECKPOINT]
    assert Path(ckpt["path"]).parent == cfg.pretrain.cache_dir
    assert len(ckpt["sha256"]) == 64
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    # The dashboard's note for the study is written by the run itself.
    note = optuna_dashboard.get_note(study)
    assert note.startswith(f"## tlsearch study `{cfg.name}`"), note


def test_resume_with_another_config_is_refused(tiny) -> None:
    run_study(config_from_dict(tiny(n_trials=1)))
    changed = config_from_dict(tiny(n_trials=2, finetune={"epochs": 6}))
    with pytest.raises(
        ConfigError, match=r"^name: study 'tiny' already exists with a different config"
    ):
        run_study(changed)
    study = run_study(changed, allow_config_change=True)
    assert len(study.get_trials(states=FINISHED)) == 2


def test_open_study_names_what_is_there(tiny, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(n_trials=1))
    run_study(cfg)
    with pytest.raises(
        StorageError, match=r"^no study 'nope' in sqlite:///.*study\.db \(studies there: tiny\)$"
    ):
        open_study(cfg.storage, "nope")
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(StorageError, match=r"\(it holds no study\)$"):
        open_study(empty, "tiny")


def test_study_not_made_by_tlsearch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(storage=url, study_name="foreign")
    with pytest.raises(
        StorageError, match=r"^study 'foreign' was not created by tlsearch \(no config\)$"
    ):
        load_study_config(open_study(url, "foreign"))


def test_progress_and_summary(tiny) -> None:
    stream = io.StringIO()
    study = run_study(config_from_dict(tiny(n_trials=2)), callbacks=[ProgressPrinter(2, stream)])
    err = stream.getvalue()
    # The first two trials of a new study are its baselines.
    assert "[1/2] trial 0 (plain finetuning): cv " in err
    assert "[2/2] trial 1 (scratch): cv " in err
    table = summary_table(study)
    assert table.splitlines()[0] == "study 'tiny': 2 complete"
    assert "cv_mean" in table.splitlines()[1]


def test_builtin_samplers_and_pruners_are_registered() -> None:
    assert set(SAMPLERS.names()) >= {"tpe", "random", "gp", "cmaes", "qmc"}
    assert set(PRUNERS.names()) >= {"median", "percentile", "wilcoxon", "none"}


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_builds(tiny, name: str) -> None:
    assert isinstance(
        make_sampler(config_from_dict(tiny(sampler={"name": name}))), optuna.samplers.BaseSampler
    )


@pytest.mark.parametrize("name", PRUNERS.names())
def test_every_pruner_builds(tiny, name: str) -> None:
    steps = "epochs" if name in ("successive_halving", "hyperband") else "folds"
    cfg = config_from_dict(tiny(pruner={"name": name, "steps": steps}))
    assert isinstance(make_pruner(cfg), optuna.pruners.BasePruner)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_storage_outage_while_the_budget_is_held_elsewhere_is_retried(
    tiny, caplog: pytest.LogCaptureFixture
) -> None:
    """Near a study's end the last trial runs in another worker: this one waits, counting the
    trial states. A database outage then (a server restart) is retried like any other storage
    error in the loop, not an exit."""
    import threading

    import sqlalchemy

    from tlsearch.study import make_objective, run_trials, setup_study

    cfg = config_from_dict(tiny(n_trials=1))
    # Heartbeats every second (the waiting loop's pause), a grace period the test never reaches.
    study, storage, ctx = setup_study(cfg, heartbeat={"interval": 1, "grace_period": 60})
    elsewhere = study.ask()  # the budget's one trial, RUNNING "in another worker"
    outages = 2
    real_count = storage.count_states

    def count_states(study_id: int, confirmations: bool | None = None) -> dict:
        nonlocal outages
        if outages:
            outages -= 1
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server restarting"))
        return real_count(study_id, confirmations)

    storage.count_states = count_states  # type: ignore[method-assign]
    finish = threading.Timer(3.5, lambda: study.tell(elsewhere, 0.5))
    finish.start()
    try:
        with caplog.at_level(logging.INFO, logger="tlsearch"):
            ran = run_trials(study, storage, make_objective(ctx), n_trials=1, patience=60)
    finally:
        finish.cancel()
    assert ran == 0
    assert outages == 0
    assert caplog.text.count("storage error") == 2
    assert "still running elsewhere; waiting" in caplog.text
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_start_names_the_database_and_whether_it_resumed(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlsearch")
    # A relative SQLite URL is the current directory's file, named by its absolute path.
    monkeypatch.chdir(tmp_path)
    run_study(config_from_dict(tiny(n_trials=2, storage="sqlite:///rel.db")))
    assert f"created study 'tiny' in {tmp_path / 'rel.db'}" in caplog.messages
    caplog.clear()
    run_study(config_from_dict(tiny(n_trials=3, storage="sqlite:///rel.db")))
    assert f"resuming study 'tiny' in {tmp_path / 'rel.db'}: 2 of 3 trials done" in caplog.messages


def test_a_refused_resume_costs_no_pretraining(
    tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlsearch")
    run_study(config_from_dict(tiny(n_trials=1)))
    caplog.clear()
    # Another source model (so its checkpoint is not cached) and a changed search: refused first.
    changed = tiny(n_trials=2, pretrain={"epochs": 2}, finetune={"epochs": 6})
    with pytest.raises(ConfigError, match="already exists with a different config"):
        run_study(config_from_dict(changed))
    assert not [m for m in caplog.messages if "pretrain" in m], caplog.messages


def test_values_are_named_and_rounded(tiny) -> None:
    study = run_study(config_from_dict(tiny(n_trials=2)))
    # optuna-dashboard and optuna.visualization show this name instead of "Objective 0".
    assert study.metric_names == ["cv_accuracy_then_loss"]
    for t in study.trials:
        assert t.value == round(t.value, 12)
        assert all(v == round(v, 12) for v in t.intermediate_values.values())
    # Optuna's own plotting works in the installed environment (plotly is a dependency).
    import optuna.visualization

    fig = optuna.visualization.plot_optimization_history(study)
    assert len(fig.data[0].y) == 2


def test_the_confirmation_round_runs_once_on_fresh_folds(tiny) -> None:
    """After the budget: the top configuration and plain fine-tuning again, on folds the search
    never scored; a resumed study does not run them again."""
    overrides = {
        "n_trials": 4,
        "search": {"baselines": ["plain_finetuning", "scratch"]},
        "select": {"confirm": 1, "rule": "confirm"},
    }
    study = run_study(config_from_dict(tiny(**overrides)))
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state in FINISHED for t in trials)
    search, round_ = trials[:4], trials[4:]
    assert all(CONFIRM_ATTR not in t.user_attrs for t in search)
    confirmed = [t.user_attrs[CONFIRM_ATTR] for t in round_]
    assert 0 in confirmed and len(set(confirmed)) == 2, "the winner and plain fine-tuning"
    for t in round_:
        original = trials[t.user_attrs[CONFIRM_ATTR]]
        assert t.params == original.params and t.intermediate_values == {}
        assert t.user_attrs["resolved_params"] == original.user_attrs["resolved_params"]
        assert t.user_attrs["fold_scores"] != original.user_attrs["fold_scores"] or (
            t.user_attrs["oof"] != original.user_attrs["oof"]
        )
    again = run_study(config_from_dict(tiny(**overrides)))
    assert len(again.get_trials()) == 6
    text = status_table(again)
    assert "budget: 4 of 4 trials done" in text
    assert "confirmation round: 2 of 2 trial(s) done" in text
    # run's closing table ranks the search; the round's trials follow, named by what they confirm.
    lines = summary_table(again).splitlines()[2:]
    rows = [re.match(r"\s*(\d+(?: \([^)]*\))?)", line).group(1) for line in lines]
    assert rows[-2:] == [
        f"{t.number} ({t.user_attrs[CONFIRM_ATTR]} on fresh folds)" for t in round_
    ]
    assert set(rows[:-2]) <= {"0 (plain_finetuning)", "1 (scratch)", "2", "3"}


def test_the_fresh_folds_split_the_images_anew(tiny) -> None:
    cfg = config_from_dict(tiny(cv={"k": 2}))
    objective = make_objective(prepare(cfg))
    search = [set(objective.folds[f][1].tolist()) for f in objective.search_folds]
    fresh = [set(objective.folds[f][1].tolist()) for f in objective.fresh_folds]
    assert len(fresh) == 2 and set().union(*fresh) == set().union(*search)
    assert fresh != search and fresh != search[::-1]
