"""What the report reads from a study and from ``tlsearch final``'s results.

Everything here is plain data; the figures (:mod:`~tlsearch.report.figures`) and the HTML
(:mod:`~tlsearch.report.html`) only draw and lay it out. Table cells come back as unescaped text.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlsearch.config import StudyConfig
from tlsearch.confirmation import is_confirmation
from tlsearch.dashboard import describe_study
from tlsearch.errors import TlsearchError
from tlsearch.evidence import CURVE_ATTR
from tlsearch.export import FINAL_MODELS, trials_frame
from tlsearch.params import fixed_params
from tlsearch.selection import (
    Pool,
    accuracy,
    accuracy_se,
    baseline_of,
    standard_error,
    stored_selection,
)
from tlsearch.stats import format_pp
from tlsearch.storage import load_study_config

FINAL_HEADER = [
    "model",
    "test accuracy",
    "95 % interval",
    "each seed",
    "test loss",
    "CV estimate ± SE",
    "parameters",
]
COMPARISON_HEADER = [
    "difference",
    "accuracy",
    "95 % interval",
    "McNemar p",
    "images each got right more often",
]


@dataclass
class Point:
    """One trial as the figures see it: parameters (fixed ones included) and its fold scores."""

    number: int
    pruned: bool
    params: dict[str, Any]
    folds: list[float]
    # The mean fold accuracy, and its standard error (std(ddof=1)/√folds; 0 with one fold).
    value: float
    se: float
    # Whether the trial's value is within one standard error of the best trial's (one_se's pool).
    within_one_se: bool = False
    # "plain_finetuning" or "scratch" for the study's reference trials.
    baseline: str | None = None


@dataclass
class Importances:
    """Parameter importances (empty when there are none) and a note on how they came out."""

    values: dict[str, float] = field(default_factory=dict)
    note: str = ""


def study_config(study: optuna.Study) -> StudyConfig | None:
    """The study's stored config, or None for a study tlsearch did not create (or cannot read)."""
    try:
        return load_study_config(study)
    except TlsearchError:
        return None


def points(study: optuna.Study, cfg: StudyConfig | None) -> list[Point]:
    """The search's finished trials: complete ones, and pruned ones that scored at least one fold
    (the confirmation round's are scored on other folds and left out).

    A trial's parameters are those it trained with (a baseline's in full, fixed ones included).
    """
    fixed = fixed_params(cfg) if cfg is not None else {}
    best = best_trial(study)
    threshold = None
    if best is not None and best.value is not None:
        threshold = best.value - (standard_error(best) or 0.0)
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if is_confirmation(t):  # scored on other folds: not a point of the search
            continue
        folds = [float(s) for s in t.user_attrs.get("fold_scores") or []]
        complete = t.state == TrialState.COMPLETE
        if complete:
            value = float(accuracy(t))
        elif folds:  # a pruned trial: the mean of the folds it ran
            value = statistics.fmean(folds)
        else:
            continue
        se = accuracy_se(t) or 0.0
        params = {**fixed, **t.params, **(t.user_attrs.get("resolved_params") or {})}
        within = complete and threshold is not None and t.value >= threshold
        out.append(Point(t.number, not complete, params, folds, value, se, within, baseline_of(t)))
    return out


@dataclass
class Curve:
    """One trial's learning curves: each fold's held-out loss at the epochs it was evaluated,
    laid end to end (fold i's epoch e at ``i · epochs + e``, the trial's fold-epochs so far)."""

    number: int
    label: str
    pruned: bool
    # Per fold: (fold-epochs, held-out loss) at each evaluation.
    folds: list[tuple[list[int], list[float]]]


def curves(study: optuna.Study, epochs: int, most: int = 3) -> list[Curve]:
    """The learning curves of a few trials: the search's best, plain fine-tuning, and the
    ``most`` pruned trials that trained longest (where a pruner stopped them)."""
    pool = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if isinstance(t.user_attrs.get(CURVE_ATTR), dict) and not is_confirmation(t)
    ]
    complete = [t for t in pool if t.state == TrialState.COMPLETE]
    chosen: list[tuple[FrozenTrial, str]] = []
    if complete:
        top = max(complete, key=lambda t: (t.value, -t.number))
        chosen.append((top, f"trial {top.number} (best)"))
    plain = next((t for t in complete if baseline_of(t) == "plain_finetuning"), None)
    if plain is not None and all(plain is not t for t, _ in chosen):
        chosen.append((plain, f"trial {plain.number} (plain fine-tuning)"))
    pruned = [t for t in pool if t.state == TrialState.PRUNED]
    pruned.sort(key=lambda t: (-_trained(t), t.number))
    chosen += [(t, f"trial {t.number} (pruned)") for t in pruned[:most]]
    out = []
    for t, label in chosen:
        curve = t.user_attrs[CURVE_ATTR]
        folds = [
            ([i * epochs + e for e in curve["epochs"][: len(losses)]], list(losses))
            for i, losses in enumerate(curve["loss"])
            if losses
        ]
        out.append(Curve(t.number, label, t.state == TrialState.PRUNED, folds))
    return out


