"""L2-SP: toward the pretrained starting point."""

from __future__ import annotations

import torch

from tlsearch.regularizers.base import Regularizer, add_scaled_, sq_distance

__all__ = ["L2SP"]


class L2SP(Regularizer):
    """L2-SP (Li, Grandvalet & Davoine, ICML 2018, "Explicit inductive bias for transfer learning").

    ``α/2 · ‖w_S − w_S⁰‖² + β/2 · ‖w_head‖²``: the transferred weights ``w_S`` are pulled toward their
    pretrained values ``w_S⁰`` (α = the searched λ), the new head toward zero (β = ``head_lambda``).
    """

    name = "l2sp"
    closed_form_grad = True

    def forward(self) -> torch.Tensor:
        sp = sq_distance(self.backbone, self.backbone_refs, self.stacked)
        head = sq_distance(self.head, None, self.stacked)
        return self.scale * (self.lambda_ / 2 * sp + self.head_lambda / 2 * head)

    def accumulate_grad_(self) -> None:
        add_scaled_(self.backbone, self.scale * self.lambda_, self.backbone_refs)
        add_scaled_(self.head, self.scale * self.head_lambda, None)
