"""Fine-tuning of one fold, read top to bottom (:func:`finetune`, steps 1-6).

Data stays in device tensors: a few-label target set fits many times over, and slicing a tensor costs
far less than a per-sample ``DataLoader``.

Two fast paths give the plain path's models, up to float rounding:

* ``start = k``: the input is the output of the first k blocks, computed once (frozen blocks run in eval
  mode, so that output depends only on the checkpoint, k and the data); training never runs them again.
* :func:`tlsearch.training.together.finetune_folds` trains the models of several folds at once, through
  the same steps (:func:`start_model`, :func:`fit`).

The loss of a step is :func:`batch_loss` plus the penalty's weight term. :func:`batch_loss` is the
mean cross-entropy plus the *data terms* (:class:`~tlsearch.regularizers.base.DataTerm`: DELTA's
distance between feature maps, BSS on the head's input), whatever they are: the loop prepares each
once per fold and adds each in every step, and names none. A :data:`Forward` runs the blocks keeping
their outputs only when a data term reads them: with L2 or L2-SP and no BSS a step is what it was
before data terms existed. The fast paths work for both (the cache: blocks below ``start`` are
frozen, so their outputs are the pretrained ones and DELTA skips them). The closed-form gradient
(``Regularizer.accumulate_grad_``) covers only weight terms; data terms always backpropagate.
A :class:`Run` trains step 5 one epoch at a time, so that a trial can watch its folds' learning
curves, train several folds in turn and stop early.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tlsearch.config import StudyConfig
from tlsearch.device import rebalance
from tlsearch.errors import DivergedError
from tlsearch.models import BlockNet, backbone_state, create_model, per_fold
from tlsearch.params import TrialParams
from tlsearch.regularizers import DataTerm, Regularizer, Start, create_regularizer, data_terms
from tlsearch.training.adam import FusedAdam

__all__ = [
    "BatchLoss",
    "Forward",
    "Recipe",
    "Run",
    "batch_loss",
    "batchnorm_from",
    "block_outputs",
    "channels_last",
    "evaluate",
    "finetune",
    "fit",
    "fold_run",
    "minibatches",
    "predictions",
    "start_model",
    "to_tensors",
]

# Maps each fold's minibatch indices (None: the whole set) to its mean cross-entropy plus the data
# terms (see batch_loss), one value per fold when the folds are stacked.
BatchLoss = Callable[[tuple[torch.Tensor | None, ...]], torch.Tensor]
# Runs the model from block ``start`` on a batch: the logits and, when asked (the bool), the output
# of each block it ran (block_outputs); stacked, everything carries the fold dimension first.
Forward = Callable[[torch.Tensor, bool], tuple[torch.Tensor, list[torch.Tensor]]]
# Per fold: the divergence that ended its training, or None.
Diverged = list[DivergedError | None]


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
    """Fine-tune a copy of the pretrained model on ``(x, y)``; the pretrained state is not changed.

    With ``start = k`` (at most ``params.frozen_blocks``), ``x`` holds the output of the first k blocks
    (``BlockNet.features(x, stop=k)`` of the pretrained model in eval mode), which are then never run.
    Raises :class:`DivergedError` when the training loss becomes NaN or infinite. Step 6, the score,
    is :func:`evaluate` (or :func:`predictions`, image by image) on the held-out samples.
    :func:`fold_run` is the same, epoch by epoch.
    """
    recipe = Recipe(pretrained, cfg, params, num_classes, input_shape)
    run = fold_run(recipe, x, y, seed, start=start)
    run.finish()
    (result,) = run.results()
    if isinstance(result, DivergedError):
        raise result
    return result


@dataclass(frozen=True)
class Recipe:
    """What a trial's folds fine-tune and how: the pretrained state, the study, the trial's
    parameters, and the target's classes and input shape (what differs by fold: its data, seed)."""

    pretrained: Mapping[str, torch.Tensor]
    cfg: StudyConfig
    params: TrialParams
    num_classes: int
    input_shape: tuple[int, ...]

    def start(self, seed: int, device: torch.device) -> BlockNet:
        """Steps 1-3 (:func:`start_model`) for the fold seeded ``seed``."""
        return start_model(
            self.pretrained,
            self.cfg,
            self.params,
            self.num_classes,
            self.input_shape,
            seed,
            device,
        )


