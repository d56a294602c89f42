"""Penalties that pull fine-tuned weights toward zero or toward the pretrained starting point.

One file per penalty; each is registered by name in :data:`tlsearch.registry.REGULARIZERS`.
See :mod:`tlsearch.regularizers.base` for the convention every penalty follows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tlsearch.models import BlockNet
from tlsearch.registry import REGULARIZERS
from tlsearch.regularizers.base import Regularizer
from tlsearch.regularizers.l2 import L2
from tlsearch.regularizers.l2sp import L2SP
from tlsearch.regularizers.none import NoPenalty

__all__ = ["L2", "L2SP", "NoPenalty", "Regularizer", "create_regularizer"]


def create_regularizer(
    name: str,
    model: BlockNet,
    pretrained: Mapping[str, torch.Tensor],
    lambda_: float,
    head_lambda: float = 0.0,
    penalize: str = "weights",
    scale: float = 1.0,
    stacked: bool = False,
) -> Regularizer:
    """The penalty registered as ``name`` over ``model``'s trainable parameters."""
    return REGULARIZERS.create(
        name,
        model,
        pretrained,
        lambda_,
        head_lambda=head_lambda,
        penalize=penalize,
        scale=scale,
        stacked=stacked,
    )
