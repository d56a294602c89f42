"""What "best" and "selected" mean: the CV metric, repeated folds, baselines, selection rules."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from sklearn.model_selection import StratifiedKFold

from tlsearch.config import LEGACY_VALUES, config_from_dict, stored_config
from tlsearch.confirmation import confirmation_candidates
from tlsearch.evidence import encode_oof
from tlsearch.export import best_config, write_export
from tlsearch.objective import CVMetric, split_seed
from tlsearch.params import baseline_params
from tlsearch.selection import ATTR_SELECTED, Pool, select
from tlsearch.stats import mean_se
from tlsearch.status import status_table
from tlsearch.storage import ATTR_CONFIG
from tlsearch.study import make_objective, prepare, run_study

# ---------------------------------------------------------------------------------------------
# The metric: one float that keeps the accuracy order and breaks ties by the loss

fold_sizes = st.lists(st.integers(1, 12), min_size=2, max_size=6)


@settings(max_examples=300, deadline=None)
@given(fold_sizes, st.data())
def test_accuracy_then_loss_keeps_the_accuracy_order(sizes: list[int], data: Any) -> None:
    metric = CVMetric("accuracy_then_loss", sizes)
    m = data.draw(st.integers(1, len(sizes)))  # the running mean after m folds, too

    def trial() -> tuple[list[float], list[float], Fraction]:
        correct = [data.draw(st.integers(0, n)) for n in sizes[:m]]
        losses = [data.draw(st.floats(0.0, 50.0)) for _ in range(m)]
        exact = sum(Fraction(c, n) for c, n in zip(correct, sizes, strict=False)) / m
        return [c / n for c, n in zip(correct, sizes, strict=False)], losses, exact

    (sa, la, a), (sb, lb, b) = trial(), trial()
    va, vb = metric.value(sa, la), metric.value(sb, lb)
    if a > b:
        assert va > vb
    elif a == b and statistics.fmean(la) < statistics.fmean(lb):
        assert va >= vb  # a lower loss never ranks lower; strictly higher unless it rounds away
    assert abs(va - float(a)) <= metric.eps + 1e-12


def test_metric_values_and_standard_error() -> None:
    scores, losses = [0.9, 0.8, 1.0, 0.9], [0.3, 0.5, 0.1, 0.2]
    assert CVMetric("accuracy", [10] * 4).value(scores, losses) == 0.9
    assert CVMetric("loss", [10] * 4).value(scores, losses) == -0.275
    tie_break = CVMetric("accuracy_then_loss", [10] * 4)
    assert tie_break.eps == 0.5 / (4 * 10)
    assert tie_break.value(scores, losses) == round(0.9 + 0.0125 / 1.275, 12)
    # The standard error of the mean of k·r fold values: std(ddof=1)/√(k·r).
    se = statistics.stdev(scores) / math.sqrt(4)
    assert CVMetric("accuracy", [10] * 4).standard_error(scores, losses) == pytest.approx(se)
    assert CVMetric("loss", [10] * 4).standard_error(scores, losses) == pytest.approx(
        statistics.stdev(losses) / 2
    )


# ---------------------------------------------------------------------------------------------
# Repeated folds


def test_repeats_give_the_documented_splits(tiny) -> None:
    cfg = config_from_dict(tiny(cv={"k": 2, "repeats": 3, "seed": 4}))
    ctx = prepare(cfg)
    objective = make_objective(ctx)
    y = ctx.task.target_train.y
    x = ctx.task.target_train.x.reshape(len(y), -1)
    # 3 repeats of 2 folds for the search, and the next repeat's for the confirmation round.
    assert len(objective.folds) == 8 and objective.search_folds == list(range(6))
    assert objective.fresh_folds == [6, 7]
    assert split_seed(4, 0) == 4 and len({split_seed(4, r) for r in range(4)}) == 4
    for repeat in range(4):
        expected = StratifiedKFold(2, shuffle=True, random_state=split_seed(4, repeat)).split(x, y)
        for (tr, va), (etr, eva) in zip(objective.folds[2 * repeat :], expected, strict=False):
            assert np.array_equal(tr.numpy(), etr) and np.array_equal(va.numpy(), eva)
        # Each repeat's validation folds cover the training set once.
        held = np.concatenate(
            [va.numpy() for _, va in objective.folds[2 * repeat : 2 * repeat + 2]]
        )
        assert sorted(held) == list(range(len(y)))
    # The first repeat is the split of a study without repeats.
    single = make_objective(prepare(config_from_dict(tiny(cv={"k": 2, "seed": 4}))))
    for (tr, va), (tr1, va1) in zip(single.folds[:2], objective.folds[:2], strict=True):
        assert np.array_equal(tr, tr1) and np.array_equal(va, va1)


def test_a_trial_reports_every_fold_of_every_repeat(tiny) -> None:
    study = run_study(config_from_dict(tiny(n_trials=1, cv={"k": 2, "repeats": 2})))
    (trial,) = study.trials
    assert len(trial.user_attrs["fold_scores"]) == 4
    assert sorted(trial.intermediate_values) == [0, 1, 2, 3]
    assert trial.user_attrs["cv_se"] == pytest.approx(
        statistics.stdev(trial.user_attrs["fold_scores"]) / 2
    )


# ---------------------------------------------------------------------------------------------
# Baselines are trials of every new study


def test_baselines_are_the_first_trials_of_a_new_study(tiny) -> None:
    both = {"baselines": ["plain_finetuning", "scratch"]}
    cfg = config_from_dict(tiny(n_trials=3, search=both))
    study = run_study(cfg)
    first, second, third = study.trials
    assert first.user_attrs["baseline"] == "plain_finetuning"
    assert second.user_attrs["baseline"] == "scratch"
    assert "baseline" not in third.user_attrs
    # Exactly final's baselines, recorded in full; the sampler sees plain fine-tuning where it is.
    assert (
        first.user_attrs["resolved_params"] == baseline_params(cfg, "plain_finetuning").to_dict()
    )
    assert second.user_attrs["resolved_params"] == baseline_params(cfg, "scratch").to_dict()
    assert first.params == {"lambda": 0.01, "lr": 0.001, "frozen_blocks": 0}
    assert second.params == {}
    # Scored on the same folds as every trial.
    assert len(first.user_attrs["fold_scores"]) == len(third.user_attrs["fold_scores"]) == 2
    # A resumed study does not queue them again.
    again = run_study(
        config_from_dict(tiny(n_trials=4, search={"baselines": ["plain_finetuning", "scratch"]}))
    )
    assert [t.user_attrs.get("baseline") for t in again.trials].count("scratch") == 1


def test_defaults_and_what_a_study_stored_before_them_means() -> None:
    cfg = config_from_dict({})
    assert cfg.cv.metric == "accuracy_then_loss" and cfg.cv.repeats == 1
    assert cfg.search.baselines == ["plain_finetuning", "scratch", "plain_augmented"]
    # A config stored before the fields existed ran as 0.1 did: accuracy, no baselines.
    old = stored_config({"name": "x"}, "study 'x'")
    assert (old.cv.metric, old.cv.repeats, old.search.baselines) == ("accuracy", 1, [])
    selection_fields = {
        k: LEGACY_VALUES[k] for k in ("cv.metric", "cv.repeats", "search.baselines")
    }
    assert selection_fields == {"cv.metric": "accuracy", "cv.repeats": 1, "search.baselines": []}
    # Their 0.1 values hash as the fields did not exist; today's defaults are another study.
    legacy = config_from_dict({"cv": {"metric": "accuracy"}, "search": {"baselines": []}})
    assert legacy.search_hash() != cfg.search_hash()


# ---------------------------------------------------------------------------------------------
# Best vs selected


def _folds(value: float) -> list[float]:
    return [value - 0.01, value + 0.01, value - 0.01, value + 0.01, value]


SPREAD_SE = mean_se(_folds(0.5))


def _trial(value: float, se: float, frozen: int, lam: float, lr: float = 1e-3, **attrs: Any):
    return create_trial(
        state=TrialState.COMPLETE,
        value=value,
        params={"lambda": lam, "lr": lr, "frozen_blocks": frozen},
        distributions={
            "lambda": FloatDistribution(1e-4, 100.0, log=True),
            "lr": FloatDistribution(1e-4, 3e-2, log=True),
            "frozen_blocks": IntDistribution(0, 3),
        },
        # Folds 0.01 either side of the mean: their accuracy SE is SPREAD_SE, the value's ``se``.
        user_attrs={
            "cv_mean": round(value, 2),
            "cv_se": se,
            "fold_scores": _folds(value),
            **attrs,
        },
    )


@pytest.fixture
def noisy_study(tmp_path: Path) -> optuna.Study:
    cfg = config_from_dict(
        {
            "storage": f"sqlite:///{tmp_path / 's.db'}",
            "name": "noisy",
            "search": {"backbone_lr_mult": 0.1},
        }
    )
    study = optuna.create_study(study_name="noisy", storage=cfg.storage, direction="maximize")
    study.set_user_attr(ATTR_CONFIG, cfg.to_dict())
    study.add_trial(_trial(0.880, 0.02, 0, 0.01, baseline="plain_finetuning"))
    study.add_trial(_trial(0.900, 0.02, 0, 0.5))  # the best
    study.add_trial(_trial(0.890, 0.02, 2, 0.1))  # within 1 SE, more frozen blocks
    study.add_trial(_trial(0.885, 0.02, 2, 3.0))  # within 1 SE, as frozen, larger λ: selected
    study.add_trial(_trial(0.850, 0.02, 3, 9.0))  # more frozen, but beyond one SE
    return study


def test_one_se_prefers_frozen_then_lambda_within_one_standard_error(noisy_study) -> None:
    cfg = config_from_dict({"search": {"backbone_lr_mult": 0.1}})
    best = select(noisy_study, cfg, "best")
    assert best.trial.number == best.best.number == 1
    chosen = select(noisy_study, cfg, "one_se")
    assert chosen.trial.number == 3 and chosen.best.number == 1 and chosen.se == 0.02
    assert [t.number for t in chosen.within] == [1, 2, 3, 0]
    assert [t.number for t in chosen.runners_up] == [1, 2, 0, 4]


def test_best_and_selected_are_stored_and_shown_alike(noisy_study, tmp_path: Path) -> None:
    data = write_export(noisy_study, tmp_path / "best.json", "one_se")
    assert data["trial_number"] == 3 and data["params"]["lambda"] == 3.0
    assert data["selection"]["rule"] == "one_se"
    assert data["selection"]["best"]["trial_number"] == 1
    # cv_se is the accuracy's (shown beside cv_mean); value_se the value's, which one_se compares.
    assert data["value_se"] == 0.02 and data["cv_mean"] == 0.89
    assert data["cv_se"] == pytest.approx(SPREAD_SE)
    assert data["baselines"]["plain_finetuning"]["trial_number"] == 0
    # Stored with the study, and status says the same.
    stored = optuna.load_study(study_name="noisy", storage=noisy_study._storage).user_attrs
    assert stored[ATTR_SELECTED] == data["selection"]
    text = status_table(noisy_study)
    assert f"best: trial 1, cv 0.9000 ± {SPREAD_SE:.4f} SE" in text
    assert (
        f"selected (one_se, by the last export): trial 3, cv 0.8900 ± {SPREAD_SE:.4f} SE" in text
    )
    assert "baseline plain_finetuning: trial 0" in text
    assert f"  why: {data['selection']['reason']}" in text.splitlines()
    # The default rule is Optuna's best.
    assert best_config(noisy_study)["trial_number"] == 1


# ---------------------------------------------------------------------------------------------
# Do no harm: per-image evidence, the gate, the confirmation round


def _oof(p_true: np.ndarray) -> dict[str, Any]:
    return encode_oof(p_true[None], p_true[None] > 0.5)


def _evidence_study(tmp_path: Path, edge: float, confirm: int = 0) -> tuple[optuna.Study, Any]:
    """Plain fine-tuning and 20 searched trials on 50 images; trial 1 is the best by value and
    its log loss is lower than plain fine-tuning's on average by about ``edge``, with image-to-
    image noise of 0.6 (what few-shot CV folds show)."""
    rng = np.random.default_rng(3)
    cfg = config_from_dict(
        {
            "storage": f"sqlite:///{tmp_path / 'e.db'}",
            "name": "e",
            "select": {"confirm": confirm, "metric": "loss", "alpha": 0.05},
            "search": {"backbone_lr_mult": 0.1},
        }
    )
    study = optuna.create_study(study_name="e", storage=cfg.storage, direction="maximize")
    study.set_user_attr(ATTR_CONFIG, cfg.to_dict())
    plain_loss = rng.uniform(0.1, 1.5, 50)

    def add(value: float, loss: np.ndarray, **attrs: Any) -> None:
        study.add_trial(
            _trial(
                value,
                0.02,
                0,
                0.01 + value,
                cv_loss=float(loss.mean()),
                oof=_oof(np.exp(-np.clip(loss, 0.0, None))),
                **attrs,
            )
        )

    add(0.88, plain_loss, baseline="plain_finetuning")
    add(0.92, plain_loss - edge + rng.normal(0, 0.6, 50))
    for i in range(19):
        add(0.86 + i / 1000, plain_loss + 0.2 + rng.normal(0, 0.6, 50))
    return study, cfg


@pytest.mark.parametrize(("edge", "kept"), [(0.05, True), (0.6, False)])
def test_the_gate_leaves_plain_finetuning_only_for_an_edge_beyond_the_noise(
    tmp_path: Path, edge: float, kept: bool
) -> None:
    study, cfg = _evidence_study(tmp_path, edge)
    chosen = select(study, cfg, "gate")
    assert chosen.trial.number == (0 if kept else 1)
    reason = chosen.reason
    assert len(reason.splitlines()) == 1
    if kept:
        assert reason.startswith("kept plain fine-tuning: trial 1's paired log-loss advantage +")
        assert reason.endswith("not below 0.05/20")
    else:
        assert reason.startswith("left plain fine-tuning for trial 1: its paired log-loss")
    assert chosen.evidence["images"] == 50 and chosen.evidence["level"] == 0.05 / 20
    # The same study always exports the same answer.
    assert select(study, cfg, "gate").trial.number == chosen.trial.number


def test_the_confirmation_round_decides_on_fresh_scores_only(tmp_path: Path) -> None:
    study, cfg = _evidence_study(tmp_path, 0.6, confirm=2)
    pool = Pool.of(study)
    candidates = confirmation_candidates(pool, cfg)
    # The top 2 distinct configurations by loss, then plain fine-tuning.
    assert [t.number for t in candidates][-1] == 0 and len(candidates) == 3
    assert select(study, cfg, "confirm").reason.startswith(
        "confirm: the confirmation round is not finished (0 of 3 trials)"
    )
    # On fresh folds the search's winner (trial 1) is no better than plain fine-tuning.
    rng = np.random.default_rng(5)
    fresh = rng.uniform(0.1, 1.5, 50)
    for t in candidates:
        loss = fresh + (0.0 if t.number == 0 else rng.normal(0.02, 0.6, 50))
        study.add_trial(
            _trial(
                t.value,
                0.02,
                0,
                0.01,
                cv_loss=float(loss.mean()),
                oof=_oof(np.exp(-np.clip(loss, 0.0, None))),
                confirm_of=t.number,
                **({"baseline": "plain_finetuning"} if t.number == 0 else {}),
            )
        )
    gated = select(study, cfg, "confirm_gate")
    assert gated.trial.number == 0, gated.reason
    assert gated.reason.startswith("kept plain fine-tuning")
    assert "on fresh folds" in gated.reason and "/2" in gated.reason
    # The search's best and its runners-up are search trials, never confirmation trials.
    assert gated.best.number == 1
    assert all(not t.user_attrs.get("confirm_of") for t in gated.runners_up)
    # Older trials without per-image evidence: the rule says so, in one line, and falls back.
    bare = config_from_dict({"select": {"metric": "value"}, "search": {"backbone_lr_mult": 0.1}})
    old = optuna.create_study(direction="maximize")
    old.add_trial(_trial(0.88, 0.02, 0, 0.01, baseline="plain_finetuning"))
    old.add_trial(_trial(0.90, 0.02, 0, 0.5))
    fallback = select(old, bare, "gate")
    assert fallback.trial.number == 1
    assert fallback.reason == (
        "gate: these trials have no per-image evidence (made before tlsearch kept it); "
        "exported Optuna's best trial, trial 1"
    )


def test_rules_are_registry_entries_and_export_lists_them() -> None:
    from tlsearch.cli import build_parser
    from tlsearch.registry import SELECTION_RULES

    assert SELECTION_RULES.names() == ["best", "confirm", "confirm_gate", "gate", "loss", "one_se"]
    export = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices["export"]._actions
        if "--select" in a.option_strings
    )
    assert list(export.choices) == SELECTION_RULES.names()
