"""Networks as blocks plus a head, built by name from :data:`tlsearch.registry.MODELS`; several
folds' models stacked into one (:mod:`~tlsearch.models.stacked`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from tlsearch.models.blocknet import BlockNet, cnn, mlp
from tlsearch.models.stacked import fold_batchable, per_fold, stack_models
from tlsearch.registry import MODELS

if TYPE_CHECKING:
    from tlsearch.config import ModelConfig

__all__ = [
    "BlockNet",
    "backbone_state",
    "cnn",
    "create_model",
    "fold_batchable",
    "mlp",
    "per_fold",
    "stack_models",
]

HEAD = "head."


def create_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> BlockNet:
    """Build the model ``cfg`` names with its options; an unknown name is a ConfigError."""
    return MODELS.create(cfg.name, input_shape, num_classes, **cfg.options)


def backbone_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's blocks without its head, under the model's own parameter names.

    The model's registry entry maps a checkpoint saved under another naming (its key adapter);
    the head is dropped, since the target task has classes of its own.
    """
    adapted = MODELS.get(cfg.name).adapt_keys(dict(state))
    return {k: v for k, v in adapted.items() if not k.startswith(HEAD)}
