"""tlsearch.objective: folds, pruning, diverged trials, seeds (the parameters: test_params.py)."""

from __future__ import annotations

import re
import statistics
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from tlsearch.config import config_from_dict
from tlsearch.data import Dataset
from tlsearch.errors import ConfigError
from tlsearch.objective import check_folds
from tlsearch.storage import open_study
from tlsearch.study import prepare, run_study


def _study(cfg_dict: dict[str, Any], enqueue: list[dict[str, Any]]) -> optuna.Study:
    """Run the study after queueing ``enqueue`` as its first trials."""
    cfg = config_from_dict(cfg_dict)
    queued = optuna.create_study(storage=cfg.storage, study_name=cfg.name, direction="maximize")
    for params in enqueue:
        queued.enqueue_trial(params)
    return run_study(cfg)


# ---------------------------------------------------------------------------------------------
# Folds


def _labels(*counts: int) -> Dataset:
    y = np.repeat(np.arange(len(counts)), counts)
    return Dataset(np.zeros((len(y), 4), np.float32), y)


def test_check_folds_needs_k_samples_in_the_rarest_class(tiny) -> None:
    cfg = config_from_dict(tiny(cv={"k": 3}))
    check_folds(cfg, _labels(3, 5, 3))
    with pytest.raises(ConfigError) as info:
        check_folds(cfg, _labels(3, 2, 5))
    assert str(info.value) == (
        "cv.k: 3 stratified folds need at least 3 target samples per class; "
        "the rarest class has 2 "
        "(lower cv.k or raise data.shots)"
    )
    assert info.value.exit_code == 2


def test_check_folds_unstratified(tiny) -> None:
    cfg = config_from_dict(tiny(cv={"k": 5, "stratified": False}))
    check_folds(cfg, _labels(1, 4))
    with pytest.raises(ConfigError, match=r"^cv\.k: 5 folds but only 4 target training samples$"):
        check_folds(cfg, _labels(1, 3))


def test_prepare_rejects_k_above_the_shots_before_training(tiny, tmp_path) -> None:
    cfg = config_from_dict(tiny(data={"shots": 3}, cv={"k": 4}))
    with pytest.raises(
        ConfigError, match=r"^cv\.k: 4 stratified folds .* the rarest class has 3 "
    ):
        prepare(cfg)
    # Nothing was trained or stored.
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "study.db").exists()


# ---------------------------------------------------------------------------------------------
# Trials


def test_same_seed_same_fold_scores(tiny, tmp_path) -> None:
    runs = []
    for name in ("a", "b"):
        study = run_study(
            config_from_dict(tiny(name=name, storage=f"sqlite:///{tmp_path / name}.db"))
        )
        runs.append(study.get_trials())
    a, b = runs
    assert len(a) == len(b) == 3
    for ta, tb in zip(a, b, strict=True):
        assert ta.state == tb.state == TrialState.COMPLETE
        assert ta.params == tb.params
        assert ta.user_attrs["fold_scores"] == tb.user_attrs["fold_scores"]
        # The mean is rounded to 12 digits (0.21, not 0.21000000000000002).
        mean = round(statistics.fmean(ta.user_attrs["fold_scores"]), 12)
        assert ta.user_attrs["cv_mean"] == tb.user_attrs["cv_mean"] == mean
        assert ta.value == tb.value
        assert len(ta.user_attrs["fold_scores"]) == 2
        assert all(0.0 <= s <= 1.0 for s in ta.user_attrs["fold_scores"])
    # Different parameters really measure differently (the check is not vacuous).
    assert len({t.value for t in a}) > 1


