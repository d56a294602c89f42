"""Which trial a study's answer is: the trial a selection rule picks, and the one line that says why.

With a few labels per class every trial's CV score is noisy, and the best of thirty noisy scores is
biased up: a rule that simply takes the best can export a configuration that loses to plain
fine-tuning on new images although the study held the evidence against it. The rules here are the
entries of :data:`tlsearch.registry.SELECTION_RULES` (``tlsearch export --select`` lists them; the
study's ``select.rule`` is the default):

- ``best``: Optuna's best search trial (the highest value, ``cv.metric``).
- ``loss``: the search trial with the lowest mean fold loss.
- ``one_se``: among the search trials within one standard error of the best, the most frozen
  blocks, then the strongest penalty (λ's place in its search range: a penalty with a λ of its
  own, as DELTA, is never compared with another's as numbers), then the smallest learning rate
  (scratch only when it is the best).
- ``gate``: the top search trial by ``select.metric`` leaves plain fine-tuning only when its paired
  out-of-fold log-loss advantage, image by image on the same folds (:mod:`tlsearch.evidence`), is
  above 0 at the one-sided level ``select.alpha`` divided by the number of trials it was picked
  from (Bonferroni: the best of many noisy estimates is optimistic).
- ``confirm``: after the search, the top ``select.confirm`` distinct configurations and plain
  fine-tuning are trained again on fresh fold splits (the **confirmation round**: trials of the
  same study, tagged ``confirm_of``); the choice is made on those fresh scores only, which removes
  the winner's curse of the search's split.
- ``confirm_gate``: the confirmation round's winner leaves plain fine-tuning only when its paired
  log-loss advantage on the fresh folds is above 0 at ``select.alpha`` / ``select.confirm``.

The last two live with the round they read, in :mod:`tlsearch.confirmation`; this module holds
what every rule shares (:class:`Pool`, :func:`ranked`, :func:`references`, the reason's wording).

A rule never changes a trial. The selection made last (rule, trial, reason, evidence, runners-up) is
stored as the study attribute ``tlsearch_selected``, which ``status`` and ``report`` show; ``final``
repeats its reason. A rule that needs what an older study lacks (per-image evidence, a confirmation
round) says so in its reason and falls back to Optuna's best trial, as the study exported
before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlsearch.config import StudyConfig
from tlsearch.errors import ConfigError, TlsearchError
from tlsearch.evidence import Paired, decode_oof, paired
from tlsearch.params import lambda_range, resolve_params
from tlsearch.registry import SELECTION_RULES
from tlsearch.stats import mean_se
from tlsearch.storage import CONFIRM_ATTR, is_confirmation

__all__ = [
    "ATTR_SELECTED",
    "CONFIRM_ATTR",
    "Decision",
    "Pool",
    "Selection",
    "accuracy",
    "accuracy_se",
    "baseline_of",
    "describe",
    "fallback",
    "gated",
    "ranked",
    "reference",
    "references",
    "resolved_params",
    "score_text",
    "select",
    "standard_error",
    "stored_selection",
    "trial_record",
]

ATTR_SELECTED = "tlsearch_selected"
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
    """``plain_finetuning``, ``scratch`` or ``plain_augmented`` for a reference trial, else
    None."""
    return trial.user_attrs.get("baseline")


def resolved_params(trial: FrozenTrial, cfg: StudyConfig) -> dict[str, Any]:
    """Everything the trial fine-tuned with, under the names files use."""
    stored = trial.user_attrs.get("resolved_params")
    return dict(stored) if stored else resolve_params(cfg, trial.params).to_dict()


def trial_record(trial: FrozenTrial, cfg: StudyConfig) -> dict[str, Any]:
    """A complete trial as ``best.json``, the stored selection and ``export`` write it: the one
    place its fields are named."""
    return {
        "trial_number": trial.number,
        "value": trial.value,
        "cv_mean": accuracy(trial),
        "cv_std": trial.user_attrs.get("cv_std"),
        "cv_se": accuracy_se(trial),
        "value_se": standard_error(trial),
        "cv_loss": trial.user_attrs.get("cv_loss"),
        "fold_scores": trial.user_attrs.get("fold_scores"),
        "baseline": baseline_of(trial),
        "params": resolved_params(trial, cfg),
        "searched_params": dict(trial.params),
    }


@dataclass(frozen=True)
class Pool:
    """A study's complete trials as the rules see them: the search's (baselines included), by
    number, and the confirmation round's, by the number of the trial each trained again."""

    search: list[FrozenTrial]
    confirmations: dict[int, FrozenTrial] = field(default_factory=dict)
    # Candidates whose confirmation trial diverged (pruned with its reason): they lose the round.
    diverged: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, study: optuna.Study) -> Pool:
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        confirmations: dict[int, FrozenTrial] = {}
        diverged: set[int] = set()
        search = []
        for t in study.get_trials(deepcopy=False, states=states):
            if not is_confirmation(t):
                if t.state == TrialState.COMPLETE:
                    search.append(t)
            elif t.state == TrialState.COMPLETE:
                confirmations.setdefault(int(t.user_attrs[CONFIRM_ATTR]), t)
            else:
                diverged.add(int(t.user_attrs[CONFIRM_ATTR]))
        return cls(search, confirmations, diverged)

    def baseline(self, name: str) -> FrozenTrial | None:
        return next((t for t in self.search if baseline_of(t) == name), None)

    def best(self) -> FrozenTrial:
        """Optuna's best trial of the search: the highest value, the earliest on ties."""
        return max(self.search, key=lambda t: (t.value, -t.number))


