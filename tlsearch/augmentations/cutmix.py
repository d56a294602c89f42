"""CutMix: a box of one image pasted into another, the labels mixed by its area."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tlsearch.augmentations.base import Augmentation, draw_beta

__all__ = ["CutMix"]


class CutMix(Augmentation):
    """CutMix (Yun, Han, Oh, Chun, Choe & Yoo, ICCV 2019, "CutMix: Regularization Strategy to
    Train Strong Classifiers with Localizable Features"), as the authors' code does it.

    One ``λ ~ Beta(α, α)`` (α = ``cutmix``), one permutation ``π`` of the batch and one box, per
    batch: sides ``⌊H·√(1 − λ)⌋``, ``⌊W·√(1 − λ)⌋`` (area ``1 − λ``) around a centre uniform over
    the pixels, each half-side ``⌊side/2⌋``, clipped to the image. Inside the box ``x'`` is
    ``x[π]``, outside it ``x``; the targets are mixed by the box's actual (clipped) area::

        λ' = 1 − box area / (H·W),   y' = λ'·y + (1 − λ')·y[π]
    """

    name = "cutmix"
    mixes_labels = True
    cutmix: float

    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        lam = draw_beta(self.cutmix, generator)
        centre = torch.rand(2, generator=generator, dtype=torch.float64)
        perm = torch.randperm(len(x), generator=generator)
        cut = math.sqrt(1.0 - lam)
        (top, bottom), (left, right) = (
            (max(c - half, 0), min(c + half, side))
            for c, half, side in (
                (int(centre[0] * h), int(h * cut) // 2, h),
                (int(centre[1] * w), int(w * cut) // 2, w),
            )
        )
        out = x.clone()
        out[:, :, top:bottom, left:right] = x[perm.to(x.device), :, top:bottom, left:right]
        kept = 1.0 - (bottom - top) * (right - left) / (h * w)
        py = perm.to(y.device)
        return out, kept * y + (1 - kept) * y[py]