def test_diverged_trial_is_pruned_with_its_reason_and_the_study_goes_on(tiny) -> None:
    study = _study(
        tiny(
            n_trials=3,
            finetune={"optimizer": "sgd"},
            regularizer={"name": "l2"},
            search={"lr": {"low": 1e-3, "high": 1e6, "log": True}, "lambda": 1.0},
        ),
        enqueue=[
            {"lr": 1e6, "frozen_blocks": 0},
            {"lr": 0.05, "frozen_blocks": 0},
            {"lr": 0.05, "frozen_blocks": 1},
        ],
    )
    trials = study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.PRUNED,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    diverged = trials[0]
    assert re.fullmatch(
        r"fold 0: training loss became (nan|inf) in epoch \d+", diverged.user_attrs["fail_reason"]
    )
    assert diverged.user_attrs["fold_scores"] == []
    assert "fail_reason" not in trials[1].user_attrs
    assert study.best_trial.number in (1, 2)


GOOD = {"lambda": 1e-3, "lr": 3e-2, "frozen_blocks": 0}
BAD = {"lambda": 1e-3, "lr": 1e-7, "frozen_blocks": 0}  # stays at chance


def _pruning_study(tiny, pruner: dict[str, Any], k: int) -> list[optuna.trial.FrozenTrial]:
    study = _study(
        tiny(
            n_trials=4,
            data={"shots": 20},
            finetune={"epochs": 10},
            search={"lr": {"low": 1e-7, "high": 1e-1, "log": True}, "backbone_lr_mult": 1.0},
            # The value is the plain mean accuracy here, so the reports can be checked by hand.
            cv={"k": k, "metric": "accuracy"},
            pruner=pruner,
        ),
        enqueue=[GOOD, GOOD, GOOD, BAD],
    )
    return study.get_trials()


def test_median_pruner_stops_a_bad_trial_before_its_last_fold(tiny) -> None:
    k = 4
    trials = _pruning_study(
        tiny, {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0}, k
    )
    good, bad = trials[:3], trials[3]
    assert [t.state for t in good] == [TrialState.COMPLETE] * 3
    # Same parameters, same folds, same seeds: the good trials measure exactly the same.
    assert good[0].user_attrs["fold_scores"] == good[2].user_attrs["fold_scores"]
    assert good[0].value > 0.5
    # The running mean is what median/percentile pruners see.
    scores = good[0].user_attrs["fold_scores"]
    assert [good[0].intermediate_values[i] for i in range(k)] == pytest.approx(
        [statistics.fmean(scores[: i + 1]) for i in range(k)]
    )

    assert bad.state == TrialState.PRUNED
    assert 1 <= len(bad.intermediate_values) < k
    assert bad.user_attrs["pruned_after_folds"] == len(bad.intermediate_values)
    assert len(bad.user_attrs["fold_scores"]) == len(bad.intermediate_values)
    assert "fail_reason" not in bad.user_attrs


def test_wilcoxon_pruner_stops_a_bad_trial_before_its_last_fold(tiny) -> None:
    # A paired test over folds: 4 folds all worse give p = 1/16 < 0.1, so 6 folds leave room.
    k = 6
    trials = _pruning_study(tiny, {"name": "wilcoxon", "n_warmup_steps": 0, "p_threshold": 0.1}, k)
    good, bad = trials[:3], trials[3]
    assert [t.state for t in good] == [TrialState.COMPLETE] * 3
    # Wilcoxon sees each fold's own score (reported rounded to 12 digits).
    scores = [round(s, 12) for s in good[0].user_attrs["fold_scores"]]
    assert [good[0].intermediate_values[i] for i in range(k)] == scores

    assert bad.state == TrialState.PRUNED
    assert 2 <= len(bad.intermediate_values) < k
    assert bad.user_attrs["pruned_after_folds"] == len(bad.intermediate_values)
    assert max(bad.user_attrs["fold_scores"]) < min(good[0].user_attrs["fold_scores"])


def test_no_pruner_runs_every_fold(tiny) -> None:
    trials = _pruning_study(tiny, {"name": "none"}, 3)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(len(t.user_attrs["fold_scores"]) == 3 for t in trials)
    assert trials[3].value < trials[0].value


# ---------------------------------------------------------------------------------------------
# Epochs as a fidelity: learning curves, folds side by side, successive halving


