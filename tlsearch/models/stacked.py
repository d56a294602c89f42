"""Several folds' models as one: parameters stacked along a leading fold dimension, run with vmap.

:func:`stack_models` builds the stacked model; :func:`per_fold` runs any function of a model and an
input for every fold at once (``torch.func.vmap`` over ``functional_call``). Used by the folds
trained together (:class:`tlsearch.training.trainer.Trainer` with several seeds), their
evaluation, and DELTA's channel attention (:mod:`tlsearch.regularizers.delta`).
:func:`fold_batchable` says whether a model's trained blocks can be stacked so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tlsearch.models.blocknet import BlockNet

__all__ = ["fold_batchable", "per_fold", "stack_models"]


def fold_batchable(model: BlockNet, frozen_blocks: int) -> bool:
    """Whether the blocks after the first ``frozen_blocks`` are free of BatchNorm and dropout.

    Those are what stacked folds cannot train: BatchNorm updates running statistics in place and
    dropout draws from the global random stream, which a vmap over folds does not reproduce.
    Frozen blocks run in eval mode and do not count.
    """
    for block in model.blocks[frozen_blocks:]:
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return False
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return False
    return True


def stack_models(models: Sequence[BlockNet]) -> BlockNet:
    """A copy of ``models[0]`` whose parameters hold every model's, along a new leading dimension."""
    stacked = copy.deepcopy(models[0])
    for name, p in models[0].named_parameters():
        owner, _, attr = name.rpartition(".")
        value = torch.stack([m.get_parameter(name).detach() for m in models])
        setattr(stacked.get_submodule(owner), attr, nn.Parameter(value, p.requires_grad))
    return stacked


def per_fold(model: BlockNet, fn: Callable[[BlockNet, torch.Tensor], Any]) -> Callable[..., Any]:
    """``fn(model_f, x_f)`` for every fold f of the stacked ``model`` at once: a ``torch.func.vmap``
    over the leading fold dimension of its parameters and of the input.

    The stacked leaves themselves are handed over, so the optimizer's in-place updates show in
    every later call.
    """
    module = _Call(model, fn)
    params = {f"model.{name}": p for name, p in model.named_parameters()}
    run = torch.func.vmap(lambda p, xb: torch.func.functional_call(module, p, (xb,)))
    return lambda x: run(params, x)


class _Call(nn.Module):
    """``fn(model, x)`` as a module's forward, for ``functional_call`` (which calls a module's
    forward); its parameters are ``model.<name>``."""

    def __init__(self, model: BlockNet, fn: Callable[[BlockNet, torch.Tensor], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self.model, x)
