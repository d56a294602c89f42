"""Where a study stands: trials by state, the best trial, the running trials and an ETA.

The ETA is the study's remaining budget (``n_trials`` of the stored config minus the trials
already complete or pruned) times the mean duration of the finished trials, less the time the
running trials have already spent, shared among the running workers. It is a rough guide: pruned
trials are shorter, and workers come and go.
"""

from __future__ import annotations

import datetime as dt
import statistics
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlsearch.confirmation import CONFIRM_ATTR, is_confirmation
from tlsearch.errors import StorageError
from tlsearch.params import format_params
from tlsearch.selection import (
    Pool,
    accuracy,
    accuracy_se,
    baseline_of,
    stored_selection,
)
from tlsearch.storage import (
    create_storage,
    find_study,
    load_study_config,
    mask_url,
    storage_error,
)

__all__ = ["heartbeat_ages", "status_table", "study_status"]

# Trials that used up part of the budget and have a duration the ETA can learn from.
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def heartbeat_ages(storage_url: str, study_name: str) -> dict[int, float]:
    """Seconds since each trial's last heartbeat, by trial number, on the database's clock.

    Empty when the workers record no heartbeats. Optuna keeps heartbeats in a table of its RDB
    schema with no public reader, so this reads that table.
    """
    import sqlalchemy as sa
    from optuna.storages._rdb import models

    storage = create_storage(storage_url)
    heartbeat, trial = models.TrialHeartbeatModel, models.TrialModel
    try:
        study_id = storage.get_study_id_from_name(study_name)
        with sa.orm.Session(storage.engine) as session:
            now = session.execute(sa.select(sa.type_coerce(sa.func.now(), sa.DateTime))).scalar()
            rows = session.execute(
                sa.select(trial.number, heartbeat.heartbeat)
                .join(heartbeat, heartbeat.trial_id == trial.trial_id)
                .where(trial.study_id == study_id)
            ).all()
    except KeyError:
        return {}
    except sa.exc.SQLAlchemyError as e:
        raise storage_error(storage_url, e, "cannot read heartbeats") from e
    finally:
        storage.engine.dispose()
    # PostgreSQL's now() carries the session's time zone; the heartbeat column holds that zone's
    # wall-clock time without one (SQLite: UTC on both sides).
    now = now.replace(tzinfo=None)
    return {number: max(0.0, (now - beat).total_seconds()) for number, beat in rows}


def _trial_line(t: FrozenTrial) -> str:
    se = accuracy_se(t)
    loss = t.user_attrs.get("cv_loss")
    return (
        f"trial {t.number}, cv {accuracy(t):.4f}"
        + (f" ± {se:.4f} SE" if se is not None else "")
        + (f", loss {loss:.4f}" if loss is not None else "")
        + (f": {format_params(t.params)}" if t.params else "")
    )


def _selected(study: optuna.Study) -> list[str]:
    """What the last export selected, and the rule's one-line reason."""
    selected = stored_selection(study)
    if selected is None:
        return []
    chosen = selected["selected"]
    se = chosen.get("cv_se")
    runners = ", ".join(str(r["trial_number"]) for r in selected["runners_up"])
    lines = [
        f"selected ({selected['rule']}, by the last export): trial {chosen['trial_number']}, "
        f"cv {chosen['cv_mean']:.4f}"
        + (f" ± {se:.4f} SE" if se is not None else "")
        + f"; runners-up: {runners}"
    ]
    if selected.get("reason"):
        lines.append(f"  why: {selected['reason']}")
    return lines


def _fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


