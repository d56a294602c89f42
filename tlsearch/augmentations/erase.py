"""Random erasing."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tlsearch.augmentations.base import Augmentation, background

__all__ = ["Erase"]

# The erased share of the image's area, and the log-uniform aspect ratio (height / width):
# Zhong et al.'s aspect range; an area between 4 and 25 % (theirs 2-40 %, timm's 2-33 %) so that
# a digit of 28 px is never mostly gone.
AREA = (0.04, 0.25)
ASPECT = (0.3, 3.3)


class Erase(Augmentation):
    """Random erasing (Zhong, Zheng, Kang, Li & Yang, AAAI 2020, "Random Erasing Data
    Augmentation"; timm's ``RandomErasing``), filled with the image's background
    (:func:`~tlsearch.augmentations.base.background`) rather than noise: what an occluder in the
    data looks like.

    Each image, with probability ``erase``, gets one rectangle of area ``S = s·H·W``, ``s ~ U(0.04,
    0.25)``, and aspect ratio ``r``, ``log r ~ U(log 0.3, log 3.3)``::

        h = round(√(S·r)),  w = round(√(S/r)),  top ~ U{0..H−h},  left ~ U{0..W−w}
        out[c, i, j] = background[c]   for top ≤ i < top + h, left ≤ j < left + w

    The paper draws again when the rectangle does not fit; here a side is cut to the image's
    instead (a square image never needs it: √(0.25 · 3.3) < 1), so every image draws the same
    five numbers.
    """

    name = "erase"
    maximum = 1.0
    erase: float

    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        u = torch.rand(b, 5, generator=generator, dtype=torch.float64)
        erased = u[:, 0] < self.erase
        area = (AREA[0] + (AREA[1] - AREA[0]) * u[:, 1]) * h * w
        aspect = torch.exp(math.log(ASPECT[0]) + math.log(ASPECT[1] / ASPECT[0]) * u[:, 2])
        height = (area * aspect).sqrt().round().clamp(1, h).long()
        width = (area / aspect).sqrt().round().clamp(1, w).long()
        top = (u[:, 3] * (h - height + 1)).long()
        left = (u[:, 4] * (w - width + 1)).long()
        box = [t.to(x.device) for t in (erased, top, height, left, width)]
        mask = _box_mask(*box, h, w)
        return torch.where(mask[:, None], background(x), x), y


def _box_mask(
    on: Tensor, top: Tensor, height: Tensor, left: Tensor, width: Tensor, h: int, w: int
) -> Tensor:
    """``(B, H, W)``: True inside each image's rectangle, where ``on``."""
    rows = torch.arange(h, device=on.device)
    cols = torch.arange(w, device=on.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None]
