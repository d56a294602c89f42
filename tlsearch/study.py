"""The study driver: create or resume a study, pretrain once, run trials within an exact budget.

The study's resolved config, its search hash, the pretrained checkpoint's path and SHA-256 and the
heartbeat settings are stored as study user attributes, so a worker on another host, ``export`` or
``final`` reads them from the storage alone.

:func:`run_trials` is the trial loop every process runs, alone or as one of many workers:

1. ask the storage for a trial; it refuses once the budget is taken (:class:`~tlsearch.storage.
   StudyStorage`), so the workers together run exactly ``n_trials``;
2. run it under ``study.optimize``, which keeps its heartbeat and fails and re-queues trials of
   dead workers;
3. when the budget is taken but not finished, wait for the trials other workers still run: one of
   them may fail and free its slot, or die and come back as a queued retry;
4. settle a trial that a signal or a storage outage interrupted: a finished result is written
   again, an unfinished trial is failed and queued again with its parameters; storage errors are
   retried for ``patience`` seconds, then end the loop with one
   :class:`~tlsearch.errors.StorageError`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from tlsearch import __version__
from tlsearch.config import StudyConfig, config_from_dict
from tlsearch.dashboard import write_study_note
from tlsearch.data import TransferTask, load_task
from tlsearch.device import resolve_device
from tlsearch.errors import ConfigError, StorageError
from tlsearch.objective import KFoldObjective, check_folds
from tlsearch.pretrain import Checkpoint, ensure_pretrained, load_checkpoint
from tlsearch.storage import (
    STORAGE_ERRORS,
    BudgetExhausted,
    Heartbeat,
    StudyStorage,
    check_url,
    create_storage,
    describe_error,
    mask_url,
    sqlite_file_missing,
    storage_error,
)

__all__ = [
    "ATTR_CHECKPOINT",
    "ATTR_CONFIG",
    "ATTR_HEARTBEAT",
    "Interrupted",
    "StopFlag",
    "StudyContext",
    "existing_storage",
    "load_study",
    "load_study_config",
    "make_objective",
    "make_pruner",
    "make_sampler",
    "open_study",
    "prepare",
    "run_study",
    "run_trials",
    "setup_study",
]

_log = logging.getLogger(__name__)

ATTR_CONFIG = "tlsearch_config"
ATTR_HASH = "tlsearch_search_hash"
ATTR_CHECKPOINT = "tlsearch_checkpoint"
ATTR_VERSION = "tlsearch_version"
ATTR_HEARTBEAT = "tlsearch_heartbeat"
# Trials that count toward the budget: those that ran to an end the search can learn from.
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# Seconds a trial loop keeps retrying a storage that fails (a PostgreSQL restart takes a few).
STORAGE_PATIENCE = 120.0


def make_sampler(cfg: StudyConfig, parallel: bool = False) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``parallel`` for one of several workers of the study.

    A parallel worker's sampler is reseeded from the OS (as ``optimize(n_jobs=...)`` does), or
    every worker would propose the same points, and TPE assumes the worst value for trials still
    running (``constant_liar``) so workers do not crowd one region. QMC keeps its seed: its
    sequence is indexed by trial number and must be the same in every worker.
    """
    s = cfg.sampler
    sampler: optuna.samplers.BaseSampler
    if s.name == "random":
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    elif s.name == "gp":
        sampler = optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    elif s.name == "cmaes":
        sampler = optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    elif s.name == "qmc":
        sampler = optuna.samplers.QMCSampler(seed=s.seed)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, constant_liar=parallel
        )
    if parallel:
        sampler.reseed_rng()
    return sampler


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(
            p_threshold=p.p_threshold, n_startup_steps=p.n_warmup_steps
        )
    percentile = 50.0 if p.name == "median" else p.percentile
    return optuna.pruners.PercentilePruner(
        percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
    )


@dataclass
class StudyContext:
    """Everything a process needs to run trials of one study."""

    cfg: StudyConfig
    task: TransferTask
    checkpoint: Checkpoint
    device: torch.device


def prepare(cfg: StudyConfig, device: str | None = None) -> StudyContext:
    """Load the data, check the folds and make sure the pretrained checkpoint exists.

    No storage is touched: this is what ``final`` needs, and the first step of a study.
    """
    dev = resolve_device(device or cfg.finetune.device)
    task = load_task(cfg.data)
    check_folds(cfg, task.target_train)
    checkpoint = ensure_pretrained(cfg, task, dev)
    return StudyContext(cfg, task, checkpoint, dev)


