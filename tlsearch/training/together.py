"""Folds trained together: the models of several folds in one, one ``vmap`` step for all.

Their parameters are stacked along a leading fold dimension and one ``torch.func.vmap`` over
``functional_call`` runs every fold in each step. Adam and SGD update each element on its own, so one
optimizer over the stacked tensors is k independent ones; each fold keeps its seed, hence its head
initialisation and its minibatch order. The result is what :func:`~tlsearch.training.fold.finetune`
gives for each fold, up to float rounding. The vmapped forward returns the blocks' outputs too when
a data term reads them (DELTA, BSS: ``torch.linalg.svdvals`` is batched over folds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tlsearch.config import StudyConfig
from tlsearch.errors import DivergedError
from tlsearch.models import BlockNet, per_fold, stack_models
from tlsearch.params import TrialParams
from tlsearch.training.fold import Forward, Recipe, Run, block_outputs, fit

__all__ = ["finetune_folds", "fold_batchable", "folds_run"]


def fold_batchable(model: BlockNet, frozen_blocks: int) -> bool:
    """Whether the blocks after the first ``frozen_blocks`` are free of BatchNorm and dropout.

    Those are what :func:`finetune_folds` cannot batch: BatchNorm updates running statistics in place
    and dropout draws from the global random stream, which a vmap over folds does not reproduce.
    Frozen blocks run in eval mode and do not count.
    """
    for block in model.blocks[frozen_blocks:]:
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return False
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return False
    return True


def finetune_folds(
    pretrained: Mapping[str, torch.Tensor],
    cfg: StudyConfig,
    params: TrialParams,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
    seeds: Sequence[int],
    *,
    start: int = 0,
) -> list[BlockNet | DivergedError]:
    """Fine-tune one model per fold at once: what :func:`finetune` gives for each, up to rounding.

    ``x`` is ``(folds, n, ...)`` and ``y`` is ``(folds, n)``: every fold trains on the same number of
    samples, so all take the same steps. ``seeds[f]`` is fold f's seed. The models must be
    :func:`fold_batchable`. Returns each fold's model, or the :class:`DivergedError` that ended it.
    :func:`folds_run` is the same, epoch by epoch.
    """
    recipe = Recipe(pretrained, cfg, params, num_classes, input_shape)
    run = folds_run(recipe, x, y, seeds, start=start)
    run.finish()
    return run.results()


def folds_run(
    recipe: Recipe, x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int], *, start: int = 0
) -> Run:
    """:func:`finetune_folds` as a :class:`~tlsearch.training.fold.Run` of the stacked model."""
    params = recipe.params
    assert len(x) == len(y) == len(seeds), (len(x), len(y), len(seeds))
    assert 0 <= start <= params.frozen_blocks, (start, params.frozen_blocks)
    # 1-3) each fold's model, as finetune starts it; then one model holding them all
    models = [recipe.start(seed, x.device) for seed in seeds]
    assert fold_batchable(models[0], params.frozen_blocks), "BatchNorm/dropout in trained blocks"
    stacked = stack_models(models)
    # 4-5) the same steps, every fold in each
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    forward = _stacked_forward(stacked, start)
    diverged: list[DivergedError | None] = [None] * len(seeds)
    epochs = fit(
        stacked,
        recipe.cfg,
        params,
        recipe.pretrained,
        forward,
        x,
        y,
        start,
        generators,
        True,
        diverged,
    )

    def unstacked() -> list[BlockNet]:
        with torch.no_grad():
            for name, value in stacked.named_parameters():
                for fold, model in enumerate(models):
                    model.get_parameter(name).copy_(value[fold])
        return models

    return Run(stacked, epochs, diverged, unstacked)


def _stacked_forward(model: BlockNet, start: int) -> Forward:
    """Every fold's logits (and block outputs) on its own inputs; ``x`` is ``(folds, batch, ...)``."""
    logits = per_fold(model, lambda m, xb: m(xb, start=start))
    with_outputs = per_fold(model, lambda m, xb: block_outputs(m, xb, start))

    def forward(xb: torch.Tensor, maps: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return with_outputs(xb) if maps else (logits(xb), [])

    return forward