def test_learning_curves_are_the_folds_own_held_out_scores(tiny) -> None:
    """Every 5 epochs (and the last) each fold's held-out loss and accuracy: at the last epoch
    they are the fold's score; fold after fold or side by side, the same trial."""
    cfg = tiny(n_trials=1, finetune={"epochs": 7}, pruner={"name": "none"})
    (trial,) = run_study(config_from_dict(cfg)).get_trials()
    curve = trial.user_attrs["curve"]
    assert curve["epochs"] == [5, 7]
    assert [f[-1] for f in curve["accuracy"]] == trial.user_attrs["fold_scores"]
    assert [f[-1] for f in curve["loss"]] == pytest.approx(trial.user_attrs["fold_losses"], 1e-4)
    oof = trial.user_attrs["oof"]
    assert len(oof["p_true"]) == 1 and len(oof["p_true"][0]) == 100
    side = config_from_dict({**cfg, "name": "side", "pruner": {"name": "none", "steps": "epochs"}})
    (again,) = run_study(side).get_trials()
    assert again.user_attrs["fold_scores"] == trial.user_attrs["fold_scores"]
    assert again.user_attrs["fold_losses"] == pytest.approx(trial.user_attrs["fold_losses"])
    assert again.user_attrs["curve"]["accuracy"] == curve["accuracy"]
    # Side by side, the report at epoch e is the CV metric of every fold at epoch e.
    assert sorted(again.intermediate_values) == [5, 7]
    assert again.intermediate_values[7] == again.value


def _halving(tiny, name: str, n_trials: int) -> dict[str, Any]:
    return tiny(
        name=name,
        n_trials=n_trials,
        data={"shots": 20},
        finetune={"epochs": 15},
        search={"lr": {"low": 1e-7, "high": 1e-1, "log": True}, "backbone_lr_mult": 1.0},
        cv={"k": 2, "metric": "accuracy"},
        pruner={"name": "successive_halving", "steps": "epochs", "min_epochs": 5},
    )


def test_successive_halving_stops_a_bad_trial_at_a_rung_and_keeps_its_curve(tiny) -> None:
    cfg = config_from_dict(_halving(tiny, "sha", 4))
    queued = optuna.create_study(storage=cfg.storage, study_name=cfg.name, direction="maximize")
    for params in (GOOD, GOOD, BAD):
        queued.enqueue_trial(params)
    queued.enqueue_trial(BAD, user_attrs={"baseline": "plain_finetuning"})
    trials = run_study(cfg).get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2
    bad = trials[2]
    # At the first rung (epoch 5) it is not in the top third of the three trials there.
    assert bad.state == TrialState.PRUNED and bad.user_attrs["pruned_at_epoch"] == 5
    assert bad.system_attrs["completed_rung_0"] == bad.intermediate_values[5]
    assert bad.user_attrs["curve"]["epochs"] == [5]
    assert all(len(f) == 1 for f in bad.user_attrs["curve"]["loss"])
    assert "oof" not in bad.user_attrs
    # A baseline as bad is measured to the end: it is what the search is compared with.
    assert trials[3].state == TrialState.COMPLETE
    assert sorted(trials[3].intermediate_values) == [5, 10, 15]


def test_a_resumed_study_and_a_late_worker_meet_the_same_rungs(tiny) -> None:
    """Rung values are stored with each trial: a study stopped after two trials and resumed,
    or one whose later trials another worker runs, stops the same trials at the same epochs
    as one run straight through."""
    straight = config_from_dict(_halving(tiny, "straight", 5))
    run_study(straight)
    stopped = config_from_dict(_halving(tiny, "resumed", 2))
    run_study(stopped)
    resumed = run_study(config_from_dict(_halving(tiny, "resumed", 5)))

    def decisions(study: optuna.Study) -> list[tuple[Any, ...]]:
        return [
            (t.state, t.params, t.user_attrs.get("pruned_at_epoch"), sorted(t.intermediate_values))
            for t in study.get_trials()
        ]

    assert decisions(resumed) == decisions(open_study(straight.storage, "straight"))