def load_study_config(study: optuna.Study) -> StudyConfig:
    """The config a study was created with, from its user attributes."""
    raw = study.user_attrs.get(ATTR_CONFIG)
    if raw is None:
        raise StorageError(f"study '{study.study_name}' was not created by tlsearch (no config)")
    return config_from_dict(raw, f"study '{study.study_name}'")


def load_study(
    storage: StudyStorage,
    url: str,
    study_name: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Load an existing study; one clear error naming the studies there when it does not exist."""
    try:
        return optuna.load_study(
            study_name=study_name, storage=storage, sampler=sampler, pruner=pruner
        )
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StorageError(
            f"no study '{study_name}' in {mask_url(url)}"
            + (f" (studies there: {', '.join(names)})" if names else " (it holds no study)")
        ) from None


def existing_storage(storage_url: str, study_name: str) -> StudyStorage:
    """The storage of an existing study (``open_study``, workers).

    A SQLite file that does not exist is reported, not created: a typo in the path would
    otherwise leave an empty database behind.
    """
    if sqlite_file_missing(storage_url):
        raise StorageError(
            f"no study '{study_name}' in {mask_url(storage_url)} (it holds no study)"
        )
    return create_storage(storage_url)


def open_study(storage_url: str, study_name: str) -> optuna.Study:
    """Load an existing study; one clear error when it does not exist."""
    return load_study(existing_storage(storage_url, study_name), storage_url, study_name)


def _create_or_resume(
    cfg: StudyConfig,
    storage: optuna.storages.BaseStorage,
    allow_config_change: bool,
    heartbeat: Mapping[str, int] | None,
) -> tuple[optuna.Study, Heartbeat]:
    try:
        existing = optuna.load_study(study_name=cfg.name, storage=storage)
    except KeyError:
        existing = None
    stored = None
    if existing is not None:
        old = existing.user_attrs.get(ATTR_HASH)
        if old is not None and old != cfg.search_hash() and not allow_config_change:
            raise ConfigError(
                f"name: study '{cfg.name}' already exists with a different config; "
                "choose another --study-name, or pass --allow-config-change to mix them"
            )
        stored = existing.user_attrs.get(ATTR_HEARTBEAT)
    # Checked before a new study exists: bad heartbeat flags must not leave a study behind.
    beat = replace(Heartbeat.from_dict(stored), **(heartbeat or {}))
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.name,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        direction="maximize",
        load_if_exists=True,
    )
    return study, beat


def _record(study: optuna.Study, ctx: StudyContext, heartbeat: Heartbeat) -> None:
    before = (study.user_attrs.get(ATTR_CHECKPOINT) or {}).get("sha256")
    if before not in (None, ctx.checkpoint.sha256) and count_budget(study):
        _log.warning(
            "the study's finished trials started from checkpoint %s…, this run from %s… "
            "(pretrained again with other data, torch or device?)",
            before[:12],
            ctx.checkpoint.sha256[:12],
        )
    config = ctx.cfg.to_dict()
    # The study is visible to anyone who can read it (the dashboard): never store a password.
    config["storage"] = mask_url(config["storage"])
    study.set_user_attr(ATTR_CONFIG, config)
    study.set_user_attr(ATTR_HASH, ctx.cfg.search_hash())
    study.set_user_attr(
        ATTR_CHECKPOINT,
        {
            "path": str(ctx.checkpoint.path),
            "sha256": ctx.checkpoint.sha256,
            "key": ctx.checkpoint.key,
        },
    )
    study.set_user_attr(ATTR_HEARTBEAT, heartbeat.to_dict())
    study.set_user_attr(ATTR_VERSION, __version__)
    study.set_user_attr("task", ctx.task.description)
    # The markdown note optuna-dashboard shows beside the study: data, model, penalty, space, CV.
    write_study_note(study, ctx.cfg, ctx.task.description)


def setup_study(
    cfg: StudyConfig,
    *,
    device: str | None = None,
    allow_config_change: bool = False,
    heartbeat: Mapping[str, int] | None = None,
) -> tuple[optuna.Study, StudyStorage, StudyContext]:
    """Create or resume the study, pretrain its checkpoint once and record both in the storage.

    After this, workers anywhere need only the storage URL and the study name
    (``tlsearch worker``).

    Args:
        heartbeat: overrides of the study's :class:`~tlsearch.storage.Heartbeat` fields (those
            stored with the study, else the defaults), e.g. ``{"grace_period": 120}``.
    """
    check_url(cfg.storage)  # a bad URL or an unwritable directory costs no pretraining
    ctx = prepare(cfg, device)
    storage = create_storage(cfg.storage)
    study, beat = _create_or_resume(cfg, storage, allow_config_change, heartbeat)
    storage.enable_heartbeat(beat)
    _record(study, ctx, beat)
    return study, storage, ctx


def make_objective(ctx: StudyContext) -> KFoldObjective:
    """The k-fold objective of the study, on the context's device."""
    return KFoldObjective(
        ctx.cfg,
        ctx.task.target_train,
        load_checkpoint(ctx.checkpoint, ctx.device),
        ctx.task.input_shape,
        ctx.task.target_classes,
        ctx.device,
    )