def ranked(trials: Sequence[FrozenTrial], metric: str) -> list[FrozenTrial]:
    """``trials`` best first by ``metric`` ("value": the highest ``cv.metric``; "loss": the
    lowest mean fold loss), the earlier trial first on ties."""
    if metric == "loss":
        return sorted(trials, key=lambda t: (t.user_attrs.get("cv_loss", math.inf), t.number))
    return sorted(
        trials, key=lambda t: (-(t.value if t.value is not None else -math.inf), t.number)
    )


def references(pool: Pool, cfg: StudyConfig) -> list[FrozenTrial]:
    """The trials the answer may fall back to (``select.reference``): plain fine-tuning, or both
    baselines the study has."""
    names = ["plain_finetuning"]
    if cfg.select.reference == "baselines":
        names.append("scratch")
    return [t for t in map(pool.baseline, names) if t is not None]


def reference(trials: Sequence[FrozenTrial], cfg: StudyConfig) -> FrozenTrial | None:
    """Of ``trials`` (the references, or their confirmation runs), the one the answer falls back
    to: the first, or with ``select.reference = "baselines"`` the one with the lowest CV loss."""
    if not trials:
        return None
    return ranked(trials, "loss")[0] if cfg.select.reference == "baselines" else trials[0]


@dataclass(frozen=True)
class Decision:
    """What a rule chose (a search trial), the one line that says why, and its numbers."""

    trial: FrozenTrial
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


Rule = Callable[[Pool, StudyConfig], Decision]


@dataclass(frozen=True)
class Selection:
    """A rule's choice: the selected trial, Optuna's best, and what the rule compared."""

    rule: str
    trial: FrozenTrial
    best: FrozenTrial
    # The standard error of the best trial's value: one_se's tolerance.
    se: float | None
    # The other complete search trials, by value, highest first (at most RUNNERS_UP).
    runners_up: list[FrozenTrial]
    # The search trials within one standard error of the best (the best included).
    within: list[FrozenTrial]
    reason: str
    evidence: dict[str, Any]

    def to_dict(self, cfg: StudyConfig) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "reason": self.reason,
            "evidence": self.evidence,
            "metric": cfg.cv.metric,
            "selected": trial_record(self.trial, cfg),
            "best": trial_record(self.best, cfg),
            "best_se": self.se,
            "within_one_se": [t.number for t in self.within],
            "runners_up": [trial_record(t, cfg) for t in self.runners_up],
        }


def select(study: optuna.Study, cfg: StudyConfig, rule: str | None = None) -> Selection:
    """The trial ``rule`` (default: the study's ``select.rule``) selects, and why."""
    rule = rule or cfg.select.rule
    try:
        entry = SELECTION_RULES.get(rule)
    except ConfigError:
        raise TlsearchError(
            f"--select: unknown rule '{rule}' (choose from {', '.join(SELECTION_RULES.names())})"
        ) from None
    pool = Pool.of(study)
    if not pool.search:
        raise TlsearchError(f"study '{study.study_name}' has no completed trial yet")
    decision: Decision = entry.load()(pool, cfg)
    best = pool.best()
    se = standard_error(best)
    within = [t for t in pool.search if t.value is not None and t.value >= best.value - (se or 0)]
    by_value = ranked(pool.search, "value")
    runners_up = [t for t in by_value if t.number != decision.trial.number][:RUNNERS_UP]
    within.sort(key=lambda t: (-(t.value or 0.0), t.number))
    return Selection(
        rule, decision.trial, best, se, runners_up, within, decision.reason, decision.evidence
    )


def stored_selection(study: optuna.Study) -> dict[str, Any] | None:
    """The selection ``tlsearch export`` stored last (:meth:`Selection.to_dict`), if any."""
    return study.user_attrs.get(ATTR_SELECTED)


