"""How a trial's folds train: the one module that decides it (:class:`Schedule`).

A trial fine-tunes each of its folds with one recipe (:class:`~tlsearch.training.trainer.Trainer`,
which knows one fold and one epoch). The schedule decides, from the study's settings and the
trial's parameters:

1. where the folds start: on the frozen-feature cache (``finetune.cache_frozen``: the output of
   the frozen blocks, computed once per process and depth), or on the images (from a random init
   nothing is frozen-and-cached, and an augmented image must run through the frozen blocks too);
2. which folds train stacked, as one model (``finetune.fold_batching``, :meth:`Schedule.groups`);
3. the order and the pruner's step axis (``pruner.steps``): ``"folds"``, one group after the other
   to the end, the trial reporting after each fold (:meth:`Schedule._in_turn`); ``"epochs"``, all
   folds side by side (on threads where they can, :class:`~tlsearch.training.lanes.Lanes`) to the
   next curve point, the trial reporting the CV metric of all its folds there
   (:meth:`Schedule._side_by_side`);
4. the curve points: every :data:`CURVE_EVERY` epochs, and the last;
5. the thread policy, re-applied between epochs (:func:`tlsearch.threads.rebalance`).

What a trial does with the results (records them, reports to the pruner, stops) is its
:class:`Watch`: :mod:`tlsearch.objective`'s trial record. :func:`finetune` is the simplest
schedule: one fold, to the end (``tlsearch final``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import torch
from torch import nn

from tlsearch.config import StudyConfig
from tlsearch.errors import DivergedError
from tlsearch.models import BlockNet, fold_batchable
from tlsearch.params import TrialParams
from tlsearch.samplers import first_prunable_fold, reports_fold_scores
from tlsearch.threads import rebalance
from tlsearch.training.evaluate import Held, predictions
from tlsearch.training.lanes import Lanes
from tlsearch.training.trainer import FoldJob, FrozenFeatures, Recipe, Trainer

__all__ = [
    "CURVE_EVERY",
    "Schedule",
    "TrialFolds",
    "Watch",
    "finetune",
    "finetune_folds",
    "train_to_end",
]

# Epochs between two points of a fold's learning curve (its held-out loss and accuracy); the last
# epoch is always one. A few held-out images, evaluated twelve times in 60 epochs: cheap.
CURVE_EVERY = 5

# On the CPU, stacking a trial's folds pays only where a step is bound by per-op overhead, not by
# arithmetic: it saves k-1 rounds of dispatch, but its batched matmuls and grouped convolutions
# run slower in oneDNN than k plain ones. Measured on one thread (benchmarks/trial_speed.py):
# 1.8-2.3x faster with up to 33K trained block parameters or the head alone, 0.6-0.9x with 200K or
# with convolutions.
_CPU_BATCH_MAX_PARAMS = 100_000


class Watch(Protocol):
    """What a trial does with its folds' results as they come (:mod:`tlsearch.objective`)."""

    def curve(self, folds: Sequence[int], epoch: int, held: Sequence[Held]) -> None:
        """A point of each fold's learning curve: its held-out images at ``epoch``."""

    def scored(self, fold: int, held: Held, seconds: float) -> None:
        """A fold trained to the end: its held-out images, and the seconds it took."""

    def diverged(self, fold: int, error: DivergedError) -> NoReturn:
        """A fold's training loss diverged: the trial ends (raises)."""

    def report(self, held: Sequence[Held], step: int) -> None:
        """Report the CV metric of these folds' held-out images to the pruner at ``step``."""

    def should_stop(self) -> bool:
        """Whether the pruner stops the trial after what it was last reported."""

    def stop(self, why: str, attr: str, value: int) -> NoReturn:
        """End the trial as pruned (raises), noting where (``attr`` = ``value``)."""


@dataclass(frozen=True)
class TrialFolds:
    """The folds one trial trains.

    Attributes:
        recipe: what every fold fine-tunes (:class:`~tlsearch.training.trainer.Recipe`).
        folds: each fold's training and held-out indices into the target's training images, in
            the order the trial scores them.
        seeds: each fold's seed.
        cached: whether the folds may start on the frozen-feature cache (not from a random init).
        search: whether they are the search's folds, on which a pruner may stop the trial (a
            confirmation trial's fresh folds are never pruned).
    """

    recipe: Recipe
    folds: Sequence[tuple[torch.Tensor, torch.Tensor]]
    seeds: Sequence[int]
    cached: bool = True
    search: bool = True