def _trained(t: FrozenTrial) -> int:
    """How many curve points a trial reached: how long it trained."""
    return sum(len(f) for f in t.user_attrs[CURVE_ATTR]["loss"])


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The search's best complete trial (never a confirmation trial), or None before the first."""
    pool = Pool.of(study)
    return pool.best() if pool.search else None


def importances(study: optuna.Study) -> Importances:
    """:func:`optuna.importance.get_param_importances` over the completed trials, or why not."""
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < 2:
        return Importances(note=f"Importances need at least 2 completed trials ({n} so far).")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as e:
            return Importances(note=f"Importances could not be computed: {e}")
    if not values:
        return Importances(note="No searched parameter to rank.")
    return Importances(dict(values), " ".join(str(w.message) for w in caught))


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits, a dash for a missing value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {fmt(v)}" for k, v in params.items())


def summary_rows(
    study: optuna.Study, cfg: StudyConfig | None, best: FrozenTrial | None
) -> list[list[str]]:
    """(topic, text) rows: trial counts by state, the best trial, and what the study measures."""
    trials = study.get_trials(deepcopy=False)
    counts = ", ".join(
        f"{n} {s.name.lower()}" for s in TrialState if (n := sum(t.state == s for t in trials))
    )
    rows = [["trials", counts or "none"]]
    if best is not None:
        se = accuracy_se(best)
        rows.append(
            [
                "best trial",
                f"#{best.number}: CV accuracy {accuracy(best):.4f}"
                + (f" ± {se:.4f} SE" if se is not None else "")
                + " — "
                + _params(best.params),
            ]
        )
    selected = stored_selection(study)
    if selected is not None:
        chosen = selected["selected"]
        se = chosen.get("cv_se")
        rows.append(
            [
                f"selected ({selected['rule']}, by the last export)",
                f"#{chosen['trial_number']}: CV accuracy {chosen['cv_mean']:.4f}"
                + (f" ± {se:.4f} SE" if se is not None else "")
                + " — "
                + _params(chosen["params"])
                + "; runners-up: "
                + ", ".join(f"#{r['trial_number']}" for r in selected["runners_up"]),
            ]
        )
        if selected.get("reason"):
            rows.append(["why", selected["reason"]])
    if cfg is not None:
        described = describe_study(cfg, study.user_attrs.get("task"))
        rows += [[k, v.replace("`", "")] for k, v in described.items()]
    return rows


def final_rows(final: Mapping[str, Any]) -> list[list[str]]:
    """One row per model of ``tlsearch final`` (columns :data:`FINAL_HEADER`), in report order.

    A file from before ``--seeds`` has no interval, seeds or standard error: those cells are dashes.
    """
    rows = []
    for name, label in FINAL_MODELS.items():
        m = final[name]
        interval = m.get("test_interval")
        seeds = m.get("seed_accuracies") or []
        cv = fmt(m.get("cv_mean"))
        if m.get("cv_mean") is not None and m.get("cv_se") is not None:
            cv += f" ± {m['cv_se']:.2g}"
        rows.append(
            [
                label,
                f"{m['test_accuracy']:.4f}",
                f"{interval[0]:.4f} – {interval[1]:.4f}" if interval else "–",
                ", ".join(f"{a:.4f}" for a in seeds) if len(seeds) > 1 else "–",
                f"{m['test_loss']:.4f}",
                cv,
                _params(m.get("params") or {}),
            ]
        )
    return rows


# How the comparisons name the models of tlsearch final.
_SHORT = {"tuned": "tuned", "plain_finetuning": "plain fine-tuning", "scratch": "scratch"}


def comparison_rows(final: Mapping[str, Any]) -> list[list[str]]:
    """The paired differences of ``tlsearch final`` (columns :data:`COMPARISON_HEADER`); none for
    a file from before they were computed."""
    rows = []
    for c in final.get("comparisons") or []:
        model, baseline = _SHORT[c["model"]], _SHORT[c["baseline"]]
        low, high = c["interval"]
        rows.append(
            [
                f"{model} − {baseline}",
                f"{format_pp(c['difference'])} pp",
                f"{format_pp(low)} pp … {format_pp(high)} pp",
                f"{c['mcnemar_p']:.3g}",
                f"{c['model_only']} vs {c['baseline_only']}",
            ]
        )
    return rows


def plain_settings(final: Mapping[str, Any]) -> str:
    """Plain fine-tuning's exact settings, as a sentence."""
    return (
        f"Plain fine-tuning trains with {_params(final['plain_finetuning'].get('params') or {})}."
    )


def trial_rows(study: optuna.Study) -> tuple[list[str], list[list[str]]]:
    """The trials table: header and one row per trial (no rows for a study without trials)."""
    df = trials_frame(study)
    if df.empty:
        return [], []
    cols = [c for c in df.columns if c in ("number", "state", "value", "duration")]
    cols += [c for c in df.columns if c.startswith("params_")]
    cols += [c for c in ("user_attrs_cv_std", "user_attrs_fail_reason") if c in df.columns]
    header = [c.removeprefix("params_").removeprefix("user_attrs_") for c in cols]
    header = ["cv_mean" if h == "value" else "seconds" if h == "duration" else h for h in header]
    return header, [[fmt(v) for v in r] for r in df[cols].itertuples(index=False)]