def fold_run(
    recipe: Recipe, x: torch.Tensor, y: torch.Tensor, seed: int, *, start: int = 0
) -> Run:
    """:func:`finetune` as a :class:`Run`: the model at its start, trained one epoch per step."""
    params = recipe.params
    assert 0 <= start <= params.frozen_blocks, (start, params.frozen_blocks)
    # 1-3) load the pretrained blocks, a new head for the target's classes, freeze the first k
    model = recipe.start(seed, x.device)

    def forward(xb: torch.Tensor, maps: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return block_outputs(model, xb, start) if maps else (model(xb, start=start), [])

    # 4-5) warm up the head, then train with the penalty, one epoch per step of the run
    generator = torch.Generator().manual_seed(seed)
    diverged: Diverged = [None]
    epochs = fit(
        model,
        recipe.cfg,
        params,
        recipe.pretrained,
        forward,
        x,
        y,
        start,
        [generator],
        False,
        diverged,
    )
    return Run(model, epochs, diverged, lambda: [model])


class Run:
    """A model (or several folds' stacked) training, one epoch of step 5 per :meth:`step`.

    Runs of several folds may advance in turn, epoch by epoch: each keeps the global random
    stream (dropout's) as it left it, so a fold trains as it would alone. A run whose first epoch
    drew nothing from that stream (no dropout: :attr:`draws` is False) has nothing to keep, and
    may advance on another thread beside other runs (:class:`~tlsearch.training.lanes.Lanes`).
    """

    def __init__(
        self,
        model: BlockNet,
        epochs: Iterator[int],
        diverged: Diverged,
        models: Callable[[], list[BlockNet]],
    ) -> None:
        self.model = model
        self.diverged = diverged
        self.epoch = 0
        self._epochs = epochs
        self._models = models
        self._rng = _rng_state(model)
        self.done = False
        # Whether its first epoch drew from the global random stream (None: not trained yet).
        self.draws: bool | None = None

    def step(self) -> bool:
        """Train one more epoch; False when there was none left (or a fold diverged)."""
        if self.done:
            return False
        if self.draws is False:
            return self._advance()
        outside = _rng_state(self.model)
        _set_rng_state(self.model, self._rng)
        try:
            return self._advance()
        finally:
            state = _rng_state(self.model)
            if self.draws is None:
                self.draws = not all(map(_same_state, state, self._rng))
            self._rng = state
            _set_rng_state(self.model, outside)

    def _advance(self) -> bool:
        try:
            self.epoch = next(self._epochs)
        except StopIteration:
            self.done = True
        return not self.done

    def finish(self) -> None:
        """Train to the end."""
        while self.step():
            pass

    def results(self) -> list[BlockNet | DivergedError]:
        """Each fold's trained model, or the divergence that ended it."""
        return [m if e is None else e for m, e in zip(self._models(), self.diverged, strict=True)]


def _rng_state(model: BlockNet) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = next(model.parameters()).device
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _same_state(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _set_rng_state(model: BlockNet, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], next(model.parameters()).device)


def start_model(
    pretrained: Mapping[str, torch.Tensor],
    cfg: StudyConfig,
    params: TrialParams,
    num_classes: int,
    input_shape: tuple[int, ...],
    seed: int,
    device: torch.device,
) -> BlockNet:
    """Steps 1-3: the pretrained blocks, a new head, the first ``frozen_blocks`` frozen."""
    # The new head (and dropout) draw from a stream of their own. Seeded with the bare seed, fold 0
    # (seed 0) would draw the very head the source model started from under pretrain.seed = 0, which
    # the pretrained blocks learned to fit: untrained, that "new" head scored 75 % on mnist-noisy.
    torch.manual_seed(_finetune_seed(seed))
    # 1) the pretrained blocks (keys mapped by the model's registry entry, the head dropped) ...
    model = channels_last(create_model(cfg.model, input_shape, num_classes).to(device))
    missing, unexpected = model.load_state_dict(
        backbone_state(pretrained, cfg.model), strict=False
    )
    # 2) ... and a new head sized for the target's classes, the only parameters left unloaded
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    # 3) freeze the first k blocks (their BatchNorm stays in eval mode, see BlockNet.train)
    model.freeze(params.frozen_blocks)
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


def fit(
    model: BlockNet,
    cfg: StudyConfig,
    params: TrialParams,
    pretrained: Mapping[str, torch.Tensor],
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    start: int,
    generators: Sequence[torch.Generator],
    stacked: bool,
    diverged: Diverged,
) -> Iterator[int]:
    """Steps 4-5 for one model, or for the stacked models of several folds (one generator each),
    yielding after each epoch of step 5 its number (from 1): a :class:`Run` advances it.

    ``model`` is at its starting point (:func:`start_model`); ``forward`` runs it on inputs that
    enter block ``start``; ``x`` and ``y`` are the training set (stacked: ``(folds, n, ...)``).
    ``diverged`` gets each fold's divergence; training ends at the first.
    """
    ft = cfg.finetune
    n = y.shape[-1]
    # The penalty, over the parameters that will train; λ enters here.
    scale = 1.0 / n if cfg.regularizer.scale == "per_sample" else 1.0
    penalty = create_regularizer(
        params.regularizer,
        model,
        pretrained,
        params.lambda_,
        head_lambda=cfg.regularizer.head_lambda,
        penalize=cfg.regularizer.penalize,
        scale=scale,
        stacked=stacked,
        settings=cfg.regularizer,
    )
    # The terms computed from the batch (DELTA's, BSS), only where a block trains: otherwise no
    # feature map moves and the head's input is fixed, and so is its spectrum.
    trains = params.frozen_blocks < len(model.blocks) and params.backbone_lr_mult > 0
    terms = data_terms(penalty, cfg.regularizer, params) if trains else []
    # Each fold's own seed (its minibatch generator's), for what a term draws (DELTA's head).
    seeds = [g.initial_seed() for g in generators]
    outputs = lambda xb: forward(xb, True)[1]  # noqa: E731 - what a term's prepare() runs
    begin = Start(
        model, outputs, x, y, params.frozen_blocks - start, params.frozen_blocks, seeds, stacked
    )
    loss = batch_loss(forward, x, y, terms, begin, stacked)
    head = list(model.head.parameters())
    backbone = [p for p in model.blocks.parameters() if p.requires_grad]

    def train(groups: list[dict[str, Any]], epochs: int) -> Iterator[int]:
        optimizer = _optimizer(groups, ft.optimizer, params.lr, ft.momentum, model)
        return _train_epochs(
            model, optimizer, loss, penalty, n, epochs, ft.batch_size, generators, diverged
        )

    # 4) optionally warm up the new head alone, so random head gradients do not wreck the backbone
    if ft.head_warmup_epochs and backbone:
        for p in backbone:
            p.requires_grad_(False)
        for _ in train([{"params": head}], ft.head_warmup_epochs):
            pass
        for p in backbone:
            p.requires_grad_(True)
        if diverged[0] is not None:
            return

    # 5) fine-tune head and unfrozen blocks with the penalty, the blocks at lr × backbone_lr_mult
    groups = [{"params": head}]
    if backbone and params.backbone_lr_mult > 0:
        groups.append({"params": backbone, "lr": params.lr * params.backbone_lr_mult})
    elif backbone:
        for p in backbone:
            p.requires_grad_(False)
    yield from train(groups, ft.epochs)


def batch_loss(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    terms: Sequence[DataTerm],
    start: Start,
    stacked: bool,
) -> BatchLoss:
    """Each fold's mean cross-entropy on its minibatch, plus each of ``terms``
    (:class:`~tlsearch.regularizers.base.DataTerm`), prepared here with the model at its ``start``.

    Stacked, ``x`` and ``y`` are ``(folds, n, ...)`` and fold f takes its own rows. Without terms
    a step runs the model for its logits alone: with L2 or L2-SP and no BSS a step is what it was
    before data terms existed.
    """
    for term in terms:
        term.prepare(start)
    maps = bool(terms)
    rows = torch.arange(len(x), device=x.device)[:, None] if stacked else None

    def loss(idx: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        # The rows of the batch: fold f's indices idx[f] (stacked, in fold f's own rows).
        if idx[0] is None:
            rows_of: Any = slice(None)
        elif rows is None:
            rows_of = idx[0].to(x.device)
        else:
            rows_of = (rows, torch.stack(idx).to(x.device))
        yb = y[rows_of]
        logits, outputs = forward(x[rows_of], maps)
        if rows is None:
            value = F.cross_entropy(logits, yb)
        else:
            ce = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
            value = ce.view(yb.shape).mean(1)
        for term in terms:
            value = value + term.batch_term(outputs, rows_of)
        return value

    return loss


@torch.no_grad()
def evaluate(
    model: BlockNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096, *, start: int = 0
) -> tuple[float, float]:
    """Step 6: accuracy and mean cross-entropy of ``model`` on ``(x, y)`` (``x`` enters block
    ``start``)."""
    model.eval()
    correct, loss = 0, 0.0
    for first in range(0, len(y), batch_size):
        logits = model(x[first : first + batch_size], start=start)
        yb = y[first : first + batch_size]
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), loss / len(y)


@contextmanager
def batchnorm_from(model: BlockNet, x: torch.Tensor, *, start: int = 0) -> Iterator[BlockNet]:
    """``model`` with the running statistics of its training BatchNorm layers recomputed on ``x``
    (its training images, entering block ``start``: one pass, a plain average), restored after
    the block; ``model`` as it was where no BatchNorm trains.

    A curve point before the last epoch is scored so (:class:`Run` callers): a few-label fold
    takes one or two steps an epoch, and running averages (momentum 0.1 a step) lag dozens of
    steps behind the weights, so held-out scores taken with them ranked the ResNet example's
    trials at epoch 5 by how little their BatchNorm had moved, not by how well they would end.
    """
    model.train()  # which layers train: a frozen block's BatchNorm stays in eval mode
    layers = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
    ]
    if not layers:
        yield model
        return
    kept = [
        (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the pass
            m.train()
        with torch.no_grad():
            for first in range(0, len(x), 256):
                model(x[first : first + 256], start=start)
        model.eval()
        yield model
    finally:
        for m, (momentum, mean, var, count) in zip(layers, kept, strict=True):
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)


@torch.no_grad()
def predictions(
    model: BlockNet,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 4096,
    *,
    start: int = 0,
    stacked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6 image by image: each sample's cross-entropy (minus the log-probability of its true
    class) and whether the model got it right; ``x`` enters block ``start``.

    ``stacked``: ``model`` holds several folds' models (a :class:`Run` of
    :func:`~tlsearch.training.folds_run`), ``x`` is ``(folds, n, ...)`` and ``y`` ``(folds, n)``;
    so are the results.
    """
    model.eval()
    if stacked:
        logits = per_fold(model, lambda m, xb: m(xb, start=start))(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return ce.view(y.shape), logits.argmax(-1) == y
    losses, right = [], []
    for first in range(0, len(y), batch_size):
        logits = model(x[first : first + batch_size], start=start)
        yb = y[first : first + batch_size]
        losses.append(F.cross_entropy(logits, yb, reduction="none"))
        right.append(logits.argmax(1) == yb)
    return torch.cat(losses), torch.cat(right)


def _optimizer(
    groups: list[dict[str, Any]], name: str, lr: float, momentum: float, model: BlockNet
) -> torch.optim.Optimizer | FusedAdam:
    # Fused kernels: one optimizer call updates every tensor, instead of a dozen small ops per tensor.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    if fused:
        return FusedAdam(groups, lr=lr)
    return torch.optim.Adam(groups, lr=lr)


def _train_epochs(
    model: BlockNet,
    optimizer: torch.optim.Optimizer | FusedAdam,
    batch_loss: BatchLoss,
    penalty: Regularizer,
    n: int,
    epochs: int,
    batch_size: int,
    generators: Sequence[torch.Generator],
    diverged: Diverged,
) -> Iterator[int]:
    """Train for ``epochs``, yielding each epoch's number (from 1) after it; one generator per
    fold draws that fold's minibatch order.

    The training loss is ``batch_loss`` plus ``penalty``. A penalty with a closed-form gradient adds
    it to ``.grad`` after the backward pass and is evaluated only for the divergence check, on the
    last batch of each epoch; any other is part of the loss that backpropagates. A fold whose
    training loss becomes NaN/inf is noted in ``diverged``; training stops once the first fold
    diverged, since the folds are scored in order and the trial ends there.
    """
    closed_form = penalty.closed_form_grad
    model.train()
    for epoch in range(epochs):
        rebalance()  # the process's thread policy, re-checked at most every second
        batches = list(zip(*(minibatches(n, batch_size, g) for g in generators), strict=True))
        for i, idx in enumerate(batches):
            loss = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            if closed_form:
                if i == len(batches) - 1:
                    with torch.no_grad():
                        last = loss.detach() + penalty()
                loss.sum().backward()
                penalty.accumulate_grad_()
            else:
                loss = loss + penalty()
                last = loss.detach()
                loss.sum().backward()
            optimizer.step()
        for fold, value in enumerate(last.reshape(-1).tolist()):
            if diverged[fold] is None and not math.isfinite(value):
                diverged[fold] = DivergedError(
                    f"training loss became {value} in epoch {epoch + 1}"
                )
        if diverged[0] is not None:
            return
        yield epoch + 1
        model.train()  # whoever watched may have evaluated it


def to_tensors(
    x: np.ndarray, y: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def minibatches(
    n: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor | None]:
    """Index tensors of one shuffled epoch; ``None`` once when one batch holds everything."""
    if n <= batch_size:
        yield None
        return
    perm = torch.randperm(n, generator=generator)
    yield from perm.split(batch_size)


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


def _finetune_seed(seed: int) -> int:
    """The global seed of a fine-tuning run: ``seed`` hashed, far from the small pretraining seeds."""
    digest = hashlib.sha256(f"tlsearch.finetune:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
