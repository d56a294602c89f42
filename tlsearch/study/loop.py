"""The trial loop every process runs, alone or as one of many workers (:func:`run_trials`).

1. ask the storage for a trial; it refuses once the budget is taken (:class:`~tlsearch.storage.
   StudyStorage`), so the workers together run exactly ``n_trials``;
2. run it under ``study.optimize``, which keeps its heartbeat and fails and re-queues trials of
   dead workers;
3. when the budget is taken but not finished, wait for the trials other workers still run: one of
   them may fail and free its slot, or die and come back as a queued retry;
4. settle a trial that a signal or a storage outage interrupted: a finished result is written
   again, an unfinished trial is failed and queued again with its parameters; storage errors are
   retried for ``patience`` seconds, then end the loop with one
   :class:`~tlsearch.errors.StorageError`;
5. once the budget is finished, queue the confirmation round (``select.confirm``: the top
   configurations and plain fine-tuning trained again on fresh folds, :mod:`tlsearch.selection`)
   and run its trials like any other: the storage queues each candidate's once, whichever worker
   asks, and a resumed study finds them done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlsearch.config import StudyConfig
from tlsearch.confirmation import queue_confirmation, round_finished
from tlsearch.storage import (
    STORAGE_ERRORS,
    BudgetExhausted,
    StudyStorage,
    describe_error,
    storage_error,
)
from tlsearch.study import setup
from tlsearch.study.progress import ProgressPrinter
from tlsearch.study.stop import Interrupted, StopFlag
from tlsearch.threads import thread_scope

__all__ = [
    "STORAGE_PATIENCE",
    "run_study",
    "run_trials",
]

_log = logging.getLogger(__name__)

# Seconds a trial loop keeps retrying a storage that fails (a PostgreSQL restart takes a few).
STORAGE_PATIENCE = 120.0


class _Guard:
    """The objective, plus what the loop needs to settle a trial that did not end normally."""

    def __init__(
        self, objective: Callable[[optuna.Trial], float], stop: StopFlag, attrs: Mapping[str, Any]
    ) -> None:
        self.objective = objective
        self.stop = stop
        self.attrs = dict(attrs)
        self.number: int | None = None
        self.outcome: tuple[TrialState, float | None] | None = None
        self.told = True
        # The objective's update of its trial was refused: another worker finished it.
        self.refused = False
        # Optuna's verbosity while it reports a trial the loop handles itself (None: not muted).
        self._verbosity: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.number, self.outcome, self.told, self.refused = trial.number, None, False, False
        try:
            # The worker's attributes are the trial's first writes: a storage error here is the
            # loop's to handle, as one in the objective is.
            for key, value in self.attrs.items():
                trial.set_user_attr(key, value)
            if self.stop.requested:
                raise Interrupted("stop requested before the trial started")
            self.stop.in_trial = True
            value = self.objective(trial)
        except optuna.TrialPruned:
            self.outcome = (TrialState.PRUNED, None)
            raise
        except BaseException as e:
            self.refused = _find_cause(e, _is_update_refused) is not None
            if _find_cause(e, _is_handled) is not None:
                self._mute()
            raise
        finally:
            self.stop.in_trial = False
        self.outcome = (TrialState.COMPLETE, value)
        return value

    def _mute(self) -> None:
        """A signal, the storage or another worker ended the trial: the loop settles it and logs
        one line, so Optuna's report of the failure (a traceback, "failed with value") is not
        shown. Optuna logs it after the objective raises; :meth:`unmute` once it has."""
        self._verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)

    def unmute(self) -> None:
        if self._verbosity is not None:
            optuna.logging.set_verbosity(self._verbosity)
            self._verbosity = None


def _find_cause(e: BaseException, match: Callable[[BaseException], bool]) -> BaseException | None:
    """``e`` or the first exception of its chain that ``match`` accepts.

    Optuna may raise another error while handling the one that matters: an ``AssertionError``
    ("Should not reach") when a trial's final ``tell`` fails on a dropped connection.
    """
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None or match(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _is_storage_error(e: BaseException) -> bool:
    return isinstance(e, STORAGE_ERRORS)


def _is_update_refused(e: BaseException) -> bool:
    """Optuna refused to update this process's trial: someone else finished it meanwhile."""
    return isinstance(e, optuna.exceptions.UpdateFinishedTrialError)


def _is_handled(e: BaseException) -> bool:
    """An error in the objective that :func:`run_trials` handles itself (the trial is settled,
    the loop goes on)."""
    return isinstance(e, KeyboardInterrupt) or _is_storage_error(e) or _is_update_refused(e)


def _retried(study: optuna.Study, number: int) -> bool:
    return any(
        number in t.system_attrs.get("retry_history", ()) for t in study.get_trials(deepcopy=False)
    )


