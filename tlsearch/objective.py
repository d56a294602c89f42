"""The k-fold objective: one trial fine-tunes on each fold of the target training split.

After each fold the trial reports to Optuna (step = fold index) so a pruner can stop a bad trial before
its last fold: the running mean of the fold scores for median/percentile pruners, or each fold's own score
for :class:`optuna.pruners.WilcoxonPruner`, which runs a paired test over folds. Every trial uses the same
folds and the same per-fold seeds, so trials differ only in their parameters.

Two things make a trial cheap without changing its scores (beyond float rounding): the output of the
frozen blocks on the target data is computed once per process and depth (``finetune.cache_frozen``),
and the folds' models train together (``finetune.fold_batching``, see
:func:`tlsearch.training.finetune_folds`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import numpy as np
import optuna
import torch
from sklearn.model_selection import KFold, StratifiedKFold
from torch import nn

from tlsearch.config import StudyConfig
from tlsearch.data import Dataset
from tlsearch.device import set_threads
from tlsearch.errors import ConfigError, DivergedError
from tlsearch.models import BlockNet, backbone_state, create_model
from tlsearch.params import TrialParams, suggest_params
from tlsearch.samplers import first_prunable_fold, reports_fold_scores
from tlsearch.training import (
    channels_last,
    evaluate,
    finetune,
    finetune_folds,
    fold_batchable,
    to_tensors,
)

__all__ = ["KFoldObjective", "check_folds"]


def check_folds(cfg: StudyConfig, train: Dataset) -> None:
    """Fail before any training when the folds cannot be made."""
    counts = np.bincount(train.y)
    counts = counts[counts > 0]
    if not len(counts):
        raise ConfigError("data: the target training split is empty")
    if cfg.cv.stratified and cfg.cv.k > counts.min():
        raise ConfigError(
            f"cv.k: {cfg.cv.k} stratified folds need at least {cfg.cv.k} target samples per class; "
            f"the rarest class has {counts.min()} (lower cv.k or raise data.shots)"
        )
    if cfg.cv.k > len(train):
        raise ConfigError(f"cv.k: {cfg.cv.k} folds but only {len(train)} target training samples")


# On the CPU, training the folds together pays only where a step is bound by per-op overhead, not
# by arithmetic: it saves k-1 rounds of dispatch, but its batched matmuls and grouped convolutions
# run slower in oneDNN than k plain ones. Measured on one thread (benchmarks/trial_speed.py):
# 1.8-2.3x faster with up to 33K trained block parameters or the head alone, 0.6-0.9x with 200K or
# with convolutions.
_CPU_BATCH_MAX_PARAMS = 100_000


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
        set_threads(cfg.finetune.threads)
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
        self.seeds = [cfg.cv.seed * 1000 + fold for fold in range(len(self.folds))]
        self.report_folds = reports_fold_scores(cfg)
        # The pretrained blocks in eval mode, for the frozen features (no head, no gradients).
        self._source = _pretrained_blocks(cfg, self.pretrained, input_shape, num_classes)
        self._frozen_features: dict[int, torch.Tensor] = {}

    def frozen_features(self, depth: int) -> torch.Tensor:
        """Output of the first ``depth`` pretrained blocks on the target training split.

        Frozen blocks run in eval mode (no dropout, fixed BatchNorm statistics), so this depends only on
        the checkpoint, the depth and the data: it is computed once per process and depth.
        """
        if depth == 0:
            return self.x
        if depth not in self._frozen_features:
            with torch.no_grad():
                self._frozen_features[depth] = self._source.features(self.x, stop=depth)
        return self._frozen_features[depth]

    def fold_groups(self, params: TrialParams) -> list[list[int]]:
        """Which folds train together (``finetune.fold_batching``), in fold order.

        Folds are batched when they are equally large, the trained blocks hold no BatchNorm or
        dropout (:func:`~tlsearch.training.fold_batchable`) and, on the CPU, a step is cheap enough
        for batching to pay (see ``_CPU_BATCH_MAX_PARAMS``). Only the folds the pruner cannot skip
        are batched; the rest train one at a time, so batching never spends a fold fit that pruning
        would have saved.
        """
        k = len(self.folds)
        singles = [[fold] for fold in range(k)]
        if self.cfg.finetune.fold_batching == "off" or len({len(tr) for tr, _ in self.folds}) > 1:
            return singles
        if not fold_batchable(self._source, params.frozen_blocks):
            return singles
        trained = self._source.blocks[params.frozen_blocks :]
        conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in trained.modules())
        size = sum(p.numel() for p in trained.parameters())
        if self.x.device.type == "cpu" and (conv or size > _CPU_BATCH_MAX_PARAMS):
            return singles
        first = min(first_prunable_fold(self.cfg), k - 1)
        return [list(range(first + 1))] + singles[first + 1 :]

    def _fit(
        self, params: TrialParams, x: torch.Tensor, start: int, group: list[int]
    ) -> dict[int, BlockNet | DivergedError]:
        """The fine-tuned model of each fold in ``group``, or the divergence that ended it."""
        if len(group) == 1:
            (fold,) = group
            tr = self.folds[fold][0]
            try:
                model = finetune(
                    self.pretrained,
                    self.cfg,
                    params,
                    x[tr],
                    self.y[tr],
                    self.num_classes,
                    self.input_shape,
                    self.seeds[fold],
                    start=start,
                )
            except DivergedError as e:
                return {fold: e}
            return {fold: model}
        train = torch.stack([self.folds[fold][0] for fold in group])
        models = finetune_folds(
            self.pretrained,
            self.cfg,
            params,
            x[train],
            self.y[train],
            self.num_classes,
            self.input_shape,
            [self.seeds[fold] for fold in group],
            start=start,
        )
        return dict(zip(group, models, strict=True))

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

        start = params.frozen_blocks if self.cfg.finetune.cache_frozen else 0
        x = self.frozen_features(start)
        groups = iter(self.fold_groups(params))
        fitted: dict[int, BlockNet | DivergedError] = {}
        for fold, (_, va) in enumerate(self.folds):
            if fold not in fitted:
                t_fit = time.perf_counter()
                group = next(groups)
                fitted = self._fit(params, x, start, group)
                # Folds trained together share their training time evenly.
                share = (time.perf_counter() - t_fit) / len(group)
            t_eval = time.perf_counter()
            model = fitted[fold]
            if isinstance(model, DivergedError):
                record()
                reason = f"fold {fold}: {model}"
                trial.set_user_attr("fail_reason", reason)
                raise optuna.TrialPruned(reason)
            acc, loss = evaluate(model, x[va], self.y[va], start=start)
            scores.append(acc)
            losses.append(loss)
            seconds.append(round(share + time.perf_counter() - t_eval, 3))
            # Rounded to 12 digits, as the returned value: 0.92 reads 0.92, not 0.9199999999999999.
            trial.report(round(acc if self.report_folds else statistics.fmean(scores), 12), fold)
            if fold < len(self.folds) - 1 and trial.should_prune():
                record()
                trial.set_user_attr("pruned_after_folds", fold + 1)
                raise optuna.TrialPruned(f"pruned after fold {fold}")

        mean = round(statistics.fmean(scores), 12)
        record()
        trial.set_user_attr("cv_mean", mean)
        trial.set_user_attr("cv_std", statistics.pstdev(scores))
        return mean


def _pretrained_blocks(
    cfg: StudyConfig,
    pretrained: Mapping[str, torch.Tensor],
    input_shape: tuple[int, ...],
    num_classes: int,
) -> BlockNet:
    """The pretrained blocks in eval mode; built on the meta device, so no random draw is spent."""
    with torch.device("meta"):
        model = create_model(cfg.model, input_shape, num_classes)
    model.load_state_dict(backbone_state(pretrained, cfg.model), strict=False, assign=True)
    return channels_last(model).eval().requires_grad_(False)
