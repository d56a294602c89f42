"""What a person watching a study sees: one line per finished trial, and a summary table."""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlsearch.confirmation import CONFIRM_ATTR, is_confirmation
from tlsearch.params import format_params
from tlsearch.selection import Pool, accuracy, accuracy_se, baseline_of
from tlsearch.storage import count_budget

__all__ = ["ProgressPrinter", "describe_value", "summary_table"]


class ProgressPrinter:
    """One line per finished trial: state, CV score, the best so far and its parameters."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr, prefix: str = "") -> None:
        self.total = total
        self.stream = stream
        self.prefix = prefix

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        done = count_budget(study)
        of = f"/{self.total}" if self.total else ""
        if trial.state == TrialState.COMPLETE:
            what = describe_value(trial)
        elif trial.state == TrialState.PRUNED:
            reason = trial.user_attrs.get("fail_reason")
            folds = trial.user_attrs.get("pruned_after_folds")
            epoch = trial.user_attrs.get("pruned_at_epoch")
            if reason:
                what = f"pruned ({reason})"
            elif epoch is not None:
                what = f"pruned at epoch {epoch}"
            else:
                what = f"pruned after {folds} fold(s)"
        else:
            what = trial.state.name.lower()
        name = baseline_of(trial)
        confirms = trial.user_attrs.get(CONFIRM_ATTR)
        if confirms is not None:
            # The confirmation round: a search trial's settings again, on fresh folds.
            about = f"{name.replace('_', ' ')}, " if name else ""
            line = f"{self.prefix}[confirmation] trial {trial.number} ({about}trial {confirms} "
            line += f"on fresh folds): {what}"
        else:
            line = f"{self.prefix}[{done}{of}] trial {trial.number}"
            line += f" ({name.replace('_', ' ')}): {what}" if name else f": {what}"
        pool = Pool.of(study)
        best = pool.best() if pool.search else None
        if best is not None:
            about = baseline_of(best) or format_params(best.params)
            line += f" | best cv {accuracy(best):.3f} (#{best.number}: {about})"
        # One write per line: print() writes the text and the newline apart, and lines of workers
        # sharing a terminal then run into each other.
        self.stream.write(line + "\n")
        self.stream.flush()


def describe_value(trial: FrozenTrial) -> str:
    """``cv 0.920±0.018 loss 0.312``: the mean fold accuracy with its standard error, and the
    mean fold loss where the trial recorded it."""
    se = accuracy_se(trial)
    text = f"cv {accuracy(trial):.3f}" + (f"±{se:.3f}" if se is not None else "")
    loss = trial.user_attrs.get("cv_loss")
    return text + (f" loss {loss:.3f}" if loss is not None else "")


def summary_table(study: optuna.Study, top: int = 5) -> str:
    """A short text table: trial counts by state, the best search trials, then the confirmation
    round's (each labelled with the trial it runs again on fresh folds: their CV is on other
    folds, so they are not ranked with the search)."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    lines = [
        f"study '{study.study_name}': " + ", ".join(f"{n} {k}" for k, n in counts.items() if n),
    ]
    pool = Pool.of(study)
    done = sorted(pool.search, key=lambda t: -(t.value or 0.0))[:top]
    done += pool.confirmations.values()
    if not done:
        return "\n".join(lines + ["no completed trial yet"])
    names = sorted({k for t in done for k in t.params})
    header = ["trial", "cv_mean", "cv_se", "cv_loss", *names, "seconds"]

    def label(t: FrozenTrial) -> str:
        if is_confirmation(t):
            return f"{t.number} ({t.user_attrs[CONFIRM_ATTR]} on fresh folds)"
        return str(t.number) + (f" ({baseline_of(t)})" if baseline_of(t) else "")

    rows = [
        [
            label(t),
            f"{accuracy(t):.4f}",
            _fmt_float(accuracy_se(t)),
            _fmt_float(t.user_attrs.get("cv_loss")),
            *(_fmt_value(t.params.get(n)) for n in names),
            f"{t.user_attrs.get('seconds', math.nan):.1f}",
        ]
        for t in done
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def _fmt_float(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
