"""Optuna's samplers and pruners as the study file names them (``sampler.name``, ``pruner.name``).

Each sampler builder takes the study config, whether this process is one of several workers and a
seed; each pruner builder takes the config. They are registered by name in
:data:`tlsearch.registry.SAMPLERS` / ``PRUNERS``.

**Resuming proposes what an uninterrupted run would.** A sampler built once per process with the
study's seed starts its random stream over at every start, so a study resumed after 3 trials
proposed trials 0-2's points again. Here a single process draws trial n with a sampler seeded by
(``sampler.seed``, n) (:class:`PerTrialSeed`): trial n's parameters depend only on the seed, n and
the trials before it, however often the study was stopped and resumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from tlsearch.config import StudyConfig
from tlsearch.registry import PRUNERS, SAMPLERS

__all__ = [
    "PerTrialSeed",
    "first_prunable_fold",
    "make_pruner",
    "make_sampler",
    "reports_fold_scores",
    "trial_seed",
]


def make_sampler(cfg: StudyConfig, parallel: bool = False) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``parallel`` for one of several workers of the study.

    A parallel worker's sampler is reseeded from the OS (as ``optimize(n_jobs=...)`` does), or
    every worker would propose the same points, and TPE assumes the worst value for trials still
    running (``constant_liar``) so workers do not crowd one region. QMC keeps its seed: its
    sequence is indexed by trial number and must be the same in every worker. A single process
    with a seed draws each trial with a sampler seeded by that trial's number (see the module
    docstring).
    """
    seed = cfg.sampler.seed
    if parallel:
        sampler: optuna.samplers.BaseSampler = SAMPLERS.create(cfg.sampler.name, cfg, True, seed)
        sampler.reseed_rng()
        return sampler
    if seed is None or cfg.sampler.name == "qmc":
        return SAMPLERS.create(cfg.sampler.name, cfg, False, seed)
    return PerTrialSeed(lambda s: SAMPLERS.create(cfg.sampler.name, cfg, False, s), seed)


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s sampler: (seed, number) hashed to 32 bits."""
    digest = hashlib.sha256(f"tlsearch.sampler:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class PerTrialSeed(optuna.samplers.BaseSampler):
    """A sampler made anew for each trial, seeded by (``seed``, trial number).

    Optuna's samplers keep no state between trials beyond their random stream (TPE, GP and the
    random sampler read the study's trials each time; CMA-ES keeps its state in the trials' system
    attributes), so a fresh one per trial proposes what a long-lived one would, with a stream
    that no longer depends on when the process started.
    """

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._build = build
        self._seed = seed
        self._sampler = build(seed)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._sampler = self._build(trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    return PRUNERS.create(cfg.pruner.name, cfg)


def tpe(cfg: StudyConfig, parallel: bool, seed: int | None) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=s.n_startup_trials, constant_liar=parallel
    )


def random(cfg: StudyConfig, parallel: bool, seed: int | None) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def gp(cfg: StudyConfig, parallel: bool, seed: int | None) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials)


def cmaes(cfg: StudyConfig, parallel: bool, seed: int | None) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s.n_startup_trials)


def qmc(cfg: StudyConfig, parallel: bool, seed: int | None) -> optuna.samplers.BaseSampler:
    return optuna.samplers.QMCSampler(seed=seed)


def none_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


def wilcoxon_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    return optuna.pruners.WilcoxonPruner(
        p_threshold=p.p_threshold, n_startup_steps=p.n_warmup_steps
    )


def successive_halving_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """Asynchronous successive halving (Li et al. 2020, ASHA) on epochs: a trial reaching a rung
    goes on only when it is in the top 1/η of the trials that reached it, so workers never wait;
    a trial's rung values are stored with it, so a resumed study or a late worker compares with
    the same ones."""
    p = cfg.pruner
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=p.min_epochs, reduction_factor=p.reduction_factor
    )


def hyperband_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """Hyperband (Li et al. 2018): successive halving in brackets of different first rungs, each
    trial's bracket fixed by its number."""
    p = cfg.pruner
    return optuna.pruners.HyperbandPruner(
        min_resource=p.min_epochs,
        max_resource=cfg.finetune.epochs,
        reduction_factor=p.reduction_factor,
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
    """The first fold after which the configured pruner may stop a trial (with
    ``pruner.steps = "epochs"`` the folds train side by side and none is skipped: the last)."""
    p = cfg.pruner
    if p.name == "none" or p.by_epoch:
        return cfg.cv.k * cfg.cv.repeats - 1
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
