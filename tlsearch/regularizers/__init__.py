"""Penalties that pull fine-tuned weights toward zero or toward the pretrained starting point, or
(DELTA) the trained blocks' feature maps toward the pretrained ones; and BSS, added on top of any.

One file per penalty; each is registered by name in :data:`tlsearch.registry.REGULARIZERS`.
See :mod:`tlsearch.regularizers.base` for the convention every penalty follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tlsearch.models import BlockNet
from tlsearch.registry import REGULARIZERS
from tlsearch.regularizers.base import Regularizer
from tlsearch.regularizers.bss import BSS
from tlsearch.regularizers.delta import Delta
from tlsearch.regularizers.l2 import L2
from tlsearch.regularizers.l2sp import L2SP
from tlsearch.regularizers.none import NoPenalty

__all__ = ["BSS", "L2", "L2SP", "Delta", "NoPenalty", "Regularizer", "create_regularizer"]


def create_regularizer(
    name: str,
    model: BlockNet,
    pretrained: Mapping[str, torch.Tensor],
    lambda_: float,
    **options: Any,
) -> Regularizer:
    """The penalty registered as ``name`` over ``model``'s trainable parameters; ``options`` are
    :class:`~tlsearch.regularizers.base.Regularizer`'s keywords (``head_lambda``, ``penalize``,
    ``scale``, ``stacked``; DELTA also takes ``attention``)."""
    return REGULARIZERS.create(name, model, pretrained, lambda_, **options)