class Schedule:
    """How the trials of one process train their folds: on ``features`` (the target's training
    images and their frozen-feature cache) with labels ``y``."""

    def __init__(self, cfg: StudyConfig, features: FrozenFeatures, y: torch.Tensor) -> None:
        self.cfg = cfg
        self.features = features
        self.y = y
        # pruner.steps: report after each fold, or every few epochs with the folds side by side.
        self.by_epoch = cfg.pruner.by_epoch
        # What a fold step reports: the fold's own value (Wilcoxon) or the running mean.
        self.report_folds = reports_fold_scores(cfg)

    def run(self, trial: TrialFolds, watch: Watch) -> list[BlockNet]:
        """Train the trial's folds, telling ``watch`` as results come; each fold's model."""
        params = trial.recipe.params
        # An augmented image enters block 0: its frozen blocks' output is not the cache's.
        cached = self.cfg.finetune.cache_frozen and trial.cached and params.augment == "none"
        start = params.frozen_blocks if cached else 0
        run = _Run(trial, self.features.at(start), self.y, start, watch)
        groups = self.groups(params, trial)
        return self._side_by_side(run, groups) if self.by_epoch else self._in_turn(run, groups)

    def groups(self, params: TrialParams, trial: TrialFolds) -> list[list[int]]:
        """Which of the trial's folds train stacked (``finetune.fold_batching``), in order.

        Folds are stacked when they are equally large, the trained blocks hold no BatchNorm or
        dropout (:func:`~tlsearch.models.fold_batchable`) and, on the CPU, a step is cheap enough
        for stacking to pay (see ``_CPU_BATCH_MAX_PARAMS``). Only the search's folds the pruner
        cannot skip are stacked; the rest train one at a time, so stacking never spends a fold fit
        that pruning would have saved. Fresh folds are never pruned.
        """
        folds = list(range(len(trial.folds)))
        singles = [[fold] for fold in folds]
        sizes = {len(tr) for tr, _ in trial.folds}
        source = self.features.source
        if self.cfg.finetune.fold_batching == "off" or len(sizes) > 1:
            return singles
        if not fold_batchable(source, params.frozen_blocks):
            return singles
        trained = source.blocks[params.frozen_blocks :]
        conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in trained.modules())
        size = sum(p.numel() for p in trained.parameters())
        if self.features.x.device.type == "cpu" and (conv or size > _CPU_BATCH_MAX_PARAMS):
            return singles
        if not trial.search or self.by_epoch:
            return [folds]  # no fold is skipped: a pruner stops all of them, or none
        first = min(first_prunable_fold(self.cfg), len(folds) - 1)
        return [folds[: first + 1]] + singles[first + 1 :]

    def _in_turn(self, run: _Run, groups: list[list[int]]) -> list[BlockNet]:
        """``pruner.steps = "folds"``: each group trains to the end in turn; after each fold the
        trial reports (step = the fold) and the pruner may stop it."""
        last, watch = self.cfg.finetune.epochs, run.watch
        fitted: dict[int, BlockNet | DivergedError] = {}
        models, scored = [], []
        pending, share = iter(groups), 0.0
        for fold in range(len(run.trial.folds)):
            if fold not in fitted:
                t_fit = time.perf_counter()
                group = next(pending)
                trainer = run.trainer(group)
                while _epoch(trainer):
                    if _curve_point(trainer.epochs_trained, last):
                        watch.curve(group, trainer.epochs_trained, run.held_out(trainer, group))
                fitted = dict(zip(group, trainer.results(), strict=True))
                # Folds trained together share their training time evenly.
                share = (time.perf_counter() - t_fit) / len(group)
            model, held = run.score(fold, fitted[fold], share)
            models.append(model)
            scored.append(held)
            watch.report([held] if self.report_folds else scored, fold)
            if fold < len(run.trial.folds) - 1 and watch.should_stop():
                watch.stop(f"pruned after fold {fold}", "pruned_after_folds", fold + 1)
        return models

    def _side_by_side(self, run: _Run, groups: list[list[int]]) -> list[BlockNet]:
        """``pruner.steps = "epochs"``: the folds train side by side (on threads where they can);
        every :data:`CURVE_EVERY` epochs the trial reports the CV metric of all its folds at that
        epoch (step = epoch) and the pruner may stop it, having trained every fold that far."""
        t0 = time.perf_counter()
        trainers = [run.trainer(group) for group in groups]
        last, epoch = self.cfg.finetune.epochs, 0
        with Lanes(trainers) as lanes:
            # To the next epoch on the curve: the folds train side by side where they can.
            while _advance(lanes, min(CURVE_EVERY - epoch % CURVE_EVERY, max(1, last - epoch))):
                epoch = trainers[0].epochs_trained
                held = [
                    h for g, t in zip(groups, trainers, strict=True) for h in run.held_out(t, g)
                ]
                run.watch.curve([fold for group in groups for fold in group], epoch, held)
                run.watch.report(held, epoch)
                if epoch < last and run.watch.should_stop():
                    run.watch.stop(f"pruned at epoch {epoch}", "pruned_at_epoch", epoch)
        share = (time.perf_counter() - t0) / len(run.trial.folds)
        results = [result for trainer in trainers for result in trainer.results()]
        return [run.score(fold, result, share)[0] for fold, result in enumerate(results)]