def _settle(study: optuna.Study, storage: StudyStorage, guard: _Guard) -> None:
    """Bring this process's last trial to an end state if Optuna could not (see the module doc)."""
    if guard.number is None or guard.told:
        return
    number = guard.number
    study_id = storage.get_study_id_from_name(study.study_name)
    trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
    if trial.state == TrialState.RUNNING and guard.outcome is not None:
        state, value = guard.outcome
        study.tell(number, value, state=state, skip_if_finished=True)
        _log.info("trial %d: its result is stored now", number)
    elif trial.state in (TrialState.RUNNING, TrialState.FAIL):
        if trial.state == TrialState.RUNNING:
            try:
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        requeue = storage.requeue()
        if requeue is not None and not _retried(study, number):
            requeue(study, storage.get_trial(trial._trial_id))
    guard.told = True


def _settle_or_leave(study: optuna.Study, storage: StudyStorage, guard: _Guard) -> None:
    try:
        _settle(study, storage, guard)
    except STORAGE_ERRORS as e:
        _log.warning(
            "trial %s left RUNNING (storage unreachable: %s); another worker fails and retries it "
            "after the grace period",
            guard.number,
            describe_error(e),
        )


def run_trials(
    study: optuna.Study,
    storage: StudyStorage,
    objective: Callable[[optuna.Trial], float],
    *,
    n_trials: int | None,
    max_trials: int | None = None,
    timeout: float | None = None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    stop: StopFlag | None = None,
    attrs: Mapping[str, Any] | None = None,
    patience: float = STORAGE_PATIENCE,
    confirm: Callable[[optuna.Study], int] | None = None,
) -> int:
    """Run trials in this process until the study's budget is finished, then the confirmation
    round's trials; return how many ran here.

    Args:
        n_trials: the study's total budget (all workers together); None runs until ``timeout``.
        max_trials: at most this many trials in this process.
        timeout: start no trial after this many seconds.
        stop: set by a signal handler to end the loop (see :class:`StopFlag`); without one, a
            ``KeyboardInterrupt`` settles the running trial and propagates.
        attrs: user attributes written on every trial this process runs (worker, device).
        patience: seconds of failing storage calls before giving up with a ``StorageError``.
        confirm: once the budget is finished, queues the confirmation round's trials not queued
            yet and returns how many the round has (:func:`queue_confirmation`).
    """
    stop = stop or StopFlag()
    guard = _Guard(objective, stop, attrs or {})
    deadline = None if timeout is None else time.monotonic() + timeout
    loop = _Loop(study, storage, guard, n_trials, confirm, patience)
    loop.callbacks = [*callbacks, loop.after_trial]
    stop.in_loop = True
    try:
        while loop.go_on(max_trials, deadline):
            pass
    finally:
        stop.in_loop = False
    return loop.ran


