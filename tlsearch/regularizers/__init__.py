"""Penalties that pull fine-tuned weights toward zero or toward the pretrained starting point, or
(DELTA) the trained blocks' feature maps toward the pretrained ones; and terms added on top of any
(BSS).

One file per penalty or term; penalties are registered by name in
:data:`tlsearch.registry.REGULARIZERS`, terms in :data:`tlsearch.registry.TERMS`, each entry
declaring the hyperparameters it brings to the search (:class:`tlsearch.registry.Hyperparameter`).
See :mod:`tlsearch.regularizers.base` for the convention every penalty follows and the
:class:`~tlsearch.regularizers.base.DataTerm` interface the training loop calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tlsearch.config import RegularizerConfig
from tlsearch.models import BlockNet
from tlsearch.params import TrialParams
from tlsearch.registry import REGULARIZERS, TERMS
from tlsearch.regularizers.base import DataTerm, Regularizer, Start
from tlsearch.regularizers.bss import BSS
from tlsearch.regularizers.delta import Delta
from tlsearch.regularizers.l2 import L2
from tlsearch.regularizers.l2sp import L2SP
from tlsearch.regularizers.none import NoPenalty

__all__ = [
    "BSS",
    "L2",
    "L2SP",
    "DataTerm",
    "Delta",
    "NoPenalty",
    "Regularizer",
    "Start",
    "create_regularizer",
    "data_terms",
]


def create_regularizer(
    name: str,
    model: BlockNet,
    pretrained: Mapping[str, torch.Tensor],
    lambda_: float,
    *,
    hyperparameters: Mapping[str, float] | None = None,
    **options: Any,
) -> Regularizer:
    """The penalty registered as ``name`` over ``model``'s trainable parameters; ``options`` are
    :class:`~tlsearch.regularizers.base.Regularizer`'s keywords (``head_lambda``, ``penalize``,
    ``scale``, ``stacked``, ``settings``).

    ``lambda_`` is the trial's λ (a penalty's own λ, as DELTA's, included). ``hyperparameters`` are
    the trial's values of the hyperparameters entries declare (``params.hyperparameters`` of a
    :class:`~tlsearch.params.TrialParams`): the penalty receives each of its own (but its λ) as a
    keyword argument, at its off value when absent. A penalty that declares any needs them.
    """
    entry = REGULARIZERS.get(name)
    own = [h for h in entry.hyperparameters if not h.is_lambda]
    assert hyperparameters is not None or not own, (
        f"regularizer '{name}' declares {', '.join(h.name for h in own)}: pass the trial's "
        "hyperparameters (params.hyperparameters)"
    )
    values = {h.name: (hyperparameters or {}).get(h.name, h.off) for h in own}
    return entry.load()(model, pretrained, lambda_, **options, **values)


def data_terms(
    penalty: Regularizer, settings: RegularizerConfig, params: TrialParams
) -> list[DataTerm]:
    """The terms computed from the batch that a trial trains with: the penalty's own (DELTA's,
    when its λ is above 0), then each registered term the settings and the trial turn on."""
    terms: list[DataTerm] = []
    if isinstance(penalty, DataTerm) and penalty.lambda_ > 0:
        terms.append(penalty)
    for name in TERMS.names():
        term = TERMS.get(name).load().from_settings(settings, params)
        if term is not None:
            terms.append(term)
    return terms
