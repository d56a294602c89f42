"""Mixup: convex combinations of two images and their labels."""

from __future__ import annotations

import torch
from torch import Tensor

from tlsearch.augmentations.base import Augmentation, draw_beta

__all__ = ["Mixup"]


class Mixup(Augmentation):
    """Mixup (Zhang, Cissé, Dauphin & Lopez-Paz, ICLR 2018, "mixup: Beyond Empirical Risk
    Minimization").

    One ``λ ~ Beta(α, α)`` (α = ``mixup``) and one permutation ``π`` of the batch::

        x' = λ·x + (1 − λ)·x[π],   y' = λ·y + (1 − λ)·y[π]

    λ is drawn once per batch, as in the authors' code and timm's default (``mode="batch"``): the
    batch's loss is then exactly the mixup loss of one λ, and a batch of a few images (few-shot
    folds) is not left holding many near-unmixed ones that a per-image λ would give at a small α.
    The targets are soft, ``(B, K)``, each row summing to 1; so do the mixed ones.
    """

    name = "mixup"
    mixes_labels = True
    mixup: float

    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        lam = draw_beta(self.mixup, generator)
        perm = torch.randperm(len(x), generator=generator)
        return mix(x, y, lam, perm)


def mix(x: Tensor, y: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """``λ·x + (1 − λ)·x[π]`` and the same for ``y``, ``π`` moved to each one's device."""
    px, py = perm.to(x.device), perm.to(y.device)
    return lam * x + (1 - lam) * x[px], lam * y + (1 - lam) * y[py]
