"""The k-fold objective: one trial fine-tunes each fold of the target training split.

This module holds the folds and the trial's record; how the folds train (in turn or side by side,
stacked, on the frozen-feature cache) and when the trial reports to the pruner is
:mod:`tlsearch.training.schedule`'s.

**Folds.** ``cv.k`` stratified folds, ``cv.repeats`` times, split anew each repeat; every trial
uses the same folds, and fold f the same seed, so trials differ only in their parameters. The
confirmation round's trials (:mod:`tlsearch.confirmation`) use
:data:`~tlsearch.confirmation.CONFIRM_REPEATS` further repeats: fresh splits of the same images
that the search never scored.

**The trial's record** (:class:`TrialRecord`): each fold's score, loss and time, its learning
curve and, for a complete trial, every image's out-of-fold evidence (:mod:`tlsearch.evidence`),
written as the trial's user attributes; and what the trial reports to the pruner: by default
(``pruner.steps = "epochs"``) every few epochs the CV metric of all its folds at that epoch;
with ``"folds"`` after each fold its running mean (or, for
:class:`optuna.pruners.WilcoxonPruner`, each fold's own value, a paired test over folds).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import NoReturn, Protocol

import numpy as np
import optuna
import torch
from sklearn.model_selection import KFold, StratifiedKFold

from tlsearch.config import StudyConfig
from tlsearch.confirmation import CONFIRM_REPEATS, is_confirmation
from tlsearch.data import Dataset
from tlsearch.errors import ConfigError, DivergedError
from tlsearch.evidence import CURVE_ATTR, OOF_ATTR, encode_curve, encode_oof
from tlsearch.models import create_model
from tlsearch.params import (
    STANDARD_AUGMENT,
    TrialParams,
    augment_choices,
    baseline_enqueue,
    baseline_params,
    suggest_params,
)
from tlsearch.stats import mean_se
from tlsearch.threads import set_threads
from tlsearch.training import FrozenFeatures, Held, Recipe, Schedule, TrialFolds, to_tensors

__all__ = [
    "CVMetric",
    "KFoldObjective",
    "TrialRecord",
    "check_folds",
    "enqueue_baselines",
    "make_folds",
    "split_seed",
]


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


class KFoldObjective:
    """Callable for :meth:`optuna.Study.optimize`: a trial's ``cv.metric`` over k·repeats folds.

    User attributes of each trial (:class:`TrialRecord`): ``resolved_params`` (everything it
    trained with), ``fold_scores``, ``fold_losses``, ``fold_seconds``, ``seconds`` and ``curve``
    (each fold's held-out loss and accuracy every few epochs); a complete trial also ``oof`` (each
    image's out-of-fold evidence), ``cv_mean``, ``cv_std``, ``cv_loss`` and ``cv_se`` (the
    standard error of its value); a pruned trial ``pruned_at_epoch`` or ``pruned_after_folds``,
    and, when its loss diverged, ``fail_reason``.
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
        self.folds = make_folds(cfg, train, device)
        self.seeds = [cfg.cv.seed * 1000 + fold for fold in range(len(self.folds))]
        search = cfg.cv.k * cfg.cv.repeats
        # Fold indices of a search trial and of a confirmation trial.
        self.search_folds = list(range(search))
        self.fresh_folds = list(range(search, len(self.folds)))
        self.metric = CVMetric(cfg.cv.metric, [len(va) for _, va in self.folds[:search]])
        # The augmentations a trial may train with on these inputs (search.augment).
        self.augment = augment_choices(cfg, input_shape)
        self._scratch: dict[str, torch.Tensor] | None = None
        features = FrozenFeatures(cfg, self.pretrained, input_shape, num_classes, self.x)
        self.schedule = Schedule(cfg, features, self.y)

    def frozen_features(self, depth: int) -> torch.Tensor:
        """The target training split as it enters block ``depth`` (the frozen-feature cache)."""
        return self.schedule.features.at(depth)

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
            return suggest_params(trial, self.cfg, augment=self.augment), None
        enqueued = baseline_enqueue(self.cfg, baseline, self.augment)
        suggest_params(trial, self.cfg, only=enqueued, augment=self.augment)
        return baseline_params(self.cfg, baseline), baseline

    def __call__(self, trial: optuna.Trial) -> float:
        params, baseline = self.trial_params(trial)
        trial.set_user_attr("resolved_params", params.to_dict())
        # A confirmation trial: the same settings on fresh folds, never pruned, reporting nothing
        # a pruner could compare with the search's trials.
        fresh = is_confirmation(trial)
        folds = self.fresh_folds if fresh else self.search_folds
        # Baselines are what the search is measured against: they report, and always finish.
        pruner = None if fresh else (trial if baseline is None else _Reporter(trial))
        val = [self.folds[fold][1] for fold in folds]
        record = TrialRecord(trial, len(self.y), val, self.cfg.cv.k, self.metric, pruner)
        init = self.scratch_init() if baseline == "scratch" else self.pretrained
        recipe = Recipe(init, self.cfg, params, self.num_classes, self.input_shape)
        plan = TrialFolds(
            recipe,
            [self.folds[fold] for fold in folds],
            [self.seeds[fold] for fold in folds],
            # From a random init nothing is frozen-and-cached: the baseline freezes nothing.
            cached=baseline != "scratch",
            search=not fresh,
        )
        models = self.schedule.run(plan, record)
        assert len(models) == len(folds), (len(models), len(folds))
        return record.complete()