def _duration(t: FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def status_table(
    study: optuna.Study,
    *,
    heartbeats: dict[int, float] | None = None,
    storage_label: str | None = None,
    now: dt.datetime | None = None,
) -> str:
    """The study's status as text: counts, budget, best trial, running trials and the ETA.

    Args:
        study: the study.
        heartbeats: seconds since the last heartbeat by trial number (:func:`heartbeat_ages`).
        storage_label: where the study lives, as shown to a person (password masked).
        now: the local time trial start times are compared with (Optuna stores local times).
    """
    now = now or dt.datetime.now()
    trials = study.get_trials(deepcopy=False)
    try:
        n_trials = load_study_config(study, names=False).n_trials
    except StorageError:
        n_trials = None
    where = f" in {storage_label}" if storage_label else ""
    running = [t for t in trials if t.state == TrialState.RUNNING]
    elapsed = {
        t.number: (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0
        for t in running
    }
    finished = [t for t in trials if t.state in _FINISHED and not is_confirmation(t)]
    return "\n".join(
        [
            f"study '{study.study_name}'{where}",
            *_budget_lines(trials, finished, n_trials),
            *_result_lines(study),
            *_running_lines(running, elapsed, heartbeats or {}),
            _eta_line(finished, running, elapsed, n_trials, now),
        ]
    )


def _budget_lines(
    trials: list[FrozenTrial], finished: list[FrozenTrial], n_trials: int | None
) -> list[str]:
    """Trials by state, the budget used, and the confirmation round's progress."""
    order = (*_FINISHED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
    counts = {s: sum(t.state == s for t in trials) for s in order}
    lines = ["trials: " + ", ".join(f"{counts[s]} {s.name.lower()}" for s in order)]
    if n_trials is not None:
        lines.append(f"budget: {len(finished)} of {n_trials} trials done (complete or pruned)")
    confirming = [t for t in trials if is_confirmation(t)]
    if confirming:
        done = sum(t.state in _FINISHED for t in confirming)
        lines.append(
            f"confirmation round: {done} of {len(confirming)} trial(s) done (trials "
            + ", ".join(str(t.user_attrs[CONFIRM_ATTR]) for t in confirming)
            + " again on fresh folds)"
        )
    return lines


def _result_lines(study: optuna.Study) -> list[str]:
    """The search's best trial, the baselines (what the search must beat), the last selection."""
    pool = Pool.of(study)
    if not pool.search:
        return ["best: no completed trial yet"]
    lines = [f"best: {_trial_line(pool.best())}"]
    for t in pool.search:
        if baseline_of(t) is not None:
            lines.append(f"baseline {baseline_of(t)}: {_trial_line(t)}")
    return lines + _selected(study)


def _running_lines(
    running: list[FrozenTrial], elapsed: dict[int, float], heartbeats: dict[int, float]
) -> list[str]:
    if not running:
        return ["running: none"]
    rows = []
    for t in running:
        beat = heartbeats.get(t.number)
        rows.append(
            [
                str(t.number),
                f"{t.datetime_start:%Y-%m-%d %H:%M:%S}" if t.datetime_start else "-",
                _fmt_seconds(elapsed[t.number]),
                f"{_fmt_seconds(beat)} ago" if beat is not None else "-",
                str(len(t.intermediate_values)),
                format_params(t.params),
            ]
        )
    header = ["trial", "started", "running", "heartbeat", "steps reported", "params"]
    return [f"running ({len(running)}):", *("  " + line for line in _table(header, rows))]


def _eta_line(
    finished: list[FrozenTrial],
    running: list[FrozenTrial],
    elapsed: dict[int, float],
    n_trials: int | None,
    now: dt.datetime,
) -> str:
    """(mean trial time × trials left − time the running ones spent) ÷ the running workers."""
    durations = [d for d in map(_duration, finished) if d is not None]
    if n_trials is None:
        return "ETA: no trial budget (n_trials unset); workers stop at their timeout"
    if len(finished) >= n_trials:
        return "ETA: the budget is used; the study is done"
    if not durations:
        return "ETA: unknown until a trial finishes"
    mean = statistics.fmean(durations)
    remaining = n_trials - len(finished)
    workers = max(1, len(running))
    spent = sum(min(e, mean) for e in elapsed.values())
    eta = max(0.0, mean * remaining - spent) / workers
    # Every term of the estimate, so a reader can check it: (mean × left − spent) ÷ workers.
    terms = (
        f"({_fmt_seconds(mean)} mean of {len(durations)} finished × {remaining} left"
        f" − {_fmt_seconds(spent)} spent by running trials) ÷ {workers} worker(s)"
    )
    if running:
        done_at = now + dt.timedelta(seconds=eta)
        return f"ETA: {terms} ≈ {_fmt_seconds(eta)}, done near {done_at:%H:%M}"
    return f"ETA: {terms} ≈ {_fmt_seconds(eta)} (no worker is running now)"


def study_status(
    storage_url: str | None = None,
    study_name: str | None = None,
    *,
    study_file: str | Path | None = None,
) -> str:
    """:func:`status_table` of a study, with its heartbeats; one clear error if it is missing.

    The study is the one :func:`~tlsearch.storage.find_study` finds: the named one (else the
    storage's only one) in ``storage_url``, else the study file's, else ``./tlsearch.db``'s.
    """
    study, url = find_study(study_file, storage_url, study_name)
    return status_table(
        study,
        heartbeats=heartbeat_ages(url, study.study_name),
        storage_label=mask_url(url),
    )
