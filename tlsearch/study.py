"""The study driver: create or resume a study, pretrain once, run trials within an exact budget.

The study's resolved config, its search hash and the pretrained checkpoint's path and SHA-256 are stored
as study user attributes, so a later worker, ``export`` or ``final`` reads them from the storage alone.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from tlsearch import __version__
from tlsearch.config import StudyConfig, config_from_dict
from tlsearch.data import TransferTask, load_task
from tlsearch.device import resolve_device
from tlsearch.errors import ConfigError, StorageError
from tlsearch.objective import KFoldObjective, check_folds
from tlsearch.pretrain import Checkpoint, ensure_pretrained, load_checkpoint
from tlsearch.storage import create_storage, mask_url

__all__ = [
    "ATTR_CHECKPOINT",
    "ATTR_CONFIG",
    "StudyContext",
    "load_study_config",
    "make_pruner",
    "make_sampler",
    "open_study",
    "prepare",
    "run_study",
]

_log = logging.getLogger(__name__)

ATTR_CONFIG = "tlsearch_config"
ATTR_HASH = "tlsearch_search_hash"
ATTR_CHECKPOINT = "tlsearch_checkpoint"
ATTR_VERSION = "tlsearch_version"
# Trials that count toward the budget: those that ran to an end the search can learn from.
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.name == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    if s.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    if s.name == "qmc":
        return optuna.samplers.QMCSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold, n_startup_steps=p.n_warmup_steps)
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
    """Load the data, check the folds and make sure the pretrained checkpoint exists (no storage)."""
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


def open_study(storage_url: str, study_name: str) -> optuna.Study:
    """Load an existing study; one clear error when it does not exist."""
    storage = create_storage(storage_url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StorageError(
            f"no study '{study_name}' in {mask_url(storage_url)}"
            + (f" (studies there: {', '.join(names)})" if names else " (it holds no study)")
        ) from None


def _create_or_resume(
    cfg: StudyConfig, storage: optuna.storages.BaseStorage, allow_config_change: bool
) -> optuna.Study:
    try:
        existing = optuna.load_study(study_name=cfg.name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        old = existing.user_attrs.get(ATTR_HASH)
        if old is not None and old != cfg.search_hash() and not allow_config_change:
            raise ConfigError(
                f"name: study '{cfg.name}' already exists with a different config; "
                "choose another --study-name, or pass --allow-config-change to mix them"
            )
    return optuna.create_study(
        storage=storage,
        study_name=cfg.name,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        direction="maximize",
        load_if_exists=True,
    )


def _record(study: optuna.Study, ctx: StudyContext) -> None:
    study.set_user_attr(ATTR_CONFIG, ctx.cfg.to_dict())
    study.set_user_attr(ATTR_HASH, ctx.cfg.search_hash())
    study.set_user_attr(
        ATTR_CHECKPOINT,
        {"path": str(ctx.checkpoint.path), "sha256": ctx.checkpoint.sha256, "key": ctx.checkpoint.key},
    )
    study.set_user_attr(ATTR_VERSION, __version__)
    study.set_user_attr("task", ctx.task.description)


def count_budget(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=BUDGET_STATES))


def _fmt_params(params: dict[str, Any]) -> str:
    out = []
    for k, v in params.items():
        out.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(out)


class ProgressPrinter:
    """One line per finished trial: state, CV score, the best so far and its parameters."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream

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
        line = f"[{done}{of}] trial {trial.number}: {what}"
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
        f"study '{study.study_name}': "
        + ", ".join(f"{n} {k}" for k, n in counts.items() if n),
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
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_study(
    cfg: StudyConfig,
    *,
    device: str | None = None,
    allow_config_change: bool = False,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    progress: bool = False,
) -> optuna.Study:
    """Run (or resume) the study ``cfg`` describes until its budget is used; return the study.

    ``cfg.n_trials`` is the study's total: a resumed study runs only the trials still missing. A
    ``KeyboardInterrupt`` ends the running trial as FAIL and propagates; finished trials are kept.
    """
    ctx = prepare(cfg, device)
    if cfg.finetune.threads:
        torch.set_num_threads(cfg.finetune.threads)
    storage = create_storage(cfg.storage)
    study = _create_or_resume(cfg, storage, allow_config_change)
    _record(study, ctx)

    remaining = None if cfg.n_trials is None else cfg.n_trials - count_budget(study)
    if remaining is not None and remaining <= 0:
        _log.info("study '%s' already has its %d trials", cfg.name, cfg.n_trials)
        return study
    objective = KFoldObjective(
        cfg,
        ctx.task.target_train,
        load_checkpoint(ctx.checkpoint, ctx.device),
        ctx.task.input_shape,
        ctx.task.target_classes,
        ctx.device,
    )
    cbs = list(callbacks or [])
    if progress:
        cbs.append(ProgressPrinter(cfg.n_trials))
    if cfg.n_trials is not None:
        cbs.append(optuna.study.MaxTrialsCallback(cfg.n_trials, states=BUDGET_STATES))
    started = time.perf_counter()
    study.optimize(objective, n_trials=remaining, timeout=cfg.timeout, callbacks=cbs)
    _log.info("ran for %.1fs", time.perf_counter() - started)
    return study