@dataclass(frozen=True)
class _Run:
    """One trial's folds on their inputs ``x`` (entering block ``start``), reporting to
    ``watch``."""

    trial: TrialFolds
    x: torch.Tensor
    y: torch.Tensor
    start: int
    watch: Watch

    def trainer(self, group: list[int]) -> Trainer:
        """The folds of ``group`` at their start: one model, or the group's stacked."""
        train = [self.trial.folds[fold][0] for fold in group]
        rows = train[0] if len(group) == 1 else torch.stack(train)
        seeds = tuple(self.trial.seeds[fold] for fold in group)
        return Trainer(self.trial.recipe.job(self.x[rows], self.y[rows], seeds, self.start))

    def held_out(self, trainer: Trainer, group: list[int]) -> list[Held]:
        """A curve point of the folds of ``group``: their held-out images now."""
        val = [self.trial.folds[fold][1] for fold in group]
        if len(group) == 1:
            return trainer.held_out(self.x[val[0]], self.y[val[0]])
        x, y = torch.stack([self.x[va] for va in val]), torch.stack([self.y[va] for va in val])
        return trainer.held_out(x, y)

    def score(
        self, fold: int, result: BlockNet | DivergedError, fit_seconds: float
    ) -> tuple[BlockNet, Held]:
        """A fold trained to the end: its held-out images scored and given to the watch; a
        divergence ends the trial."""
        if isinstance(result, DivergedError):
            self.watch.diverged(fold, result)
        t_eval = time.perf_counter()
        va = self.trial.folds[fold][1]
        held = predictions(result, self.x[va], self.y[va], start=self.start)
        self.watch.scored(fold, held, fit_seconds + time.perf_counter() - t_eval)
        return result, held


def _epoch(trainer: Trainer) -> bool:
    """One more epoch of ``trainer``, the thread policy re-checked first."""
    rebalance()
    return trainer.epoch()


def _advance(lanes: Lanes, epochs: int) -> bool:
    """``epochs`` more of every fold of ``lanes``, the thread policy re-checked first (this
    thread's: lanes never re-check it themselves)."""
    rebalance()
    return lanes.advance(epochs)


def _curve_point(epoch: int, last: int) -> bool:
    """Whether a fold's held-out images are scored after this epoch (its learning curve)."""
    return epoch % CURVE_EVERY == 0 or epoch == last


def train_to_end(job: FoldJob) -> list[BlockNet | DivergedError]:
    """Train ``job`` to its last epoch; each fold's model, or the divergence that ended it."""
    trainer = Trainer(job)
    while _epoch(trainer):
        pass
    return trainer.results()


def finetune(
    pretrained: Mapping[str, torch.Tensor],
    cfg: StudyConfig,
    params: TrialParams,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
    seed: int,
    *,
    start: int = 0,
) -> BlockNet:
    """Fine-tune a copy of the pretrained model on ``(x, y)`` to the end; the pretrained state is
    not changed.

    With ``start = k`` (at most ``params.frozen_blocks``), ``x`` holds the output of the first k
    blocks (:class:`~tlsearch.training.trainer.FrozenFeatures`). Raises
    :class:`~tlsearch.errors.DivergedError` when the training loss becomes NaN or infinite.
    """
    recipe = Recipe(pretrained, cfg, params, num_classes, input_shape)
    (result,) = train_to_end(recipe.job(x, y, (seed,), start))
    if isinstance(result, DivergedError):
        raise result
    return result


def finetune_folds(
    pretrained: Mapping[str, torch.Tensor],
    cfg: StudyConfig,
    params: TrialParams,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
    seeds: Sequence[int],
    *,
    start: int = 0,
) -> list[BlockNet | DivergedError]:
    """Fine-tune one model per fold at once, stacked: what :func:`finetune` gives for each, up to
    rounding.

    ``x`` is ``(folds, n, ...)`` and ``y`` is ``(folds, n)``: every fold trains on the same number
    of samples. ``seeds[f]`` is fold f's seed. The models must be
    :func:`~tlsearch.models.fold_batchable`. Returns each fold's model, or the
    :class:`~tlsearch.errors.DivergedError` that ended it.
    """
    assert len(x) == len(y) == len(seeds), (len(x), len(y), len(seeds))
    recipe = Recipe(pretrained, cfg, params, num_classes, input_shape)
    if len(seeds) == 1:
        return train_to_end(recipe.job(x[0], y[0], tuple(seeds), start))
    return train_to_end(recipe.job(x, y, tuple(seeds), start))
