"""Study storage: Optuna's ``RDBStorage`` made safe for many workers, and masked URLs.

What :class:`StudyStorage` adds to ``RDBStorage``, and why:

- **An exact trial budget.** :meth:`StudyStorage.set_budget` makes the storage refuse (with
  :class:`BudgetExhausted`) to create a trial once the study holds ``n_trials`` trials that are
  COMPLETE, PRUNED, RUNNING or WAITING. The check runs in the transaction that creates the trial,
  after Optuna has locked the study row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite runs one
  write transaction at a time), so no two workers can both take the last slot. A trial that fails
  frees its slot; a RUNNING trial whose worker died frees it when the heartbeat marks it failed.
- **One confirmation trial per candidate.** The confirmation round's trials (user attribute
  ``confirm_of``) are outside the budget; in the same transaction the storage refuses (with
  :class:`AlreadyQueued`) a second one for a candidate that has one not failed, so workers that
  queue the round at the same moment queue it once.
- **Heartbeats from birth.** Optuna starts a trial's heartbeat only when the objective starts, so a
  worker killed just after creating a trial leaves a RUNNING trial no heartbeat check ever fails.
  Here a trial gets its first heartbeat in the transaction that creates (or dequeues) it, and a
  heartbeat that cannot be written (database restarting) is logged and retried at the next beat
  instead of silently ending the heartbeat thread.
- **SQLite for several processes on one host.** Write-ahead logging (readers such as
  optuna-dashboard never block the workers; ``synchronous=NORMAL``, durable up to a power loss), a
  60 s busy timeout, and ``BEGIN IMMEDIATE`` for every transaction: Python's sqlite3 otherwise
  starts a transaction only at the first write, so a read-then-write (counting the budget,
  dequeuing a WAITING trial) is not atomic and two workers could take the same slot.
- **PostgreSQL across hosts.** ``pool_pre_ping`` replaces connections a server restart or
  ``pg_terminate_backend`` dropped, and a connect timeout makes an unreachable server an error, not
  a hang.

Passwords come from the URL or ``$TLSEARCH_DB_PASSWORD`` and never leave this module in clear: use
:func:`mask_url` for anything shown to a person.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning, StorageInternalError
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url

from tlsearch.errors import ConfigError, StorageError

__all__ = [
    "CONFIRM_ATTR",
    "is_confirmation",
    "COUNTED_STATES",
    "AlreadyQueued",
    "STORAGE_ERRORS",
    "BudgetExhausted",
    "Heartbeat",
    "StudyStorage",
    "check_url",
    "create_storage",
    "describe_error",
    "mask_url",
    "sqlite_file_missing",
    "storage_error",
    "storage_location",
    "without_password",
]

_log = logging.getLogger(__name__)

_KNOWN = ("sqlite", "postgresql", "mysql")
# Seconds a SQLite writer waits for a lock before giving up.
SQLITE_BUSY_TIMEOUT = 60
# Seconds to wait for a PostgreSQL/MySQL server to accept a connection.
CONNECT_TIMEOUT = 10
# Trials that hold a slot of the budget: finished ones, and those running or queued to run.
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# What a dropped connection or a restarting server raises through Optuna.
STORAGE_ERRORS = (StorageInternalError, sqlalchemy.exc.SQLAlchemyError)


class BudgetExhausted(Exception):
    """Raised by :meth:`StudyStorage.create_new_trial` when the study's budget is taken."""


class AlreadyQueued(Exception):
    """Raised by :meth:`StudyStorage.create_new_trial` for a confirmation trial whose candidate
    has one already (queued, running or finished)."""


# User attribute of the confirmation round's trials (tlsearch.confirmation): the number of the
# search trial each trains again on fresh folds. They sit outside the budget, one per candidate.
CONFIRM_ATTR = "confirm_of"


def is_confirmation(trial: FrozenTrial | optuna.Trial) -> bool:
    """Whether the trial is one of the confirmation round's (scored on fresh folds)."""
    return trial.user_attrs.get(CONFIRM_ATTR) is not None


def _confirmation_ids() -> sqlalchemy.Select:
    ua = models.TrialUserAttributeModel
    return sqlalchemy.select(ua.trial_id).where(ua.key == CONFIRM_ATTR)


def _confirmation_of(session: Any, study_id: int, number: int) -> int | None:
    """The id of a trial of the study that confirms trial ``number`` and has not failed."""
    ua, trial = models.TrialUserAttributeModel, models.TrialModel
    return (
        session.query(trial.trial_id)
        .join(ua, ua.trial_id == trial.trial_id)
        .filter(
            trial.study_id == study_id,
            trial.state != TrialState.FAIL,
            ua.key == CONFIRM_ATTR,
            ua.value_json == json.dumps(number),
        )
        .limit(1)
        .scalar()
    )


