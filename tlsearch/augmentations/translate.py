"""Random translation: the standard augmentation of small digit images."""

from __future__ import annotations

import torch
from torch import Tensor

from tlsearch.augmentations.base import Augmentation, background

__all__ = ["Translate"]


class Translate(Augmentation):
    """Random translation by whole pixels, as pad-and-random-crop does (Krizhevsky et al., NeurIPS
    2012, "ImageNet Classification with Deep Convolutional Neural Networks"; He et al.'s CIFAR
    recipe: pad 4, crop 32; timm's ``RandomCrop(padding=...)``), but filled with the image's
    background (:func:`~tlsearch.augmentations.base.background`) instead of zeros.

    Each image is shifted by integers ``(dx, dy)``, each uniform in ``[−m, m]`` with ``m =
    max(1, round(translate · side))`` for its axis (side = W for dx, H for dy)::

        out[c, i, j] = x[c, i − dy, j − dx]   where that pixel exists, the background elsewhere

    so every pixel moves by exactly ``dx`` columns (right when positive) and ``dy`` rows (down).
    ``translate`` is the largest shift as a fraction of the side (28 px at 0.1: up to ±3 px).
    """

    name = "translate"
    maximum = 1.0
    translate: float

    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        dy, dx = (
            torch.randint(-m, m + 1, (b,), generator=generator).to(x.device)
            for m in (max(1, round(self.translate * side)) for side in (h, w))
        )
        # The source of each output pixel: row i − dy, column j − dx; outside the image, none.
        rows = torch.arange(h, device=x.device) - dy[:, None]
        cols = torch.arange(w, device=x.device) - dx[:, None]
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        source = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
        moved = x.flatten(2).gather(2, source.flatten(1)[:, None, :].expand(b, c, h * w))
        return torch.where(inside[:, None], moved.view_as(x), background(x)), y
