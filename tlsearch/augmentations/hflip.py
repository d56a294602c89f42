"""Random horizontal flip."""

from __future__ import annotations

import torch
from torch import Tensor

from tlsearch.augmentations.base import Augmentation

__all__ = ["HorizontalFlip"]


class HorizontalFlip(Augmentation):
    """Random horizontal flip (Krizhevsky et al., NeurIPS 2012; timm's ``--hflip 0.5``).

    Each image, with probability ``hflip``, is mirrored left to right::

        out[c, i, j] = x[c, i, W − 1 − j]

    Only for tasks whose classes survive a mirror image (objects, not digits or letters): the study
    says so (``data.flip_invariant``), the search never adds it on its own.
    """

    name = "hflip"
    maximum = 1.0
    hflip: float

    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        flip = (torch.rand(len(x), generator=generator) < self.hflip).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x), y