def make_folds(
    cfg: StudyConfig, train: Dataset, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every fold's training and held-out indices: ``cv.repeats`` repeats of ``cv.k`` folds for
    the search, then :data:`~tlsearch.confirmation.CONFIRM_REPEATS` for the confirmation round.

    Repeat 0 splits as ``cv.seed`` alone did before repeats existed; each further repeat splits
    anew (:func:`split_seed`). The confirmation round's trials use the next repeat's folds: fresh
    splits of the same images, which the search never scored (:mod:`tlsearch.confirmation`).
    """
    features = train.x.reshape(len(train), -1)
    folds = []
    for repeat in range(cfg.cv.repeats + CONFIRM_REPEATS):
        splitter = (StratifiedKFold if cfg.cv.stratified else KFold)(
            n_splits=cfg.cv.k, shuffle=True, random_state=split_seed(cfg.cv.seed, repeat)
        )
        folds += [
            (torch.from_numpy(tr).to(device), torch.from_numpy(va).to(device))
            for tr, va in splitter.split(features, train.y)
        ]
    return folds


class Pruner(Protocol):
    """What a trial reports to: the trial itself, or a baseline's :class:`_Reporter`."""

    def report(self, value: float, step: int) -> None: ...

    def should_prune(self) -> bool: ...


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


class TrialRecord:
    """What one trial writes as it goes, and what it tells its pruner: the
    :class:`~tlsearch.training.schedule.Watch` of its folds.

    ``val`` holds the held-out indices of the trial's folds, in order, ``k`` per repeat;
    ``pruner`` is None for a trial nothing may stop and that reports nothing.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        images: int,
        val: Sequence[torch.Tensor],
        k: int,
        metric: CVMetric,
        pruner: Pruner | None,
    ) -> None:
        self.trial = trial
        self.metric = metric
        self.pruner = pruner
        self.t0 = time.perf_counter()
        self.scores: list[float] = []
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.val = list(val)
        self.k = k
        repeats = len(self.val) // k
        self.p_true = np.zeros((repeats, images))
        self.correct = np.zeros((repeats, images), dtype=bool)
        self.epochs: list[int] = []
        self.curve_loss: list[list[float]] = [[] for _ in self.val]
        self.curve_accuracy: list[list[float]] = [[] for _ in self.val]

    def curve(self, folds: Sequence[int], epoch: int, held: Sequence[Held]) -> None:
        """Each of ``folds``' held-out loss and accuracy at ``epoch``: a point of its curve."""
        if epoch not in self.epochs:
            self.epochs.append(epoch)
        for fold, (ce, right) in zip(folds, held, strict=True):
            self.curve_loss[fold].append(float(ce.sum()) / len(ce))
            self.curve_accuracy[fold].append(int(right.sum()) / len(right))

    def scored(self, fold: int, held: Held, seconds: float) -> None:
        """Note a fold's held-out predictions: its accuracy, mean loss and each image's evidence."""
        ce, right = held
        repeat, rows = fold // self.k, self.val[fold].cpu().numpy()
        self.p_true[repeat, rows] = torch.exp(-ce).double().cpu().numpy()
        self.correct[repeat, rows] = right.cpu().numpy()
        acc, loss = _accuracy_and_loss(held)
        self.scores.append(acc)
        self.losses.append(loss)
        self.seconds.append(round(seconds, 3))

    def report(self, held: Sequence[Held], step: int) -> None:
        if self.pruner is not None:
            accs, losses = zip(*map(_accuracy_and_loss, held), strict=True)
            self.pruner.report(self.metric.value(accs, losses), step)

    def should_stop(self) -> bool:
        return self.pruner is not None and self.pruner.should_prune()

    def stop(self, why: str, attr: str, value: int) -> NoReturn:
        self.write()
        self.trial.set_user_attr(attr, value)
        raise optuna.TrialPruned(why)

    def diverged(self, fold: int, error: DivergedError) -> NoReturn:
        """A divergence ends the trial, pruned with its reason."""
        self.write()
        reason = f"fold {fold}: {error}"
        self.trial.set_user_attr("fail_reason", reason)
        raise optuna.TrialPruned(reason)

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

    def complete(self) -> float:
        """Write the complete trial and its CV summary; its value (``cv.metric``)."""
        self.write(complete=True)
        scores, losses, t = self.scores, self.losses, self.trial
        t.set_user_attr("cv_mean", round(statistics.fmean(scores), 12))
        t.set_user_attr("cv_std", statistics.pstdev(scores))
        t.set_user_attr("cv_loss", round(statistics.fmean(losses), 12))
        t.set_user_attr("cv_se", self.metric.standard_error(scores, losses))
        return self.metric.value(scores, losses)


def _accuracy_and_loss(held: Held) -> tuple[float, float]:
    ce, right = held
    return int(right.sum()) / len(right), float(ce.sum()) / len(ce)


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


def enqueue_baselines(
    study: optuna.Study, cfg: StudyConfig, augment: Sequence[str] = ("none",)
) -> None:
    """Enqueue the study's reference trials (``search.baselines``) as its first trials.

    Each is marked with the user attribute ``baseline`` and enqueued with the searched parameters
    it has (see :func:`tlsearch.params.baseline_enqueue`; ``augment``: the study's augmentation
    choices, :func:`tlsearch.params.augment_choices`); it counts toward the budget like any trial
    and is scored on the same folds. A budget smaller than the baselines keeps the first.
    """
    # The standard augmentation's reference only where the study may augment images so.
    names = [
        name
        for name in cfg.search.baselines
        if name != "plain_augmented" or STANDARD_AUGMENT["augment"] in augment
    ]
    budget = cfg.n_trials if cfg.n_trials is not None else len(names)
    for name in names[:budget]:
        study.enqueue_trial(
            baseline_enqueue(cfg, name, augment),
            user_attrs={"baseline": name},
            skip_if_exists=False,
        )
