"""The confirmation round, in one place.

With a few labels per class every trial's CV score is noisy, and the best of thirty noisy scores
is biased up. So once a study's budget is finished, its search winners are trained again on
folds the search never scored, beside plain fine-tuning, and the answer is chosen on those fresh
scores alone (``docs/selection.md``, "Do no harm"):

1. **Candidates** (:func:`confirmation_candidates`): the top ``select.confirm`` distinct
   configurations of the search by ``select.metric``, then the references
   (:func:`tlsearch.selection.references`: plain fine-tuning, and scratch with
   ``select.reference = "baselines"``), then plain fine-tuning with the standard augmentation
   where the study has it (a candidate, never a fallback). They follow from the finished search
   alone, so every worker computes the same.
2. **Queued** (:func:`queue_confirmation`): each candidate's trial is enqueued with its
   parameters and the user attribute ``confirm_of`` (:data:`CONFIRM_ATTR`, the candidate's
   number), by whichever worker finishes the budget first (``tlsearch.study.loop``); the storage
   keeps these trials outside the budget and refuses a second one for a candidate
   (:class:`tlsearch.storage.AlreadyQueued`), so all workers run them and none runs one twice.
3. **Trained** on :data:`CONFIRM_REPEATS` fresh repeats of ``cv.k`` folds
   (:func:`tlsearch.objective.make_folds`), never pruned and reporting nothing a pruner could
   compare with the search's trials (:class:`tlsearch.objective.KFoldObjective`).
4. **Read** by the selection rules ``confirm`` (the candidate whose fresh run ranks first) and
   ``confirm_gate`` (which leaves the reference only for a significant paired advantage on the
   fresh folds), registered in :data:`tlsearch.registry.SELECTION_RULES`; a candidate whose fresh
   run diverged loses the round. :func:`round_finished` says when a study is done.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlsearch.config import StudyConfig
from tlsearch.evidence import decode_oof, paired
from tlsearch.selection import (
    Decision,
    Pool,
    baseline_of,
    describe,
    fallback,
    gated,
    ranked,
    reference,
    references,
    resolved_params,
    score_text,
)
from tlsearch.storage import (
    BUDGET_STATES,
    CONFIRM_ATTR,
    AlreadyQueued,
    count_budget,
    is_confirmation,
)

__all__ = [
    "CONFIRM_ATTR",
    "CONFIRM_REPEATS",
    "confirm",
    "confirm_gate",
    "confirmation_candidates",
    "is_confirmation",
    "queue_confirmation",
    "round_finished",
]

# Fresh repeats of k folds a confirmation trial is scored on.
CONFIRM_REPEATS = 1


def confirmation_candidates(pool: Pool, cfg: StudyConfig) -> list[FrozenTrial]:
    """The search trials the confirmation round trains again: the top ``select.confirm`` distinct
    configurations by ``select.metric``, then the references, then the augmented reference trial
    (``plain_augmented``) where the study has one. Empty when ``select.confirm`` is 0.
    """
    if cfg.select.confirm <= 0 or not pool.search:
        return []
    augmented = pool.baseline("plain_augmented")
    refs = references(pool, cfg) + ([augmented] if augmented is not None else [])
    chosen: list[FrozenTrial] = []
    seen = {_config_key(t, cfg) for t in refs}
    for t in ranked(pool.search, cfg.select.metric):
        key = _config_key(t, cfg)
        if all(t is not r for r in refs) and key not in seen:
            seen.add(key)
            chosen.append(t)
        if len(chosen) == cfg.select.confirm:
            break
    return chosen + refs


def _config_key(trial: FrozenTrial, cfg: StudyConfig) -> tuple:
    """What makes two trials the same configuration: their resolved parameters (and whether
    they start from scratch)."""
    params = resolved_params(trial, cfg)
    return (baseline_of(trial) == "scratch", *sorted((k, repr(v)) for k, v in params.items()))


def queue_confirmation(study: optuna.Study, cfg: StudyConfig) -> int:
    """Queue the confirmation round's trials not queued yet; return how many the round has.

    Each candidate is queued with its parameters and ``confirm_of`` (and ``baseline``, for a
    baseline's); the storage refuses a second one.
    """
    candidates = confirmation_candidates(Pool.of(study), cfg)
    queued = {
        t.user_attrs[CONFIRM_ATTR]
        for t in study.get_trials(deepcopy=False)
        if is_confirmation(t) and t.state != TrialState.FAIL
    }
    for t in candidates:
        if t.number in queued:
            continue
        attrs: dict[str, Any] = {CONFIRM_ATTR: t.number}
        if baseline_of(t) is not None:
            attrs["baseline"] = baseline_of(t)
        try:
            study.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
        except AlreadyQueued:
            continue
    return len(candidates)


def round_finished(study: optuna.Study, cfg: StudyConfig) -> bool:
    """Whether the study's budget and its confirmation round (if any) are finished."""
    if cfg.n_trials is None or count_budget(study) < cfg.n_trials:
        return False
    wanted = {t.number for t in confirmation_candidates(Pool.of(study), cfg)}
    done = {
        t.user_attrs[CONFIRM_ATTR]
        for t in study.get_trials(deepcopy=False, states=BUDGET_STATES)
        if is_confirmation(t)
    }
    return wanted <= done


def _round(pool: Pool, cfg: StudyConfig) -> tuple[list[FrozenTrial], list[FrozenTrial]] | str:
    """The confirmation round's candidates and their runs, or why they are not there."""
    candidates = confirmation_candidates(pool, cfg)
    if not candidates:
        return "this study runs no confirmation round (select.confirm = 0)"
    finished = [
        t for t in candidates if t.number in pool.confirmations or t.number in pool.diverged
    ]
    if len(finished) < len(candidates):
        return (
            f"the confirmation round is not finished ({len(finished)} of {len(candidates)} trials)"
        )
    # A candidate whose run diverged on the fresh folds loses the round.
    kept = [t for t in candidates if t.number in pool.confirmations]
    if not kept:
        return "every confirmation trial diverged"
    return kept, [pool.confirmations[t.number] for t in kept]


# --- the rules that read the round (registered in tlsearch.registry.SELECTION_RULES) -----------


def confirm(pool: Pool, cfg: StudyConfig) -> Decision:
    found = _round(pool, cfg)
    if isinstance(found, str):
        return fallback(pool, cfg, f"confirm: {found}")
    candidates, runs = found
    metric = cfg.select.metric
    winner = ranked(runs, metric)[0]
    chosen = candidates[runs.index(winner)]
    scores = ", ".join(
        f"{describe(c)} {score_text(r, metric)}" for c, r in zip(candidates, runs, strict=True)
    )
    return Decision(
        chosen,
        f"confirm: {describe(chosen)} ranks first on fresh folds ({scores})",
        {"runs": {c.number: r.number for c, r in zip(candidates, runs, strict=True)}},
    )


def confirm_gate(pool: Pool, cfg: StudyConfig) -> Decision:
    found = _round(pool, cfg)
    if isinstance(found, str):
        return fallback(pool, cfg, f"confirm_gate: {found}")
    candidates, runs = found
    refs = references(pool, cfg)
    ref_runs = [r for c, r in zip(candidates, runs, strict=True) if any(c is t for t in refs)]
    ref_run = reference(ref_runs, cfg)
    if ref_run is None:
        return confirm(pool, cfg)
    ref = candidates[runs.index(ref_run)]
    winner = ranked(runs, cfg.select.metric)[0]
    chosen = candidates[runs.index(winner)]
    if chosen is ref:
        return Decision(ref, f"kept {describe(ref)}: it ranks first on fresh folds")
    ours, theirs = decode_oof(winner.user_attrs), decode_oof(ref_run.user_attrs)
    if ours is None or theirs is None:
        return confirm(pool, cfg)
    tests = len(candidates) - 1
    return gated(chosen, ref, paired(ours, theirs), tests, cfg, "on fresh folds")
