"""No penalty: plain fine-tuning."""

from __future__ import annotations

import torch

from tlsearch.regularizers.base import Regularizer

__all__ = ["NoPenalty"]


class NoPenalty(Regularizer):
    """No penalty: plain fine-tuning (λ is ignored)."""

    name = "none"
    closed_form_grad = True

    def forward(self) -> torch.Tensor:
        return torch.zeros(())

    def accumulate_grad_(self) -> None:
        pass