def count_budget(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=BUDGET_STATES))


def _fmt_params(params: dict[str, Any]) -> str:
    out = []
    for k, v in params.items():
        out.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(out)


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
            what = f"cv {trial.value:.3f}±{trial.user_attrs.get('cv_std', 0.0):.3f}"
        elif trial.state == TrialState.PRUNED:
            reason = trial.user_attrs.get("fail_reason")
            folds = trial.user_attrs.get("pruned_after_folds")
            what = f"pruned ({reason})" if reason else f"pruned after {folds} fold(s)"
        else:
            what = trial.state.name.lower()
        line = f"{self.prefix}[{done}{of}] trial {trial.number}: {what}"
        try:
            best = study.best_trial
            line += f" | best {best.value:.3f} (#{best.number}: {_fmt_params(best.params)})"
        except ValueError:
            pass
        print(line, file=self.stream, flush=True)


def summary_table(study: optuna.Study, top: int = 5) -> str:
    """A short text table: trial counts by state and the best trials."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    lines = [
        f"study '{study.study_name}': " + ", ".join(f"{n} {k}" for k, n in counts.items() if n),
    ]
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -(t.value or 0.0)
    )[:top]
    if not done:
        return "\n".join(lines + ["no completed trial yet"])
    names = sorted({k for t in done for k in t.params})
    header = ["trial", "cv_mean", "cv_std", *names, "seconds"]
    rows = [
        [
            str(t.number),
            f"{t.value:.4f}",
            f"{t.user_attrs.get('cv_std', math.nan):.4f}",
            *(_fmt_value(t.params.get(n)) for n in names),
            f"{t.user_attrs.get('seconds', math.nan):.1f}",
        ]
        for t in done
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class StopFlag:
    """A stop asked for from outside (a signal): the trial loop ends at its next safe point.

    ``in_loop`` is true while :func:`run_trials` runs and ``in_trial`` while the objective runs. A
    signal handler raises :class:`Interrupted` in a trial (which then fails and is queued again) or
    outside the loop (loading data, pretraining), and otherwise only sets ``signum``, so Optuna's
    storage bookkeeping between trials is never cut in half.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_loop = False
        self.in_trial = False

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Interrupted(KeyboardInterrupt):
    """Raised in a running trial when a stop was asked for: the trial fails, is queued again."""


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

    def __call__(self, trial: optuna.Trial) -> float:
        self.number, self.outcome, self.told = trial.number, None, False
        for key, value in self.attrs.items():
            trial.set_user_attr(key, value)
        if self.stop.requested:
            raise Interrupted("stop requested before the trial started")
        self.stop.in_trial = True
        try:
            value = self.objective(trial)
        except optuna.TrialPruned:
            self.outcome = (TrialState.PRUNED, None)
            raise
        finally:
            self.stop.in_trial = False
        self.outcome = (TrialState.COMPLETE, value)
        return value


class _QuietFailures(logging.Filter):
    """Drop Optuna's traceback for trials that a signal, the storage or another worker ended; the
    loop logs one line for each."""

    _optuna_logger = logging.getLogger("optuna.study._optimize")

    def __init__(self) -> None:
        super().__init__()
        self._quiet: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        trial = " ".join(message.split()[:2])  # "Trial 12"
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _find_cause(exc, _is_handled) is not None:
            self._quiet.add(trial)
            return False
        return not (trial in self._quiet and "failed with value" in message)

    def attach(self) -> None:
        self._optuna_logger.addFilter(self)

    def detach(self) -> None:
        self._optuna_logger.removeFilter(self)


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


def _is_taken_over(e: BaseException) -> bool:
    """This process's trial was finished by someone else meanwhile."""
    return isinstance(e, optuna.exceptions.UpdateFinishedTrialError) or (
        isinstance(e, ValueError) and str(e).startswith("Cannot tell a ")
    )


