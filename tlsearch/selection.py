"""Which trial a study's answer is: Optuna's *best* trial, or the trial a rule *selects*.

"best" is Optuna's best trial: the highest value (``cv.metric``). With a few labels per class the
value is noisy (each fold scores a few images), and the best of many noisy estimates is biased
up; a rule can prefer a trial that is as good within the noise and more strongly regularized:

- ``best``: Optuna's best trial.
- ``one_se``: among the complete trials whose value is within one standard error of the best's
  (the SE of the best trial's fold values, ``std(ddof=1)/√(k·repeats)``), the one with the most
  frozen blocks, then the largest λ, then the smallest learning rate, then the higher value and
  the earlier trial. The ``scratch`` baseline is a candidate only when it is the best itself:
  "as good as transfer, within the noise" is said by ``tlsearch final``, not chosen silently.

The rule is an export flag (``tlsearch export --select``): it changes no trial, so it is not part
of the study's config or search hash. The selection made last is stored as the study attribute
``tlsearch_selected`` (rule, trial, standard error, runners-up), which ``status`` and ``report``
show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlsearch.config import StudyConfig
from tlsearch.errors import TlsearchError
from tlsearch.params import resolve_params
from tlsearch.stats import mean_se

__all__ = [
    "ATTR_SELECTED",
    "RULES",
    "Selection",
    "accuracy",
    "accuracy_se",
    "baseline_of",
    "resolved_params",
    "select",
    "standard_error",
    "stored_selection",
    "trial_record",
]

ATTR_SELECTED = "tlsearch_selected"
RULES = ("best", "one_se")
RUNNERS_UP = 5


def accuracy(trial: FrozenTrial) -> float | None:
    """The trial's mean fold accuracy (its value, for a study made before ``cv.metric``)."""
    return trial.user_attrs.get("cv_mean", trial.value)


def standard_error(trial: FrozenTrial) -> float | None:
    """The standard error of the trial's *value* (``cv.metric``: of its fold losses for
    ``loss``): ``cv_se``, or from its fold scores for a trial made before it was recorded; None
    with fewer than 2 folds. What the ``one_se`` rule compares."""
    if "cv_se" in trial.user_attrs:
        return trial.user_attrs["cv_se"]
    return accuracy_se(trial)


def accuracy_se(trial: FrozenTrial) -> float | None:
    """The standard error of the trial's mean fold *accuracy* (what is shown beside it)."""
    return mean_se(trial.user_attrs.get("fold_scores") or [])


def baseline_of(trial: FrozenTrial) -> str | None:
    """``plain_finetuning`` or ``scratch`` for a reference trial, else None."""
    return trial.user_attrs.get("baseline")


def resolved_params(trial: FrozenTrial, cfg: StudyConfig) -> dict[str, Any]:
    """Everything the trial fine-tuned with, under the names files use."""
    stored = trial.user_attrs.get("resolved_params")
    return dict(stored) if stored else resolve_params(cfg, trial.params).to_dict()


def trial_record(trial: FrozenTrial, cfg: StudyConfig) -> dict[str, Any]:
    """A complete trial as ``best.json`` and the stored selection write it."""
    return {
        "trial_number": trial.number,
        "value": trial.value,
        "cv_mean": accuracy(trial),
        "cv_std": trial.user_attrs.get("cv_std"),
        "cv_se": accuracy_se(trial),
        "value_se": standard_error(trial),
        "cv_loss": trial.user_attrs.get("cv_loss"),
        "baseline": baseline_of(trial),
        "params": resolved_params(trial, cfg),
    }


@dataclass(frozen=True)
class Selection:
    """A rule's choice: the selected trial, Optuna's best, and what the rule compared."""

    rule: str
    trial: FrozenTrial
    best: FrozenTrial
    # The standard error of the best trial's value: the rule's tolerance (one_se).
    se: float | None
    # The other complete trials, by value, highest first (at most RUNNERS_UP).
    runners_up: list[FrozenTrial]
    # The trials within one standard error of the best (the best included).
    within: list[FrozenTrial]

    def to_dict(self, cfg: StudyConfig) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "metric": cfg.cv.metric,
            "selected": trial_record(self.trial, cfg),
            "best": trial_record(self.best, cfg),
            "best_se": self.se,
            "within_one_se": [t.number for t in self.within],
            "runners_up": [trial_record(t, cfg) for t in self.runners_up],
        }


def select(study: optuna.Study, cfg: StudyConfig, rule: str = "best") -> Selection:
    """The trial ``rule`` (one of :data:`RULES`) selects among the study's complete trials."""
    if rule not in RULES:
        raise TlsearchError(f"--select: unknown rule '{rule}' (choose from {', '.join(RULES)})")
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise TlsearchError(f"study '{study.study_name}' has no completed trial yet")
    best = study.best_trial
    se = standard_error(best)
    within = [t for t in done if t.value is not None and t.value >= best.value - (se or 0.0)]
    chosen = best
    if rule == "one_se":
        candidates = [t for t in within if baseline_of(t) != "scratch" or t.number == best.number]

        def preference(t: FrozenTrial) -> tuple[float, ...]:
            p = resolved_params(t, cfg)
            # λ means nothing under "none": such a trial ranks as the smallest λ.
            lam = 0.0 if p["regularizer"] == "none" else p["lambda"]
            return (
                -p["frozen_blocks"],
                -lam,
                p["lr"],
                -(t.value or 0.0),
                t.number,
            )

        chosen = min(candidates, key=preference)
    ranked = sorted(done, key=lambda t: (-(t.value or 0.0), t.number))
    runners_up = [t for t in ranked if t.number != chosen.number][:RUNNERS_UP]
    within.sort(key=lambda t: (-(t.value or 0.0), t.number))
    return Selection(rule, chosen, best, se, runners_up, within)


def stored_selection(study: optuna.Study) -> dict[str, Any] | None:
    """The selection ``tlsearch export`` stored last (:meth:`Selection.to_dict`), if any."""
    return study.user_attrs.get(ATTR_SELECTED)