@dataclass(frozen=True)
class Heartbeat:
    """How a dead worker is noticed, stored with the study so every worker uses the same values."""

    # Seconds between two heartbeats of a running trial.
    interval: int = 10
    # Seconds without a heartbeat after which any worker marks the trial failed; several intervals,
    # so a worker that is busy (a long CUDA call, a slow database) is not declared dead.
    grace_period: int = 60
    # How often one trial is queued again after its worker died or was stopped.
    max_retry: int = 3

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"heartbeat interval: must be at least 1 s, got {self.interval}")
        if self.grace_period <= self.interval:
            raise ConfigError(
                f"grace period: {self.grace_period} s must be longer than the heartbeat interval "
                f"({self.interval} s), or live trials would be failed"
            )
        if self.max_retry < 0:
            raise ConfigError(f"max retry: must be >= 0, got {self.max_retry}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Heartbeat:
        data = data or {}
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


class _Requeue(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback, plus a log line, and no retry when the budget's slot is taken."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        tries = len(trial.system_attrs.get("retry_history", [])) + 1
        if self._max_retry is not None and tries > self._max_retry:
            _log.warning(
                "trial %d failed without finishing; not queued again (retried %d times already)",
                trial.number,
                tries - 1,
            )
            return
        try:
            super().__call__(study, trial)
        except BudgetExhausted:
            _log.info(
                "trial %d failed without finishing; its slot is taken by a newer trial",
                trial.number,
            )
            return
        _log.warning(
            "trial %d failed without finishing; queued again with its parameters", trial.number
        )


class StudyStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` with an exact per-study trial budget and heartbeats from a trial's birth.

    Invariant: after :meth:`set_budget` ``(study_id, n)``, no trial is created (new, enqueued or
    retried) while the study holds ``n`` or more trials in :data:`COUNTED_STATES`. Moving a trial
    between counted states, or from one to FAIL, never adds to that count, so the number of
    COMPLETE and PRUNED trials never exceeds ``n``, whatever the number of workers.
    """

    def __init__(
        self, url: str, engine_kwargs: dict[str, Any], heartbeat: Heartbeat | None
    ) -> None:
        with warnings.catch_warnings():
            # Heartbeats are "experimental" in Optuna 5; the API is stable enough for us.
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(url, engine_kwargs=engine_kwargs)
        self._budgets: dict[int, int] = {}
        self._beat_failing = False
        if heartbeat is not None:
            self.enable_heartbeat(heartbeat)

    def enable_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Record heartbeats of running trials; fail and re-queue those of silent workers."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            retry = _Requeue(max_retry=heartbeat.max_retry)
        self.heartbeat_interval = heartbeat.interval
        self.grace_period = heartbeat.grace_period
        self.heartbeat_stale_trial_callback = retry
        self.failed_trial_callback = retry

    def requeue(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        """The callback that queues a failed trial again (None without heartbeats)."""
        return self.heartbeat_stale_trial_callback

    def set_budget(self, study_id: int, n_trials: int | None) -> None:
        """Refuse new trials of ``study_id`` beyond ``n_trials`` counted ones (None: no limit)."""
        if n_trials is None:
            self._budgets.pop(study_id, None)
        else:
            self._budgets[study_id] = n_trials

    def count_states(
        self, study_id: int, confirmations: bool | None = None
    ) -> dict[TrialState, int]:
        """Trials of the study per state, in one query: all of them, only the confirmation
        round's (``confirmations=True``) or only the search's (``False``)."""
        query = (
            sqlalchemy.select(models.TrialModel.state, sqlalchemy.func.count())
            .where(models.TrialModel.study_id == study_id)
            .group_by(models.TrialModel.state)
        )
        if confirmations is not None:
            tagged = models.TrialModel.trial_id.in_(_confirmation_ids())
            query = query.where(tagged if confirmations else ~tagged)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        counts = dict.fromkeys(TrialState, 0)
        counts.update(
            {TrialState[s.name] if hasattr(s, "name") else TrialState[s]: n for s, n in rows}
        )
        return counts

    def _get_prepared_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None, session: Any
    ) -> models.TrialModel:
        # Called by RDBStorage.create_new_trial inside its transaction, after the study row lock.
        confirms = None if template_trial is None else template_trial.user_attrs.get(CONFIRM_ATTR)
        if confirms is not None:
            # The confirmation round's trials: one per candidate, whoever queues it.
            if _confirmation_of(session, study_id, confirms) is not None:
                raise AlreadyQueued(f"trial {confirms} is confirmed by a trial already")
        budget = self._budgets.get(study_id)
        counted = template_trial is None or template_trial.state in COUNTED_STATES
        if budget is not None and counted and confirms is None:
            taken = (
                session.query(sqlalchemy.func.count(models.TrialModel.trial_id))
                .filter(
                    models.TrialModel.study_id == study_id,
                    models.TrialModel.state.in_(COUNTED_STATES),
                    models.TrialModel.trial_id.notin_(_confirmation_ids()),
                )
                .scalar()
            )
            if taken >= budget:
                raise BudgetExhausted(
                    f"{taken} of {budget} trials are finished, running or queued"
                )
        trial = super()._get_prepared_new_trial(study_id, template_trial, session)
        if self.heartbeat_interval is not None and trial.state == TrialState.RUNNING:
            session.add(models.TrialHeartbeatModel(trial_id=trial.trial_id))
        return trial

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state == TrialState.RUNNING and self.heartbeat_interval is not None:
            # A dequeued trial: beat now, before the objective's heartbeat thread starts.
            self.record_heartbeat(trial_id)
        return changed

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except STORAGE_ERRORS as e:
            # Runs in Optuna's heartbeat thread: an exception would end it for the whole trial.
            if not self._beat_failing:
                _log.warning(
                    "heartbeat of trial id %d not recorded (%s); retrying",
                    trial_id,
                    describe_error(e),
                )
            self._beat_failing = True
        else:
            if self._beat_failing:
                _log.info("heartbeats recorded again")
            self._beat_failing = False


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (unparseable URLs are not echoed at all)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse might still hold a secret
        return "<unparseable storage URL>"


def without_password(url: str) -> str:
    """The URL with no password at all: for a worker that reads it from the environment."""
    try:
        u = make_url(url)
        bare = URL.create(u.drivername, u.username, None, u.host, u.port, u.database, u.query)
        return bare.render_as_string(hide_password=False)
    except Exception:  # noqa: BLE001 - as in mask_url
        return mask_url(url)


def describe_error(e: BaseException) -> str:
    """The first line of the database driver's message (never the SQL or the parameters)."""
    while isinstance(e, StorageInternalError) and e.__cause__ is not None:
        e = e.__cause__
    inner = getattr(e, "orig", None) or e
    lines = str(inner).strip().splitlines()
    return lines[0].strip() if lines else type(inner).__name__


def storage_error(url: str, e: BaseException, what: str = "failed") -> StorageError:
    """One line a person can act on, for a database error on ``url`` (password masked)."""
    return StorageError(f"storage {mask_url(url)}: {what}: {describe_error(e)}")


def _engine_kwargs(url: str) -> dict[str, Any]:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    if backend == "postgresql":
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    return {"pool_pre_ping": True}


def _tune_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """WAL and ``BEGIN IMMEDIATE`` on every connection (see the module docstring for why)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event start transactions instead of the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sqlalchemy.engine.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    # Connections made while Optuna created the tables predate the listeners.
    engine.dispose()


def check_url(url: str) -> str:
    """``url`` checked (scheme, SQLite directory) without connecting, with the password from
    ``$TLSEARCH_DB_PASSWORD`` added when the URL has none; a :class:`ConfigError` if it is bad."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        raise ConfigError(f"storage: not a database URL: {mask_url(url)}") from None
    backend = parsed.get_backend_name()
    if backend not in _KNOWN:
        raise ConfigError(
            f"storage: unknown scheme '{parsed.drivername}' in {mask_url(url)} "
            "(use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)"
        )
    if backend == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise ConfigError(
                "storage: an in-memory SQLite database cannot be shared; name a file"
            )
        try:
            parent = Path(db).expanduser().resolve().parent
        except (RuntimeError, ValueError) as e:  # "~user" unknown on this host; a NUL byte
            raise ConfigError(f"storage: not a usable file path in {mask_url(url)}: {e}") from None
        if not parent.is_dir():
            raise ConfigError(f"storage: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"storage: directory {parent} is not writable")
    # A password can come from the environment instead of the URL, so it never lands in a file.
    password = os.environ.get("TLSEARCH_DB_PASSWORD")
    if password and backend != "sqlite" and parsed.password is None:
        url = parsed.set(password=password).render_as_string(hide_password=False)
    return url


def sqlite_file_missing(url: str) -> bool:
    """Whether ``url`` (checked by :func:`check_url`) names a SQLite file that does not exist:
    what reads an existing study reports it instead of creating an empty database there."""
    parsed = make_url(check_url(url))
    return parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file()


def storage_location(url: str) -> str:
    """Where a study lives, for a person: a SQLite file's absolute path (a relative URL is relative
    to the current directory, as in SQLAlchemy), else the URL with its password masked."""
    parsed = make_url(check_url(url))
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return str(Path(parsed.database).expanduser().resolve())
    return mask_url(url)


def create_storage(url: str, heartbeat: Heartbeat | None = None) -> StudyStorage:
    """Open (and create the tables of) the storage at ``url``; one clear error if it fails.

    Args:
        url: ``sqlite:///FILE`` or ``postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DB``.
        heartbeat: enable heartbeats (and re-queueing of trials whose worker died) with these
            settings; None leaves them off until :meth:`StudyStorage.enable_heartbeat`.
    """
    url = check_url(url)
    try:
        storage = StudyStorage(url, _engine_kwargs(url), heartbeat)
    except (*STORAGE_ERRORS, OSError, ImportError) as e:
        raise storage_error(url, e, "cannot open") from e
    if storage.engine.dialect.name == "sqlite":
        _tune_sqlite(storage.engine)
    return storage
