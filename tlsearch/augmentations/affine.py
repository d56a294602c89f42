"""Small random affine transformations: rotation, scale and shear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tlsearch.augmentations.base import Augmentation, background

__all__ = ["Affine"]

# At strength 1: the largest rotation and shear (degrees) and the largest change of scale.
ROTATION, SHEAR, SCALE = 60.0, 30.0, 0.5


class Affine(Augmentation):
    """Random affine transformation (Simard, Steinkraus & Platt, ICDAR 2003, "Best Practices for
    Convolutional Neural Networks Applied to Visual Document Analysis"; timm's and torchvision's
    ``RandomAffine(degrees, scale, shear)``), resampled with ``affine_grid`` + ``grid_sample``
    (bilinear, ``align_corners=False``) and filled with the image's background
    (:func:`~tlsearch.augmentations.base.background`).

    Each image draws, at strength ``s`` = ``affine``, a rotation ``θ ~ U(±60°·s)``, a scale ``σ ~
    U(1 ± s/2)`` and a shear ``φ ~ U(±30°·s)`` (along the rows), about the image's centre. In
    pixel coordinates centred on it, the image's content moves by ``A = R(θ)·Sh(φ)·σ``, so each
    output pixel ``p`` takes the input at::

        A⁻¹·p = (1/σ) · [[1, −tan φ], [0, 1]] · [[cos θ, sin θ], [−sin θ, cos θ]] · p

    (``affine_grid`` takes that map in coordinates normalized to ±1 per axis: ``D⁻¹·A⁻¹·D``, D =
    diag(W/2, H/2), so a non-square image turns without stretching). Outside the image it samples
    the background: ``grid_sample(x − background) + background``.
    """

    name = "affine"
    maximum = 1.0
    affine: float

    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        u = 2 * torch.rand(b, 3, generator=generator, dtype=torch.float64) - 1  # U(−1, 1)
        s = self.affine
        theta, shear = (
            torch.deg2rad(u[:, i] * most * s) for i, most in ((0, ROTATION), (1, SHEAR))
        )
        scale = 1 + u[:, 2] * SCALE * s
        cos, sin, tan = theta.cos(), theta.sin(), shear.tan()
        # A⁻¹ = (1/σ)·Sh⁻¹·R⁻¹ in normalized coordinates, D⁻¹·A⁻¹·D: entry (i, j) times D_j/D_i.
        matrix = torch.zeros(b, 2, 3, dtype=torch.float64)
        matrix[:, 0, 0] = (cos + tan * sin) / scale
        matrix[:, 0, 1] = (sin - tan * cos) / scale * h / w
        matrix[:, 1, 0] = -sin / scale * w / h
        matrix[:, 1, 1] = cos / scale
        grid = F.affine_grid(matrix.to(x.device, x.dtype), list(x.shape), align_corners=False)
        bg = background(x)
        moved = F.grid_sample(
            x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return moved + bg, y