class _Loop:
    """What :func:`run_trials` keeps between tries: the trials run here, the budget's state once
    it is taken, and how long the storage has been failing."""

    def __init__(
        self,
        study: optuna.Study,
        storage: StudyStorage,
        guard: _Guard,
        n_trials: int | None,
        confirm: Callable[[optuna.Study], int] | None,
        patience: float,
    ) -> None:
        self.study, self.storage, self.guard = study, storage, guard
        self.study_id = storage.get_study_id_from_name(study.study_name)
        storage.set_budget(self.study_id, n_trials)
        self.n_trials = n_trials
        self.confirm = confirm
        self.patience = patience
        self.callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [self.after_trial]
        self.ran = 0
        self.exhausted = False
        self.failing_since: float | None = None
        self.waiting = False

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback once a trial of this process is stored."""
        self.ran += 1
        self.guard.told = True
        if self.guard.stop.requested:
            study.stop()

    def go_on(self, max_trials: int | None, deadline: float | None) -> bool:
        """One try at running trials (steps 1-5 of the module doc); False once the loop ends."""
        left = None if max_trials is None else max_trials - self.ran
        seconds = None if deadline is None else deadline - time.monotonic()
        if self.guard.stop.requested or (left is not None and left <= 0):
            return False
        if seconds is not None and seconds <= 0:
            return False
        try:
            return self._run(left, seconds)
        except BudgetExhausted:
            self.failing_since = None
            self.exhausted = True
        except KeyboardInterrupt as e:
            _settle_or_leave(self.study, self.storage, self.guard)
            if isinstance(e, Interrupted):
                return False
            raise
        except Exception as e:
            self.recover(e)  # 4) or raises
        finally:
            self.guard.unmute()
        return True

    def _run(self, left: int | None, seconds: float | None) -> bool:
        if self.exhausted:
            # 3) and 5), counted inside the caller's try: a storage outage here (a server
            # restart near a study's end) is retried like any other.
            state = self.after_budget()
            if state == "wait":
                # At most a second: a worker whose budget is taken sees the last trial end
                # promptly (a heartbeat's 10 s here kept `run --workers` waiting that long).
                time.sleep(min(1.0, self.storage.heartbeat_interval or 1))
            if state != "run":
                return state == "wait"
            self.exhausted = False
        _settle(self.study, self.storage, self.guard)  # 4) a trial a signal or the storage ended
        self.study.optimize(  # 1) 2)
            self.guard, n_trials=left, timeout=seconds, callbacks=self.callbacks
        )
        return False

    def after_budget(self) -> str:
        """The budget is taken: "done" (finished, and the confirmation round too), "wait" (held
        by trials running elsewhere: one may fail and free its slot, or die and come back as a
        queued retry) or "run" (queued trials, or a freed slot)."""
        assert self.n_trials is not None, "only a budget raises BudgetExhausted"
        counts = self.storage.count_states(self.study_id, confirmations=False)
        if counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] >= self.n_trials:
            # 5) the search is finished: the confirmation round, if any, queued once by
            # whichever worker gets here first and run by all of them.
            queued = self.confirm(self.study) if self.confirm is not None else 0
            counts = self.storage.count_states(self.study_id, confirmations=True)
            if counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] >= queued:
                return "done"
        if counts[TrialState.RUNNING] and not counts[TrialState.WAITING]:
            if not self.waiting:
                _log.info(
                    "%d trial(s) still running elsewhere; waiting for them (a dead worker's trial "
                    "is retried %d s after its last heartbeat)",
                    counts[TrialState.RUNNING],
                    self.storage.grace_period or 0,
                )
            self.waiting = True
            self.failing_since = None
            return "wait"
        return "run"

    def recover(self, e: Exception) -> None:
        """Go on after ``e`` where the loop can: a storage error within ``patience`` seconds
        (after a pause), or a trial another worker failed while it ran here; else raise."""
        cause = _find_cause(e, _is_storage_error)
        if cause is not None:
            now = time.monotonic()
            self.failing_since = self.failing_since or now
            if now - self.failing_since > self.patience:
                _settle_or_leave(self.study, self.storage, self.guard)
                raise storage_error(
                    self.storage.url, cause, f"failing for {self.patience:.0f} s"
                ) from e
            pause = min(10.0, 1.0 + now - self.failing_since)
            _log.warning("storage error (%s); retrying in %.0f s", describe_error(cause), pause)
            time.sleep(pause)
            return
        if not self._taken_over(e):
            raise e
        # Another worker failed our trial while it ran (it saw no heartbeat within the grace
        # period); the retry it queued, or the one _settle queues, runs instead.
        _log.warning(
            "trial %d was failed by another worker while it ran here (no heartbeat within the "
            "grace period?); it is retried",
            self.guard.number,
        )

    def _taken_over(self, e: Exception) -> bool:
        """Whether another worker finished this process's trial while it ran: Optuna refused an
        update of it, or refused to store how it ended (a ``ValueError`` from ``tell``, after the
        objective returned or was refused an update) because the storage holds it failed."""
        guard, number = self.guard, self.guard.number
        if number is None:
            return False
        if _find_cause(e, _is_update_refused) is not None:
            return True
        ended = guard.outcome is not None or guard.refused
        if not ended or guard.told or not isinstance(e, ValueError):
            return False
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self.storage.get_trial(trial_id).state == TrialState.FAIL


def run_study(
    cfg: StudyConfig,
    *,
    device: str | None = None,
    allow_config_change: bool = False,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    progress: bool = False,
    heartbeat: Mapping[str, int] | None = None,
    stop: StopFlag | None = None,
) -> optuna.Study:
    """Run (or resume) the study ``cfg`` describes in this process until its budget is used.

    ``cfg.n_trials`` is the study's total: a resumed study runs only the trials still missing, and
    workers started beside it (``tlsearch worker``) share the same budget. A ``KeyboardInterrupt``
    ends the running trial as FAIL, queues it again and propagates; finished trials are kept. With
    a ``stop`` flag (see :func:`tlsearch.study.stop.graceful_stop`) a signal ends the loop instead.
    """
    study, storage, ctx = setup.setup_study(
        cfg, device=device, allow_config_change=allow_config_change, heartbeat=heartbeat
    )
    if round_finished(study, cfg):
        _log.info("study '%s' already has its %d trials", cfg.name, cfg.n_trials)
        return study
    cbs = list(callbacks or [])
    if progress:
        cbs.append(ProgressPrinter(cfg.n_trials))
    started = time.perf_counter()
    # After setup: a study file's mistake leaves no lock file behind (setup pretrains with a
    # policy of its own).
    policy = setup.thread_policy(cfg, cfg.name)
    with thread_scope(policy):
        run_trials(
            study,
            storage,
            setup.threads_per_trial(setup.make_objective(ctx), policy),
            n_trials=cfg.n_trials,
            timeout=cfg.timeout,
            callbacks=cbs,
            stop=stop,
            attrs=setup.worker_attrs(ctx.device),
            confirm=lambda s: queue_confirmation(s, ctx.cfg),
        )
    _log.info("ran for %.1fs", time.perf_counter() - started)
    return study
