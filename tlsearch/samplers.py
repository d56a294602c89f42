"""Optuna's samplers and pruners as the study file names them (``sampler.name``, ``pruner.name``).

Each builder takes the study config (and, for samplers, whether this process is one of several
workers) and is registered by name in :data:`tlsearch.registry.SAMPLERS` / ``PRUNERS``.
"""

from __future__ import annotations

import optuna

from tlsearch.config import StudyConfig
from tlsearch.registry import PRUNERS, SAMPLERS

__all__ = ["first_prunable_fold", "make_pruner", "make_sampler", "reports_fold_scores"]


def make_sampler(cfg: StudyConfig, parallel: bool = False) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``parallel`` for one of several workers of the study.

    A parallel worker's sampler is reseeded from the OS (as ``optimize(n_jobs=...)`` does), or
    every worker would propose the same points, and TPE assumes the worst value for trials still
    running (``constant_liar``) so workers do not crowd one region. QMC keeps its seed: its
    sequence is indexed by trial number and must be the same in every worker.
    """
    sampler: optuna.samplers.BaseSampler = SAMPLERS.create(cfg.sampler.name, cfg, parallel)
    if parallel:
        sampler.reseed_rng()
    return sampler


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    return PRUNERS.create(cfg.pruner.name, cfg)


def tpe(cfg: StudyConfig, parallel: bool) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    return optuna.samplers.TPESampler(
        seed=s.seed, n_startup_trials=s.n_startup_trials, constant_liar=parallel
    )


def random(cfg: StudyConfig, parallel: bool) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=cfg.sampler.seed)


def gp(cfg: StudyConfig, parallel: bool) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)


def cmaes(cfg: StudyConfig, parallel: bool) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    return optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)


def qmc(cfg: StudyConfig, parallel: bool) -> optuna.samplers.BaseSampler:
    return optuna.samplers.QMCSampler(seed=cfg.sampler.seed)


def none_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


def wilcoxon_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    return optuna.pruners.WilcoxonPruner(
        p_threshold=p.p_threshold, n_startup_steps=p.n_warmup_steps
    )


def median_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    return _percentile(cfg, 50.0)


def percentile_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    return _percentile(cfg, cfg.pruner.percentile)


def _percentile(cfg: StudyConfig, percentile: float) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    return optuna.pruners.PercentilePruner(
        percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
    )


def first_prunable_fold(cfg: StudyConfig) -> int:
    """The first fold after which the configured pruner may stop a trial."""
    p = cfg.pruner
    if p.name == "none":
        return cfg.cv.k - 1
    if p.name == "wilcoxon":
        # WilcoxonPruner tests no fewer than max(2, n_startup_steps) paired fold scores.
        return max(2, p.n_warmup_steps) - 1
    return p.n_warmup_steps


def reports_fold_scores(cfg: StudyConfig) -> bool:
    """Whether a trial reports each fold's own score (for Wilcoxon's paired test over folds)
    rather than the running mean of the fold scores (what median/percentile pruners compare)."""
    if cfg.cv.report == "auto":
        return cfg.pruner.name == "wilcoxon"
    return cfg.cv.report == "fold"