# --- the rules (registered in tlsearch.registry.SELECTION_RULES) ---------------------------------


def describe(t: FrozenTrial) -> str:
    name = baseline_of(t)
    return {
        "plain_finetuning": "plain fine-tuning",
        "scratch": "scratch",
        "plain_augmented": "plain fine-tuning + translate",
    }.get(name or "", f"trial {t.number}")


def score_text(t: FrozenTrial, metric: str) -> str:
    if metric == "loss":
        return f"CV loss {t.user_attrs.get('cv_loss', math.nan):.4f}"
    return f"value {t.value:.4f}"


def best(pool: Pool, cfg: StudyConfig) -> Decision:
    t = pool.best()
    return Decision(
        t, f"best: {describe(t)} has the highest value ({t.value:.4f}) of {len(pool.search)}"
    )


def loss(pool: Pool, cfg: StudyConfig) -> Decision:
    t = ranked(pool.search, "loss")[0]
    return Decision(t, f"loss: {describe(t)} has the lowest {score_text(t, 'loss')}")


def one_se(pool: Pool, cfg: StudyConfig) -> Decision:
    top = pool.best()
    se = standard_error(top) or 0.0
    within = [t for t in pool.search if t.value is not None and t.value >= top.value - se]
    candidates = [t for t in within if baseline_of(t) != "scratch" or t.number == top.number]

    def preference(t: FrozenTrial) -> tuple[float, ...]:
        p = resolved_params(t, cfg)
        return (-p["frozen_blocks"], -_strength(p, cfg), p["lr"], -(t.value or 0.0), t.number)

    chosen = min(candidates, key=preference)
    return Decision(
        chosen,
        f"one_se: {describe(chosen)} is the most regularized of {len(within)} trial(s) within "
        f"one standard error ({se:.4f}) of the best",
    )


def _strength(params: dict[str, Any], cfg: StudyConfig) -> float:
    """How strongly a trial's penalty pulls, comparable across penalties: its λ's place in the
    range it was searched over (0 at the low end, 1 at the high end; on a log scale for a log
    range). A penalty with a λ of its own (DELTA's scales a distance between feature maps, L2-SP's
    one between weights) is placed in its own range, so λs of two penalties are never compared as
    numbers. λ means nothing under "none": -1."""
    if params["regularizer"] == "none":
        return -1.0
    space = lambda_range(cfg, params["regularizer"])
    lam = params["lambda"]
    if not hasattr(space, "low") or space.high <= space.low:
        return 0.0
    if space.log and lam > 0:
        return (math.log(lam) - math.log(space.low)) / (math.log(space.high) - math.log(space.low))
    return (lam - space.low) / (space.high - space.low)


def fallback(pool: Pool, cfg: StudyConfig, why: str) -> Decision:
    """Optuna's best trial, with why the rule could not decide: what a study exported before."""
    t = pool.best()
    return Decision(t, f"{why}; exported Optuna's best trial, {describe(t)}")


def gated(
    top: FrozenTrial, ref: FrozenTrial, compared: Paired, tests: int, cfg: StudyConfig, where: str
) -> Decision:
    """``top`` when its advantage over ``ref`` is significant at ``alpha / tests``, else ref."""
    alpha = cfg.select.alpha
    p = compared.p_value("loss")
    numbers = {**compared.to_dict(), "p_value": p, "level": alpha / tests, "candidate": top.number}
    advantage = (
        f"paired log-loss advantage {compared.loss:+.3f} ± {compared.loss_se:.3f} over "
        f"{compared.n} images {where}, p = {p:.2g}"
    )
    level = f"{alpha:g}/{tests}" if tests > 1 else f"{alpha:g}"
    if p < alpha / tests:
        reason = f"left {describe(ref)} for {describe(top)}: its {advantage} < {level}"
        return Decision(top, reason, numbers)
    reason = f"kept {describe(ref)}: {describe(top)}'s {advantage}, not below {level}"
    return Decision(ref, reason, numbers)


def gate(pool: Pool, cfg: StudyConfig) -> Decision:
    ref = reference(references(pool, cfg), cfg)
    if ref is None:
        return fallback(pool, cfg, "gate: no plain fine-tuning trial (search.baselines)")
    top = ranked(pool.search, cfg.select.metric)[0]
    if top is ref:
        return Decision(ref, f"kept {describe(ref)}: it ranks first by {cfg.select.metric}")
    ours, theirs = decode_oof(top.user_attrs), decode_oof(ref.user_attrs)
    if ours is None or theirs is None:
        return fallback(
            pool,
            cfg,
            "gate: these trials have no per-image evidence (made before tlsearch kept it)",
        )
    return gated(top, ref, paired(ours, theirs), len(pool.search) - 1, cfg, "in the search")
