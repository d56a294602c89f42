"""L2 toward zero (weight decay as a loss term)."""

from __future__ import annotations

import torch

from tlsearch.regularizers.base import Regularizer, add_scaled_, sq_distance

__all__ = ["L2"]


class L2(Regularizer):
    """Weight decay toward zero over backbone and head: ``λ/2 · Σ‖θ‖²``.

    The classic penalty (with ``scale = "per_sample"`` the textbook ``λ/2m · Σθ²``); added to the loss
    rather than folded into the optimizer, so it means the same under Adam and SGD.
    """

    name = "l2"
    closed_form_grad = True

    def forward(self) -> torch.Tensor:
        sq = sq_distance(self.backbone + self.head, None, self.stacked)
        return self.scale * self.lambda_ / 2 * sq

    def accumulate_grad_(self) -> None:
        add_scaled_(self.backbone + self.head, self.scale * self.lambda_, None)
