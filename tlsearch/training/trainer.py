"""One fold's fine-tuning, read top to bottom: :class:`Trainer`.

What a fold trains is one object, a :class:`FoldJob`: the trial's :class:`Recipe` (the pretrained
state, the study, the trial's parameters), the fold's training images and its seed. The trainer's
steps, numbered as in the code:

1. the start model: the pretrained blocks and a new head for the target's classes;
2. the first ``frozen_blocks`` blocks frozen;
3. the inputs: the fold's images, or the frozen-feature cache's output of the first ``start``
   frozen blocks (:class:`FrozenFeatures`: frozen blocks run in eval mode, so that output depends
   only on the checkpoint, the depth and the images; the trainer then never runs them);
4. the loss: the penalty (λ, :mod:`tlsearch.regularizers`) and the *data terms* (DELTA's distance
   between feature maps, BSS: :class:`~tlsearch.regularizers.base.DataTerm`), each prepared once on
   the model at its start;
5. the optimizer groups: the head at ``lr``, the unfrozen blocks at ``lr × backbone_lr_mult``,
   after ``head_warmup_epochs`` of the head alone;
6. one epoch (:meth:`Trainer.epoch`, which a caller advances): minibatches from the fold's own
   generator, augmented (``search.augment``: :mod:`tlsearch.augmentations`, each fold's draws
   from a generator of its own; an augmented image enters block 0, so such a trial does not start
   on the cache); the loss = the mean cross-entropy (against mixed labels where the augmentation
   mixes them) + the data terms (+ the penalty, unless its gradient has a closed form); backward;
   the penalty's closed-form gradient added to ``.grad``; the optimizer step; the divergence
   check;
7. evaluation at a curve point (:meth:`Trainer.held_out`): the held-out images' losses and
   correctness (:mod:`tlsearch.training.evaluate`).

**Stacked folds** are the same steps on a stacked model: a job with several seeds trains one model
per fold at once, their parameters stacked along a leading fold dimension and run with one
``torch.func.vmap`` (:mod:`tlsearch.models.stacked`); Adam and SGD update each element on its own,
so one optimizer over the stacked tensors is k independent ones, and each fold keeps its seed (its
head, its minibatch order). The results are each fold's alone, up to float rounding. Which folds
stack, and whether folds train in turn or side by side, is :mod:`tlsearch.training.schedule`'s
decision, never the trainer's.

Data stays in device tensors: a few-label target set fits many times over, and slicing a tensor
costs far less than a per-sample ``DataLoader``.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tlsearch.augmentations import Augmentation, create_augmentation
from tlsearch.config import StudyConfig
from tlsearch.errors import DivergedError
from tlsearch.models import (
    BlockNet,
    backbone_state,
    create_model,
    fold_batchable,
    per_fold,
    stack_models,
)
from tlsearch.params import TrialParams
from tlsearch.regularizers import DataTerm, Regularizer, Start, create_regularizer, data_terms
from tlsearch.training.adam import FusedAdam
from tlsearch.training.evaluate import Held, batchnorm_from, predictions
from tlsearch.training.rng import RandomStream

__all__ = [
    "FoldJob",
    "FrozenFeatures",
    "Recipe",
    "Trainer",
    "block_outputs",
    "channels_last",
    "minibatches",
    "start_model",
    "to_tensors",
]


@dataclass(frozen=True)
class Recipe:
    """What a trial's folds fine-tune and how: the pretrained state (or a random init), the
    study, the trial's parameters, and the target's classes and input shape."""

    pretrained: Mapping[str, torch.Tensor]
    cfg: StudyConfig
    params: TrialParams
    num_classes: int
    input_shape: tuple[int, ...]

    def job(
        self, x: torch.Tensor, y: torch.Tensor, seeds: tuple[int, ...], start: int = 0
    ) -> FoldJob:
        """The :class:`FoldJob` of the folds seeded ``seeds`` on ``(x, y)``."""
        return FoldJob(self, x, y, tuple(seeds), start)


@dataclass(frozen=True)
class FoldJob:
    """What one :class:`Trainer` trains: the recipe, on a fold's training set.

    Attributes:
        recipe: the trial's :class:`Recipe`.
        x: the fold's training inputs, entering block ``start``; several folds: ``(folds, n, ...)``.
        y: their labels; several folds: ``(folds, n)``.
        seeds: each fold's seed (its new head and its minibatch order); more than one: the folds'
            models are stacked and trained at once.
        start: the block the inputs enter (at most ``frozen_blocks``: step 3).
    """

    recipe: Recipe
    x: torch.Tensor
    y: torch.Tensor
    seeds: tuple[int, ...]
    start: int = 0

    @property
    def stacked(self) -> bool:
        return len(self.seeds) > 1


class Trainer:
    """One fold's fine-tuning (several folds' when the job is stacked), one epoch of step 6 per
    :meth:`epoch`.

    Each trainer keeps the global random stream (dropout's) as it left it, so that folds advanced
    in turn, epoch by epoch, each train as they would alone; :attr:`draws` says whether its first
    epoch drew from that stream at all (None before it), i.e. whether it may train on another
    thread beside other trainers (:class:`~tlsearch.training.lanes.Lanes`).
    """

    def __init__(self, job: FoldJob) -> None:
        params = job.recipe.params
        assert 0 <= job.start <= params.frozen_blocks, (job.start, params.frozen_blocks)
        self.job = job
        self.epochs = job.recipe.cfg.finetune.epochs
        self.epochs_trained = 0
        # 1-2) each fold's model: the pretrained blocks, a new head, the first k blocks frozen;
        # several folds' stacked into one
        self.models = [start_model(job.recipe, seed, job.x.device) for seed in job.seeds]
        self.model = self.models[0]
        if job.stacked:
            assert fold_batchable(self.model, params.frozen_blocks), "BatchNorm/dropout"
            self.model = stack_models(self.models)
            # Every fold on its own inputs at once; fold f's rows of a batch: (f, its indices).
            self._per_fold = (
                per_fold(self.model, partial(_logits, start=job.start)),
                per_fold(self.model, partial(block_outputs, start=job.start)),
            )
            self._fold_rows = torch.arange(len(job.x), device=job.x.device)[:, None]
        # 3) the inputs, job.x, enter block job.start (forward): the images, or the output of
        # the first frozen blocks (FrozenFeatures); augmented minibatches (None: the images as
        # they are, step 6) enter block 0, each fold's drawn from a generator of its own
        self.augmentation = _augmentation(job.recipe)
        assert self.augmentation is None or job.start == 0, "augmented images enter block 0"
        self.augment_generators = [
            torch.Generator().manual_seed(_seed(seed, "augment"))
            for seed in (job.seeds if self.augmentation is not None else ())
        ]
        # 4) the loss: the penalty (λ enters here) and the data terms, prepared
        self.penalty = self._penalty()
        self.terms = self._data_terms()
        # 5) what the optimizer groups hold (made by the first epoch, after the head's warm-up)
        self.head = list(self.model.head.parameters())
        self.backbone = [p for p in self.model.blocks.parameters() if p.requires_grad]
        self._optimizer: torch.optim.Optimizer | FusedAdam | None = None
        # 6) each fold's own minibatch order, its divergence, and the global random stream
        self.generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
        self.diverged: list[DivergedError | None] = [None] * len(job.seeds)
        self._stream = RandomStream(job.x.device)

    @property
    def draws(self) -> bool | None:
        """Whether the first epoch drew from the global random stream (None: not trained yet)."""
        return self._stream.draws

    @property
    def device(self) -> torch.device:
        return self.job.x.device

    def epoch(self) -> bool:
        """6) Train one more epoch (the first call warms up the head first, step 5), on this
        trainer's own random stream; False when none was left or a fold diverged."""
        if self.epochs_trained == self.epochs or self.diverged[0] is not None:
            return False
        with self._stream:
            if self._optimizer is None:
                self._warm_up_head()
                self._optimizer = self._optimizer_groups()
            if self.diverged[0] is None:
                self._train_epoch(self._optimizer, self.epochs_trained + 1)
        if self.diverged[0] is not None:
            return False  # the folds are scored in order: the trial ends at its first
        self.epochs_trained += 1
        return True

    def held_out(self, x: torch.Tensor, y: torch.Tensor) -> list[Held]:
        """7) Each fold's held-out losses and correctness now, on ``(x, y)`` (stacked as the
        training set is); before the last epoch with the BatchNorm statistics of the fold's
        training images (:func:`~tlsearch.training.evaluate.batchnorm_from`), at the last as the
        fold is scored. Stacked folds hold no BatchNorm (``fold_batchable``)."""
        start = self.job.start
        if self.job.stacked:
            ce, right = predictions(self.model, x, y, start=start, stacked=True)
            return list(zip(ce, right, strict=True))
        if self.epochs_trained == self.epochs:
            return [predictions(self.model, x, y, start=start)]
        with batchnorm_from(self.model, self.job.x, start=start):
            return [predictions(self.model, x, y, start=start)]

    def results(self) -> list[BlockNet | DivergedError]:
        """Each fold's trained model, or the divergence that ended it."""
        if self.job.stacked:
            with torch.no_grad():
                for name, value in self.model.named_parameters():
                    for fold, model in enumerate(self.models):
                        model.get_parameter(name).copy_(value[fold])
        return [m if e is None else e for m, e in zip(self.models, self.diverged, strict=True)]

    def forward(self, xb: torch.Tensor, maps: bool = False) -> tuple[torch.Tensor, list]:
        """The logits of a batch entering block ``start`` and, with ``maps``, each block's output
        from there (what data terms read; without one a step runs the logits alone)."""
        if self.job.stacked:
            logits, with_outputs = self._per_fold
            return with_outputs(xb) if maps else (logits(xb), [])
        if maps:
            return block_outputs(self.model, xb, self.job.start)
        return self.model(xb, start=self.job.start), []

    def _block_outputs(self, xb: torch.Tensor) -> list[torch.Tensor]:
        return self.forward(xb, maps=True)[1]

    def _penalty(self) -> Regularizer:
        """4) The trial's penalty over the model's trainable parameters, with its λ (and any
        hyperparameter of its own its registry entry declares)."""
        cfg, params = self.job.recipe.cfg, self.job.recipe.params
        n = self.job.y.shape[-1]
        return create_regularizer(
            params.regularizer,
            self.model,
            self.job.recipe.pretrained,
            params.lambda_,
            hyperparameters=params.hyperparameters,
            head_lambda=cfg.regularizer.head_lambda,
            penalize=cfg.regularizer.penalize,
            scale=1.0 / n if cfg.regularizer.scale == "per_sample" else 1.0,
            stacked=self.job.stacked,
            settings=cfg.regularizer,
        )

    def _data_terms(self) -> list[DataTerm]:
        """4) The terms computed from the batch (DELTA's, BSS), each prepared on the model at its
        start; only where a block trains: otherwise no feature map moves and the head's input is
        fixed, and so is its spectrum."""
        job, params = self.job, self.job.recipe.params
        if params.frozen_blocks == len(self.model.blocks) or params.backbone_lr_mult <= 0:
            return []
        terms = data_terms(self.penalty, job.recipe.cfg.regularizer, params)
        start = Start(
            self.model,
            self._block_outputs,
            job.x,
            job.y,
            params.frozen_blocks - job.start,
            params.frozen_blocks,
            job.seeds,
            job.stacked,
            reference=None if self.augmentation is None else _frozen_outputs(self),
        )
        for term in terms:
            term.prepare(start)
        return terms

    def _warm_up_head(self) -> None:
        """5) Optionally train the new head alone first, so that random head gradients do not
        wreck the pretrained blocks."""
        warmup = self.job.recipe.cfg.finetune.head_warmup_epochs
        if not (warmup and self.backbone):
            return
        for p in self.backbone:
            p.requires_grad_(False)
        optimizer = self._make_optimizer([{"params": self.head}])
        for epoch in range(1, warmup + 1):
            self._train_epoch(optimizer, epoch)
            if self.diverged[0] is not None:
                break
        for p in self.backbone:
            p.requires_grad_(True)

    def _optimizer_groups(self) -> torch.optim.Optimizer | FusedAdam:
        """5) The head, and the unfrozen blocks at ``lr × backbone_lr_mult`` (with 0 they stay
        as they are)."""
        mult = self.job.recipe.params.backbone_lr_mult
        groups: list[dict[str, Any]] = [{"params": self.head}]
        if self.backbone and mult > 0:
            groups.append({"params": self.backbone, "lr": self.job.recipe.params.lr * mult})
        elif self.backbone:
            for p in self.backbone:
                p.requires_grad_(False)
        return self._make_optimizer(groups)

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer | FusedAdam:
        ft, lr = self.job.recipe.cfg.finetune, self.job.recipe.params.lr
        # Fused kernels: one call updates every tensor, instead of a dozen small ops per tensor.
        fused = self.device.type in ("cpu", "cuda")
        if ft.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=ft.momentum, fused=fused)
        return FusedAdam(groups, lr=lr) if fused else torch.optim.Adam(groups, lr=lr)

    def _train_epoch(self, optimizer: torch.optim.Optimizer | FusedAdam, epoch: int) -> None:
        """6) One epoch: minibatches, the loss, its gradient (the penalty's in closed form where
        it has one: added after the backward pass, and evaluated only for the divergence check on
        the epoch's last batch), the step; then each fold's divergence check."""
        n, batch_size = self.job.y.shape[-1], self.job.recipe.cfg.finetune.batch_size
        closed_form = self.penalty.closed_form_grad
        self.model.train()  # whoever watched may have evaluated it
        batches = list(zip(*(minibatches(n, batch_size, g) for g in self.generators), strict=True))
        for i, idx in enumerate(batches):
            loss = self._batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            if closed_form:
                if i == len(batches) - 1:
                    with torch.no_grad():
                        last = loss.detach() + self.penalty()
                loss.sum().backward()
                self.penalty.accumulate_grad_()
            else:
                loss = loss + self.penalty()
                last = loss.detach()
                loss.sum().backward()
            optimizer.step()
        for fold, value in enumerate(last.reshape(-1).tolist()):
            if self.diverged[fold] is None and not math.isfinite(value):
                self.diverged[fold] = DivergedError(
                    f"training loss became {value} in epoch {epoch}"
                )

    def _batch_loss(self, idx: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """6) Each fold's mean cross-entropy on its minibatch (``idx[f]``; None: the whole set),
        plus each data term: one value, or one per fold when stacked."""
        x, y = self.job.x, self.job.y
        rows: Any
        if idx[0] is None:
            rows = slice(None)
        elif not self.job.stacked:
            rows = idx[0].to(x.device)
        else:
            rows = (self._fold_rows, torch.stack(idx).to(x.device))
        xb, yb = x[rows], y[rows]
        if self.augmentation is not None:
            xb, yb = self._augmented(xb, yb)
        logits, outputs = self.forward(xb, maps=bool(self.terms))
        if self.job.stacked:
            target = yb.flatten(0, 1) if yb.is_floating_point() else yb.flatten()
            ce = F.cross_entropy(logits.flatten(0, 1), target, reduction="none")
            value = ce.view(logits.shape[:2]).mean(1)
        else:
            value = F.cross_entropy(logits, yb)
        for term in self.terms:
            if self.augmentation is None:
                value = value + term.batch_term(outputs, rows)
            else:
                value = value + term.batch_term(outputs, None, inputs=xb)
        return value

    def _augmented(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """6) The minibatch augmented, each fold's images from its own generator; its targets
        mixed (soft) where the augmentation mixes labels."""
        aug, recipe = self.augmentation, self.job.recipe
        assert aug is not None
        if aug.mixes_labels:
            yb = F.one_hot(yb, recipe.num_classes).to(xb.dtype)
        if not self.job.stacked:
            images = xb.reshape(len(xb), *recipe.input_shape)
            return aug(images, yb, self.augment_generators[0])
        folds = [
            aug(xf.reshape(len(xf), *recipe.input_shape), yf, g)
            for xf, yf, g in zip(xb, yb, self.augment_generators, strict=True)
        ]
        return torch.stack([x for x, _ in folds]), torch.stack([y for _, y in folds])


class FrozenFeatures:
    """Step 3's cache: the output of the first ``depth`` pretrained blocks on the target's
    training images, computed once per process and depth.

    Frozen blocks run in eval mode (no dropout, fixed BatchNorm statistics), so that output
    depends only on the checkpoint, the depth and the images. ``source`` holds the pretrained
    blocks in eval mode (built on the meta device: no random draw is spent).
    """

    def __init__(
        self,
        cfg: StudyConfig,
        pretrained: Mapping[str, torch.Tensor],
        input_shape: tuple[int, ...],
        num_classes: int,
        x: torch.Tensor,
    ) -> None:
        with torch.device("meta"):
            model = create_model(cfg.model, input_shape, num_classes)
        model.load_state_dict(backbone_state(pretrained, cfg.model), strict=False, assign=True)
        self.source = channels_last(model).eval().requires_grad_(False)
        self.x = x
        self._cache: dict[int, torch.Tensor] = {}

    def at(self, depth: int) -> torch.Tensor:
        """The images as they enter block ``depth`` (0: the images themselves)."""
        if depth == 0:
            return self.x
        if depth not in self._cache:
            with torch.no_grad():
                self._cache[depth] = self.source.features(self.x, stop=depth)
        return self._cache[depth]


def start_model(recipe: Recipe, seed: int, device: torch.device) -> BlockNet:
    """Steps 1-2 for the fold seeded ``seed``: the pretrained blocks, a new head, the first
    ``frozen_blocks`` frozen."""
    cfg = recipe.cfg
    # The new head (and dropout) draw from a stream of their own. Seeded with the bare seed, fold 0
    # (seed 0) would draw the very head the source model started from under pretrain.seed = 0, which
    # the pretrained blocks learned to fit: untrained, that "new" head scored 75 % on mnist-noisy.
    torch.manual_seed(_finetune_seed(seed))
    # 1) the pretrained blocks (keys mapped by the model's registry entry, the head dropped) ...
    model = channels_last(
        create_model(cfg.model, recipe.input_shape, recipe.num_classes).to(device)
    )
    missing, unexpected = model.load_state_dict(
        backbone_state(recipe.pretrained, cfg.model), strict=False
    )
    # ... and a new head sized for the target's classes, the only parameters left unloaded
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    # 2) freeze the first k blocks (their BatchNorm stays in eval mode, see BlockNet.train)
    model.freeze(recipe.params.frozen_blocks)
    return model


def block_outputs(
    model: BlockNet, x: torch.Tensor, start: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits of ``model`` on ``x`` (which enters block ``start``), and the output of each block
    from ``start`` on: the feature maps DELTA compares, the last one the head's input (BSS's)."""
    outputs = []
    for j in range(start, len(model.blocks)):
        x = model.features(x, j, j + 1)
        outputs.append(x)
    return model.head(x), outputs


def _logits(model: BlockNet, x: torch.Tensor, start: int = 0) -> torch.Tensor:
    return model(x, start=start)


def minibatches(
    n: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor | None]:
    """Index tensors of one shuffled epoch; ``None`` once when one batch holds everything."""
    if n <= batch_size:
        yield None
        return
    perm = torch.randperm(n, generator=generator)
    yield from perm.split(batch_size)


def to_tensors(
    x: np.ndarray, y: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def channels_last(model: BlockNet) -> BlockNet:
    """On the CPU, convolution weights (and so activations) in channels-last layout; returns ``model``.

    oneDNN's max-pooling and convolutions run several times faster in that layout than in NCHW; other
    devices keep their default. Values are the same, rounding may differ.

    Not for a model with a strided 1×1 convolution of fewer than 8 input channels (a narrow
    ResNet's projection shortcut): on torch 2.13's CPU kernels its backward pass in channels-last
    layout corrupts the heap or hangs (seen with 1, 2, 3, 4, 6 and 7 input channels; 8, 12 and 16
    run), so such a model stays in NCHW.
    """
    if next(model.parameters()).device.type == "cpu" and not _narrow_strided_1x1(model):
        model.to(memory_format=torch.channels_last)
    return model


def _narrow_strided_1x1(model: torch.nn.Module) -> bool:
    return any(
        isinstance(m, torch.nn.Conv2d)
        and m.kernel_size == (1, 1)
        and max(m.stride) > 1
        and m.in_channels < 8
        for m in model.modules()
    )


def _augmentation(recipe: Recipe) -> Augmentation | None:
    """The trial's augmentation, built with its strength; None without one."""
    params = recipe.params
    if params.augment == "none":
        return None
    return create_augmentation(params.augment, params.hyperparameters)


def _frozen_outputs(trainer: Trainer) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The block outputs of a frozen copy of ``trainer``'s model as it starts, on any inputs
    (each fold's own, stacked): what a data term compares augmented images' maps with."""
    model = copy.deepcopy(trainer.model).eval().requires_grad_(False)
    if trainer.job.stacked:
        run = per_fold(model, partial(block_outputs, start=0))
        return lambda xb: run(xb)[1]
    return lambda xb: block_outputs(model, xb)[1]


def _finetune_seed(seed: int) -> int:
    """The global seed of a fine-tuning run: ``seed`` hashed, far from the small pretraining seeds."""
    return _seed(seed, "finetune")


def _seed(seed: int, what: str) -> int:
    """A seed for ``what`` of the run seeded ``seed``: the two hashed together."""
    digest = hashlib.sha256(f"tlsearch.{what}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
