"""The k-fold objective: one trial fine-tunes on each fold of the target training split.

After each fold the trial reports to Optuna (step = fold index) so a pruner can stop a bad trial before
its last fold: the running mean of the fold scores for median/percentile pruners, or each fold's own score
for :class:`optuna.pruners.WilcoxonPruner`, which runs a paired test over folds. Every trial uses the same
folds and the same per-fold seeds, so trials differ only in their parameters.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
import torch
from sklearn.model_selection import KFold, StratifiedKFold

from tlsearch.config import ParamRange, StudyConfig
from tlsearch.data import Dataset
from tlsearch.errors import ConfigError, DivergedError
from tlsearch.finetune import FinetuneParams, evaluate, finetune, to_tensors

__all__ = ["KFoldObjective", "check_folds", "fixed_params", "resolve_params", "suggest_params"]

# User-facing parameter name → SearchSpace field.
_SEARCHED = {
    "lambda": "lambda_",
    "lr": "lr",
    "frozen_blocks": "frozen_blocks",
    "backbone_lr_mult": "backbone_lr_mult",
}


def fixed_params(cfg: StudyConfig) -> dict[str, Any]:
    """The parameters the config fixes rather than searches, under their user-facing names."""
    fixed: dict[str, Any] = {}
    for name, attr in _SEARCHED.items():
        value = getattr(cfg.search, attr)
        if not isinstance(value, ParamRange):
            fixed[name] = int(value) if name == "frozen_blocks" else float(value)
    if isinstance(cfg.regularizer.name, str):
        fixed["regularizer"] = cfg.regularizer.name
    return fixed


def suggest_params(trial: optuna.Trial, cfg: StudyConfig) -> FinetuneParams:
    """Ask the trial for every searched parameter; fixed ones come from the config."""
    values = fixed_params(cfg)
    for name, attr in _SEARCHED.items():
        space = getattr(cfg.search, attr)
        if not isinstance(space, ParamRange):
            continue
        if name == "frozen_blocks":
            values[name] = trial.suggest_int(
                name, int(space.low), int(space.high), step=int(space.step or 1)
            )
        else:
            values[name] = trial.suggest_float(
                name, space.low, space.high, log=space.log, step=space.step
            )
    if not isinstance(cfg.regularizer.name, str):
        values["regularizer"] = trial.suggest_categorical("regularizer", cfg.regularizer.names)
    return FinetuneParams.from_dict(values)


def resolve_params(cfg: StudyConfig, params: Mapping[str, Any]) -> FinetuneParams:
    """A trial's ``params`` plus the fixed values: everything needed to fine-tune again."""
    return FinetuneParams.from_dict({**fixed_params(cfg), **params})


def check_folds(cfg: StudyConfig, train: Dataset) -> None:
    """Fail before any training when the folds cannot be made."""
    counts = np.bincount(train.y)
    counts = counts[counts > 0]
    if cfg.cv.stratified and cfg.cv.k > counts.min():
        raise ConfigError(
            f"cv.k: {cfg.cv.k} stratified folds need at least {cfg.cv.k} target samples per class; "
            f"the rarest class has {counts.min()} (lower cv.k or raise data.shots)"
        )
    if cfg.cv.k > len(train):
        raise ConfigError(f"cv.k: {cfg.cv.k} folds but only {len(train)} target training samples")


def _report_folds(cfg: StudyConfig) -> bool:
    if cfg.cv.report == "auto":
        return cfg.pruner.name == "wilcoxon"
    return cfg.cv.report == "fold"


class KFoldObjective:
    """Callable for :meth:`optuna.Study.optimize`: mean validation accuracy over k folds.

    User attributes of each trial: ``fold_scores``, ``fold_losses``, ``fold_seconds``, ``cv_mean``,
    ``cv_std`` and ``seconds``; a pruned trial also has ``pruned_after_folds`` and, when its loss
    diverged, ``fail_reason``.
    """

    def __init__(
        self,
        cfg: StudyConfig,
        train: Dataset,
        pretrained: Mapping[str, torch.Tensor],
        input_shape: tuple[int, ...],
        num_classes: int,
        device: torch.device,
    ) -> None:
        check_folds(cfg, train)
        self.cfg = cfg
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.pretrained = {k: v.to(device) for k, v in pretrained.items()}
        self.x, self.y = to_tensors(train.x, train.y, device)
        splitter = (StratifiedKFold if cfg.cv.stratified else KFold)(
            n_splits=cfg.cv.k, shuffle=True, random_state=cfg.cv.seed
        )
        self.folds = [
            (torch.from_numpy(tr).to(device), torch.from_numpy(va).to(device))
            for tr, va in splitter.split(train.x.reshape(len(train), -1), train.y)
        ]
        self.report_folds = _report_folds(cfg)

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest_params(trial, self.cfg)
        scores: list[float] = []
        losses: list[float] = []
        seconds: list[float] = []
        t0 = time.perf_counter()

        def record() -> None:
            trial.set_user_attr("fold_scores", scores)
            trial.set_user_attr("fold_losses", losses)
            trial.set_user_attr("fold_seconds", seconds)
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))

        for fold, (tr, va) in enumerate(self.folds):
            t_fold = time.perf_counter()
            try:
                model = finetune(
                    self.pretrained,
                    self.cfg,
                    params,
                    self.x[tr],
                    self.y[tr],
                    self.num_classes,
                    self.input_shape,
                    seed=self.cfg.cv.seed * 1000 + fold,
                )
            except DivergedError as e:
                record()
                reason = f"fold {fold}: {e}"
                trial.set_user_attr("fail_reason", reason)
                raise optuna.TrialPruned(reason) from None
            acc, loss = evaluate(model, self.x[va], self.y[va])
            scores.append(acc)
            losses.append(loss)
            seconds.append(round(time.perf_counter() - t_fold, 3))
            trial.report(acc if self.report_folds else statistics.fmean(scores), fold)
            if fold < len(self.folds) - 1 and trial.should_prune():
                record()
                trial.set_user_attr("pruned_after_folds", fold + 1)
                raise optuna.TrialPruned(f"pruned after fold {fold}")

        mean = statistics.fmean(scores)
        record()
        trial.set_user_attr("cv_mean", mean)
        trial.set_user_attr("cv_std", statistics.pstdev(scores))
        return mean
