"""BSS: shrink the smallest singular values of a batch's features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tlsearch.regularizers.base import DataTerm

if TYPE_CHECKING:
    from tlsearch.config import RegularizerConfig
    from tlsearch.params import TrialParams

__all__ = ["BSS"]


class BSS(nn.Module, DataTerm):
    """Batch Spectral Shrinkage (Chen, Wang, Fu, Long & Wang, NeurIPS 2019, "Catastrophic
    Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe Transfer Learning").

    ``η · Σ_{i=1..k} σ²_{-i}(F)``: the k smallest squared singular values of ``F``, the batch's
    penultimate features (the head's input, one row per sample). Small singular directions are
    where fine-tuning on few labels learns what does not transfer; shrinking them suppresses it.
    It is not a penalty of its own but a term added on top of whichever one is chosen
    (``regularizer.bss_eta``, ``regularizer.bss_k``; registered in
    :data:`tlsearch.registry.TERMS`, where it declares η, ``bss_eta`` in a study, off at 0), and,
    like the cross-entropy it is added to, a function of the batch: it is not multiplied by
    ``regularizer.scale``.

    ``forward`` takes ``(batch, features)``, or ``(folds, batch, features)`` for folds trained
    together (``torch.linalg.svdvals`` is batched), and returns a scalar or one value per fold.
    With fewer samples than features, ``F`` has ``batch`` singular values and the k smallest are
    among those (as in the authors' code, which takes the SVD of ``Fᵀ``).
    """

    def __init__(self, eta: float, k: int = 1) -> None:
        super().__init__()
        assert eta >= 0 and k >= 1, (eta, k)
        self.eta = float(eta)
        self.k = int(k)

    @classmethod
    def from_settings(cls, settings: RegularizerConfig, params: TrialParams) -> BSS | None:
        """The term a trial trains with: η from the trial (searched or fixed), None when 0."""
        eta = params.hyperparameters.get("bss_eta", 0.0)
        return cls(eta, settings.bss_k) if eta > 0 else None

    def batch_term(
        self, outputs: Sequence[torch.Tensor], rows: Any, inputs: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self(outputs[-1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # svdvals, not svd: only the values are needed, and its gradient stays finite where
        # singular values repeat (torch.linalg.svdvals' documentation).
        singular = torch.linalg.svdvals(features)
        return self.eta * singular[..., -self.k :].square().sum(-1)
