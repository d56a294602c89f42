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

import hashlib
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from sklearn.model_selection import KFold, StratifiedKFold
from torch import nn

from tlsearch.config import StudyConfig
from tlsearch.data import Dataset
from tlsearch.device import set_threads
from tlsearch.errors import ConfigError, DivergedError
from tlsearch.evidence import CURVE_ATTR, OOF_ATTR, encode_curve, encode_oof
from tlsearch.models import BlockNet, backbone_state, create_model
from tlsearch.params import TrialParams, baseline_enqueue, baseline_params, suggest_params
from tlsearch.samplers import first_prunable_fold, reports_fold_scores
from tlsearch.stats import mean_se
from tlsearch.storage import CONFIRM_ATTR
from tlsearch.training import (
    Lanes,
    Recipe,
    Run,
    batchnorm_from,
    channels_last,
    fold_batchable,
    fold_run,
    folds_run,
    predictions,
    to_tensors,
)

__all__ = ["CVMetric", "KFoldObjective", "check_folds", "enqueue_baselines", "split_seed"]


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
    """Callable for :meth:`optuna.Study.optimize`: a trial's ``cv.metric`` over k·repeats folds.

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
        # Repeated k-fold: repeat 0 splits as cv.seed alone did before repeats; each further
        # repeat splits anew. Every trial gets these same folds, and fold f its seed. The
        # confirmation round's trials use the next repeat's folds: fresh splits of the same
        # images, which the search never scored (tlsearch.selection).
        features = train.x.reshape(len(train), -1)
        self.folds = []
        for repeat in range(cfg.cv.repeats + CONFIRM_REPEATS):
            splitter = (StratifiedKFold if cfg.cv.stratified else KFold)(
                n_splits=cfg.cv.k, shuffle=True, random_state=split_seed(cfg.cv.seed, repeat)
            )
            self.folds += [
                (torch.from_numpy(tr).to(device), torch.from_numpy(va).to(device))
                for tr, va in splitter.split(features, train.y)
            ]
        self.seeds = [cfg.cv.seed * 1000 + fold for fold in range(len(self.folds))]
        search = cfg.cv.k * cfg.cv.repeats
        # Fold indices of a search trial and of a confirmation trial.
        self.search_folds = list(range(search))
        self.fresh_folds = list(range(search, len(self.folds)))
        self.metric = CVMetric(cfg.cv.metric, [len(va) for _, va in self.folds[:search]])
        self._scratch: dict[str, torch.Tensor] | None = None
        self.report_folds = reports_fold_scores(cfg)
        # pruner.steps: report after each fold, or every few epochs with the folds side by side.
        self.by_epoch = cfg.pruner.by_epoch
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

    def fold_groups(
        self, params: TrialParams, folds: Sequence[int] | None = None
    ) -> list[list[int]]:
        """Which of ``folds`` (default: the search's) train together (``finetune.fold_batching``),
        in fold order.

        Folds are batched when they are equally large, the trained blocks hold no BatchNorm or
        dropout (:func:`~tlsearch.training.fold_batchable`) and, on the CPU, a step is cheap enough
        for batching to pay (see ``_CPU_BATCH_MAX_PARAMS``). Only the search's folds the pruner
        cannot skip are batched; the rest train one at a time, so batching never spends a fold fit
        that pruning would have saved. The confirmation round's are never pruned.
        """
        folds = list(self.search_folds if folds is None else folds)
        singles = [[fold] for fold in folds]
        sizes = {len(self.folds[fold][0]) for fold in folds}
        if self.cfg.finetune.fold_batching == "off" or len(sizes) > 1:
            return singles
        if not fold_batchable(self._source, params.frozen_blocks):
            return singles
        trained = self._source.blocks[params.frozen_blocks :]
        conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in trained.modules())
        size = sum(p.numel() for p in trained.parameters())
        if self.x.device.type == "cpu" and (conv or size > _CPU_BATCH_MAX_PARAMS):
            return singles
        if folds != self.search_folds or self.by_epoch:
            return [folds]  # no fold is skipped: a pruner stops all of them, or none
        first = min(first_prunable_fold(self.cfg), len(folds) - 1)
        return [folds[: first + 1]] + singles[first + 1 :]

    def _run(
        self,
        init: Mapping[str, torch.Tensor],
        params: TrialParams,
        x: torch.Tensor,
        start: int,
        group: list[int],
    ) -> Run:
        """The folds of ``group`` at their start, to train epoch by epoch (one model, or the
        group's stacked)."""
        recipe = Recipe(init, self.cfg, params, self.num_classes, self.input_shape)
        if len(group) == 1:
            (fold,) = group
            tr = self.folds[fold][0]
            return fold_run(recipe, x[tr], self.y[tr], self.seeds[fold], start=start)
        train = torch.stack([self.folds[fold][0] for fold in group])
        seeds = [self.seeds[fold] for fold in group]
        return folds_run(recipe, x[train], self.y[train], seeds, start=start)

    def _held_out(
        self, run: Run, group: list[int], x: torch.Tensor, start: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each fold of ``group``: its held-out samples' losses and correctness now; before the
        last epoch with the BatchNorm statistics of its training images
        (:func:`~tlsearch.training.batchnorm_from`), at the last as the fold is scored."""
        val = [self.folds[fold][1] for fold in group]
        if len(group) == 1:
            (tr, va), model = self.folds[group[0]], run.model
            last = run.epoch == self.cfg.finetune.epochs
            with nullcontext() if last else batchnorm_from(model, x[tr], start=start):
                return [predictions(model, x[va], self.y[va], start=start)]
        # Folds stacked together hold no BatchNorm (fold_batchable).
        xv, yv = torch.stack([x[va] for va in val]), torch.stack([self.y[va] for va in val])
        ce, right = predictions(run.model, xv, yv, start=start, stacked=True)
        return list(zip(ce, right, strict=True))

    def scratch_init(self) -> dict[str, torch.Tensor]:
        """A random init of the model, for the ``scratch`` baseline: what fine-tuning starts from
        when nothing is transferred; the init ``tlsearch final`` trains its seed-0 scratch model
        from (the head, drawn last, is replaced)."""
        if self._scratch is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = create_model(self.cfg.model, self.input_shape, self.num_classes)
            device = self.x.device
            self._scratch = {k: v.to(device) for k, v in model.state_dict().items()}
        return self._scratch

    def trial_params(self, trial: optuna.Trial) -> tuple[TrialParams, str | None]:
        """The trial's parameters, and the baseline it is (None for a searched trial).

        A baseline trial (enqueued by :func:`enqueue_baselines`) asks the trial only for the
        parameters it was enqueued with, so the sampler records where it really is; it trains
        with exactly the baseline's settings.
        """
        baseline = trial.user_attrs.get("baseline")
        if baseline is None:
            return suggest_params(trial, self.cfg), None
        suggest_params(trial, self.cfg, only=baseline_enqueue(self.cfg, baseline))
        return baseline_params(self.cfg, baseline), baseline

    def __call__(self, trial: optuna.Trial) -> float:
        params, baseline = self.trial_params(trial)
        init = self.scratch_init() if baseline == "scratch" else self.pretrained
        trial.set_user_attr("resolved_params", params.to_dict())
        # A confirmation trial: the same settings on fresh folds, never pruned, reporting nothing
        # a pruner could compare with the search's trials.
        fresh = trial.user_attrs.get(CONFIRM_ATTR) is not None
        folds = self.fresh_folds if fresh else self.search_folds
        record = _Record(trial, len(self.y), len(folds) // self.cfg.cv.k, folds)
        # From a random init nothing is frozen-and-cached: the baseline freezes nothing.
        cached = self.cfg.finetune.cache_frozen and baseline != "scratch"
        start = params.frozen_blocks if cached else 0
        x = self.frozen_features(start)
        groups = self.fold_groups(params, folds)
        # Baselines are what the search is measured against: they report, and always finish.
        pruner = None if fresh else (trial if baseline is None else _Reporter(trial))
        job = _Fit(init, params, x, start, groups, record, pruner)
        models = self._side_by_side(job) if self.by_epoch else self._fold_after_fold(job)
        record.write(complete=True)
        scores, losses = record.scores, record.losses
        trial.set_user_attr("cv_mean", round(statistics.fmean(scores), 12))
        trial.set_user_attr("cv_std", statistics.pstdev(scores))
        trial.set_user_attr("cv_loss", round(statistics.fmean(losses), 12))
        trial.set_user_attr("cv_se", self.metric.standard_error(scores, losses))
        assert len(models) == len(folds), (len(models), len(folds))
        return self.metric.value(scores, losses)

    def _fold_after_fold(self, job: _Fit) -> dict[int, BlockNet]:
        """``pruner.steps = "folds"``: each fold (or batched group) trains to the end in turn;
        after each fold the trial reports (step = fold) and the pruner may stop it."""
        x, start, groups, record, pruner = job.x, job.start, job.groups, job.record, job.pruner
        fitted: dict[int, BlockNet | DivergedError] = {}
        models: dict[int, BlockNet] = {}
        folds = [fold for group in groups for fold in group]
        pending = iter(groups)
        share = 0.0
        for i, fold in enumerate(folds):
            if fold not in fitted:
                t_fit = time.perf_counter()
                group = next(pending)
                run = self._run(job.init, job.params, x, start, group)
                while run.step():
                    if _evaluated(run.epoch, self.cfg.finetune.epochs):
                        record.curve(group, run.epoch, self._held_out(run, group, x, start))
                fitted = dict(zip(group, run.results(), strict=True))
                # Folds trained together share their training time evenly.
                share = (time.perf_counter() - t_fit) / len(group)
            model = _trained(fitted[fold], i, record)
            acc, loss = self._score(record, fold, model, x, start, share)
            models[fold] = model
            if pruner is None:
                continue
            # What the pruner compares: this fold's value (Wilcoxon) or the running mean.
            step = self.metric.value([acc], [loss]) if self.report_folds else None
            pruner.report(
                step if step is not None else self.metric.value(record.scores, record.losses), i
            )
            if i < len(folds) - 1 and pruner.should_prune():
                record.write()
                pruner.set_user_attr("pruned_after_folds", i + 1)
                raise optuna.TrialPruned(f"pruned after fold {i}")
        return models

    def _side_by_side(self, job: _Fit) -> dict[int, BlockNet]:
        """``pruner.steps = "epochs"``: the folds train side by side (on threads where they can,
        :class:`~tlsearch.training.Lanes`); every :data:`CURVE_EVERY` epochs the trial reports the
        CV metric of all its folds at that epoch (step = epoch) and the pruner may stop it, having
        trained every fold that far."""
        x, start, groups, record = job.x, job.start, job.groups, job.record
        t0 = time.perf_counter()
        runs = [(group, self._run(job.init, job.params, x, start, group)) for group in groups]
        last, epoch = self.cfg.finetune.epochs, 0
        with Lanes([run for _, run in runs]) as lanes:
            # To the next epoch on the curve: the folds train side by side where they can.
            while lanes.advance(min(CURVE_EVERY - epoch % CURVE_EVERY, max(1, last - epoch))):
                epoch = runs[0][1].epoch
                self._at_epoch(job, runs, epoch)
        share = (time.perf_counter() - t0) / sum(len(g) for g in groups)
        fitted = {f: m for group, run in runs for f, m in zip(group, run.results(), strict=True)}
        models = {}
        for i, fold in enumerate(f for group in groups for f in group):
            models[fold] = _trained(fitted[fold], i, record)
            self._score(record, fold, models[fold], x, start, share)
        return models

    def _at_epoch(self, job: _Fit, runs: list[tuple[list[int], Run]], epoch: int) -> None:
        """A point of every fold's curve; the trial reports the CV metric of all its folds at
        ``epoch`` (step = epoch) and the pruner may stop it."""
        x, start, record, pruner = job.x, job.start, job.record, job.pruner
        now = [
            (fold, *held)
            for group, run in runs
            for fold, held in zip(group, self._held_out(run, group, x, start), strict=True)
        ]
        record.curve([f for f, _, _ in now], epoch, [(c, r) for _, c, r in now])
        if pruner is None:
            return
        accs = [int(r.sum()) / len(r) for _, _, r in now]
        losses = [float(c.sum()) / len(c) for _, c, _ in now]
        pruner.report(self.metric.value(accs, losses), epoch)
        if epoch < self.cfg.finetune.epochs and pruner.should_prune():
            record.write()
            pruner.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    def _score(
        self, record: _Record, fold: int, model: BlockNet, x: torch.Tensor, start: int, fit: float
    ) -> tuple[float, float]:
        """Step 6 for one fold: its held-out images scored and recorded; accuracy and loss."""
        t_eval = time.perf_counter()
        va = self.folds[fold][1]
        ce, right = predictions(model, x[va], self.y[va], start=start)
        return record.fold(fold, va, ce, right, fit + time.perf_counter() - t_eval)


def _evaluated(epoch: int, last: int) -> bool:
    """Whether a fold's held-out images are scored after this epoch (its learning curve)."""
    return epoch % CURVE_EVERY == 0 or epoch == last


def _trained(result: BlockNet | DivergedError, i: int, record: _Record) -> BlockNet:
    """The fold's trained model; a divergence ends the trial, pruned with its reason."""
    if isinstance(result, DivergedError):
        record.write()
        reason = f"fold {i}: {result}"
        record.trial.set_user_attr("fail_reason", reason)
        raise optuna.TrialPruned(reason)
    return result


class _Reporter:
    """A baseline trial as the pruner sees it: it reports (its values set the bar other trials
    are compared with, and are recorded at each rung) but is never stopped."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def report(self, value: float, step: int) -> None:
        self.trial.report(value, step)

    def should_prune(self) -> bool:
        self.trial.should_prune()  # records its value at a successive-halving rung
        return False

    def set_user_attr(self, key: str, value: object) -> None:
        self.trial.set_user_attr(key, value)


@dataclass(frozen=True)
class _Fit:
    """What one trial trains: from ``init`` with ``params`` on ``x`` (its blocks from ``start``),
    the fold ``groups`` in order, writing to ``record`` and reporting to ``pruner`` (None: never)."""

    init: Mapping[str, torch.Tensor]
    params: TrialParams
    x: torch.Tensor
    start: int
    groups: list[list[int]]
    record: _Record
    pruner: optuna.Trial | None


# Fresh repeats of k folds a confirmation trial is scored on (tlsearch.selection).
CONFIRM_REPEATS = 1
# Epochs between two points of a fold's learning curve (its held-out loss and accuracy); the last
# epoch is always one. A few held-out images, evaluated twelve times in 60 epochs: cheap.
CURVE_EVERY = 5


class _Record:
    """What one trial writes as it goes: each fold's score, loss and time, its learning curve and,
    for a complete trial, every image's out-of-fold evidence (:mod:`tlsearch.evidence`).

    ``folds`` are the objective's fold indices the trial trains, ``repeats`` of k each, in order.
    """

    def __init__(
        self, trial: optuna.Trial, images: int, repeats: int, folds: Sequence[int]
    ) -> None:
        self.trial = trial
        self.t0 = time.perf_counter()
        self.scores: list[float] = []
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.position = {fold: i for i, fold in enumerate(folds)}
        self.k = len(folds) // repeats
        self.p_true = np.zeros((repeats, images))
        self.correct = np.zeros((repeats, images), dtype=bool)
        self.epochs: list[int] = []
        self.curve_loss: list[list[float]] = [[] for _ in folds]
        self.curve_accuracy: list[list[float]] = [[] for _ in folds]

    def curve(
        self, folds: list[int], epoch: int, held: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Each of ``folds``' held-out loss and accuracy at ``epoch``: a point of its curve."""
        if epoch not in self.epochs:
            self.epochs.append(epoch)
        for fold, (ce, right) in zip(folds, held, strict=True):
            self.curve_loss[self.position[fold]].append(float(ce.sum()) / len(ce))
            self.curve_accuracy[self.position[fold]].append(int(right.sum()) / len(right))

    def fold(
        self, fold: int, va: torch.Tensor, ce: torch.Tensor, right: torch.Tensor, seconds: float
    ) -> tuple[float, float]:
        """Note a fold's held-out predictions; its accuracy and mean loss."""
        repeat, rows = self.position[fold] // self.k, va.cpu().numpy()
        self.p_true[repeat, rows] = torch.exp(-ce).double().cpu().numpy()
        self.correct[repeat, rows] = right.cpu().numpy()
        acc, loss = int(right.sum()) / len(right), float(ce.sum()) / len(ce)
        self.scores.append(acc)
        self.losses.append(loss)
        self.seconds.append(round(seconds, 3))
        return acc, loss

    def write(self, complete: bool = False) -> None:
        t = self.trial
        t.set_user_attr("fold_scores", self.scores)
        t.set_user_attr("fold_losses", self.losses)
        t.set_user_attr("fold_seconds", self.seconds)
        t.set_user_attr("seconds", round(time.perf_counter() - self.t0, 3))
        t.set_user_attr(
            CURVE_ATTR, encode_curve(self.epochs, self.curve_loss, self.curve_accuracy)
        )
        if complete:
            t.set_user_attr(OOF_ATTR, encode_oof(self.p_true, self.correct))


def split_seed(seed: int, repeat: int) -> int:
    """The fold-split seed of repeat ``repeat``: ``seed`` itself for the first (as before repeats
    existed), a hash of both for the others."""
    if repeat == 0:
        return seed
    digest = hashlib.sha256(f"tlsearch.cv:{seed}:{repeat}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class CVMetric:
    """A trial's value from its fold accuracies and losses, as one float Optuna maximizes.

    - ``accuracy``: the mean fold accuracy.
    - ``loss``: minus the mean fold cross-entropy.
    - ``accuracy_then_loss``: ``mean accuracy + ε / (1 + mean loss)``. Fold f scores ``n_f``
      images, so a mean over up to K folds is a multiple of ``1 / (K·L)``, with L the least common
      multiple of the ``n_f``: two different mean accuracies differ by at least ``1/(K·L) = 2ε``,
      more than the loss term (between 0 and ε) can bridge. The accuracy order is kept exactly
      and ties are broken by the lower loss. The pruner sees the same encoding of the running mean
      (m folds: a multiple of ``1/(m·L)``, coarser still). Values are rounded to 12 digits, far
      below ε for any data set that fits in memory (ε < 1e-12 would need K·L > 5e11).

    The standard error is that of the mean of the fold values: ``std(ddof=1) / √K`` over the
    fold accuracies (``loss``: the fold losses).
    """

    def __init__(self, name: str, fold_sizes: Sequence[int]) -> None:
        self.name = name
        self.eps = 0.5 / (len(fold_sizes) * math.lcm(*fold_sizes))

    def value(self, scores: Sequence[float], losses: Sequence[float]) -> float:
        acc, loss = statistics.fmean(scores), statistics.fmean(losses)
        if self.name == "accuracy":
            value = acc
        elif self.name == "loss":
            value = -loss
        else:
            value = acc + self.eps / (1.0 + loss)
        # 12 digits: 0.92 reads 0.92, not 0.9199999999999999.
        return round(value, 12)

    def standard_error(self, scores: Sequence[float], losses: Sequence[float]) -> float | None:
        return mean_se(losses if self.name == "loss" else scores)


def enqueue_baselines(study: optuna.Study, cfg: StudyConfig) -> None:
    """Enqueue the study's reference trials (``search.baselines``) as its first trials.

    Each is marked with the user attribute ``baseline`` and enqueued with the searched parameters
    it has (see :func:`tlsearch.params.baseline_enqueue`); it counts toward the budget like any
    trial and is scored on the same folds. A budget smaller than the baselines keeps the first.
    """
    budget = cfg.n_trials if cfg.n_trials is not None else len(cfg.search.baselines)
    for name in cfg.search.baselines[:budget]:
        study.enqueue_trial(
            baseline_enqueue(cfg, name), user_attrs={"baseline": name}, skip_if_exists=False
        )


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