def _is_handled(e: BaseException) -> bool:
    """An error :func:`run_trials` handles itself (the trial is settled, the loop goes on)."""
    return isinstance(e, KeyboardInterrupt) or _is_storage_error(e) or _is_taken_over(e)


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
) -> int:
    """Run trials in this process until the study's budget is finished; return how many ran here.

    Args:
        n_trials: the study's total budget (all workers together); None runs until ``timeout``.
        max_trials: at most this many trials in this process.
        timeout: start no trial after this many seconds.
        stop: set by a signal handler to end the loop (see :class:`StopFlag`); without one, a
            ``KeyboardInterrupt`` settles the running trial and propagates.
        attrs: user attributes written on every trial this process runs (worker, device).
        patience: seconds of failing storage calls before giving up with a ``StorageError``.
    """
    stop = stop or StopFlag()
    guard = _Guard(objective, stop, attrs or {})
    study_id = storage.get_study_id_from_name(study.study_name)
    storage.set_budget(study_id, n_trials)
    ran = 0

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        ran += 1
        guard.told = True
        if stop.requested:
            study.stop()

    cbs = [*callbacks, after_trial]
    deadline = None if timeout is None else time.monotonic() + timeout
    failing_since: float | None = None
    waiting = False
    exhausted = False
    quiet = _QuietFailures()
    quiet.attach()
    stop.in_loop = True
    try:
        while not stop.requested:
            left = None if max_trials is None else max_trials - ran
            seconds = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or (seconds is not None and seconds <= 0):
                break
            try:
                if exhausted:
                    # 3) the budget is taken: finished, or held by trials running or queued
                    # elsewhere. Counted inside the try: a storage outage here (a server restart
                    # near a study's end) is retried like any other.
                    assert n_trials is not None, "only a budget raises BudgetExhausted"
                    counts = storage.count_states(study_id)
                    if counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] >= n_trials:
                        break
                    if counts[TrialState.RUNNING] and not counts[TrialState.WAITING]:
                        if not waiting:
                            _log.info(
                                "%d trial(s) still running elsewhere; waiting for them (a dead "
                                "worker's trial is retried %d s after its last heartbeat)",
                                counts[TrialState.RUNNING],
                                storage.grace_period or 0,
                            )
                        waiting = True
                        failing_since = None
                        time.sleep(storage.heartbeat_interval or 1)
                        continue
                    exhausted = False
                _settle(study, storage, guard)  # 4) a trial a signal or the storage interrupted
                study.optimize(guard, n_trials=left, timeout=seconds, callbacks=cbs)  # 1) 2)
                break
            except BudgetExhausted:
                failing_since = None
                exhausted = True
            except KeyboardInterrupt as e:
                _settle_or_leave(study, storage, guard)
                if isinstance(e, Interrupted):
                    break
                raise
            except Exception as e:
                cause = _find_cause(e, _is_storage_error)
                if cause is not None:
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if now - failing_since > patience:
                        _settle_or_leave(study, storage, guard)
                        raise storage_error(
                            storage.url, cause, f"failing for {patience:.0f} s"
                        ) from e
                    pause = min(10.0, 1.0 + now - failing_since)
                    _log.warning(
                        "storage error (%s); retrying in %.0f s", describe_error(cause), pause
                    )
                    time.sleep(pause)
                    continue
                if guard.number is None or _find_cause(e, _is_taken_over) is None:
                    raise
                # Another worker failed our trial while it ran (it saw no heartbeat within the
                # grace period); the retry it queued, or the one _settle queues, runs instead.
                _log.warning(
                    "trial %d was failed by another worker while it ran here (no heartbeat "
                    "within the grace period?); it is retried",
                    guard.number,
                )
                continue
    finally:
        stop.in_loop = False
        quiet.detach()
    return ran


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
    a ``stop`` flag (see :func:`tlsearch.workers.graceful_stop`) a signal ends the loop instead.
    """
    study, storage, ctx = setup_study(
        cfg, device=device, allow_config_change=allow_config_change, heartbeat=heartbeat
    )
    if cfg.n_trials is not None and count_budget(study) >= cfg.n_trials:
        _log.info("study '%s' already has its %d trials", cfg.name, cfg.n_trials)
        return study
    if cfg.finetune.threads:
        torch.set_num_threads(cfg.finetune.threads)
    cbs = list(callbacks or [])
    if progress:
        cbs.append(ProgressPrinter(cfg.n_trials))
    started = time.perf_counter()
    run_trials(
        study,
        storage,
        make_objective(ctx),
        n_trials=cfg.n_trials,
        timeout=cfg.timeout,
        callbacks=cbs,
        stop=stop,
        attrs=worker_attrs(ctx.device),
    )
    _log.info("ran for %.1fs", time.perf_counter() - started)
    return study


def worker_attrs(device: torch.device) -> dict[str, str]:
    """What each trial records about the process that ran it."""
    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "device": str(device)}
