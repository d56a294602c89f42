"""Scoring a fold's model on held-out images: the trainer's step 7 and a fold's final score.

:func:`predictions` gives each image's cross-entropy and whether it was right (what a trial
records image by image, :mod:`tlsearch.evidence`); :func:`evaluate` the accuracy and mean loss
(``tlsearch final``'s test score); :func:`batchnorm_from` the model with its training BatchNorm
statistics recomputed, for a curve point before the last epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tlsearch.models import BlockNet, per_fold

__all__ = ["Held", "batchnorm_from", "evaluate", "predictions"]

# A fold's held-out images: each one's cross-entropy, and whether the model got it right.
Held = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def evaluate(
    model: BlockNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096, *, start: int = 0
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)`` (``x`` enters block ``start``)."""
    model.eval()
    correct, loss = 0, 0.0
    for first in range(0, len(y), batch_size):
        logits = model(x[first : first + batch_size], start=start)
        yb = y[first : first + batch_size]
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), loss / len(y)


@torch.no_grad()
def predictions(
    model: BlockNet,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 4096,
    *,
    start: int = 0,
    stacked: bool = False,
) -> Held:
    """Each sample's cross-entropy (minus the log-probability of its true class) and whether the
    model got it right; ``x`` enters block ``start``.

    ``stacked``: ``model`` holds several folds' models (a stacked
    :class:`~tlsearch.training.trainer.Trainer`'s), ``x`` is ``(folds, n, ...)`` and ``y``
    ``(folds, n)``; so are the results.
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


@contextmanager
def batchnorm_from(model: BlockNet, x: torch.Tensor, *, start: int = 0) -> Iterator[BlockNet]:
    """``model`` with the running statistics of its training BatchNorm layers recomputed on ``x``
    (its training images, entering block ``start``: one pass, a plain average), restored after
    the block; ``model`` as it was where no BatchNorm trains.

    A curve point before the last epoch is scored so: a few-label fold takes one or two steps an
    epoch, and running averages (momentum 0.1 a step) lag dozens of steps behind the weights, so
    held-out scores taken with them ranked the ResNet example's trials at epoch 5 by how little
    their BatchNorm had moved, not by how well they would end.
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
