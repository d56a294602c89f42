"""DELTA: keep the trained blocks' feature maps near the pretrained ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tlsearch.regularizers.base import Regularizer, add_scaled_, sq_distance

__all__ = ["Delta"]


class Delta(Regularizer):
    """DELTA (Li, Xiong, Wang, Rao, Liu, Chen & Huan, ICLR 2019, "DELTA: DEep Learning Transfer
    using Feature Map with Attention").

    A behavioural penalty: not the weights but what they compute is held near the start::

        λ/2 · mean_b Σ_j Σ_c a_jc · ‖FM_jc(w, x_b) − FM_jc(w⁰, x_b)‖²  +  β/2 · ‖w_head‖²

    ``FM_j(w, x)`` is the output of trained block j (j ≥ ``frozen_blocks``: a frozen block's output
    is the pretrained one, so it adds nothing) and ``c`` its channel (a feature of a fully connected
    block); ``FM_j(w⁰, x)`` the same output of the pretrained blocks, which the training loop
    computes once per fold, in eval mode, on that fold's training set. ``a_jc = 1`` by default;
    ``attention`` gives the paper's channel weights instead (one tensor per trained block, of its
    channel count, stacked: ``(folds, channels)``), of mean 1 so that λ keeps its meaning. With
    ``regularizer.delta_attention`` the training loop computes them once per fold, from that
    fold's training split, and sets ``attention``
    (:func:`tlsearch.training.fold.delta_attention`): a linear head fitted on the pretrained
    penultimate features, ``Δ_jc`` the rise of its loss when channel c of block j is zeroed, and
    ``a_j = C_j · softmax(zscore(Δ_j) / 5)``. Its cost: one forward of the remaining blocks per
    channel of each trained block, per fold.
    The new head is pulled toward zero with β = ``head_lambda``, as in L2-SP.

    Two parts, because they are computed differently: :meth:`forward` is the weight term (β, times
    ``scale``), whose gradient has a closed form (:meth:`accumulate_grad_`); :meth:`data_penalty`
    is the data term, a mean over the batch like the cross-entropy (so not times ``scale``), which
    backpropagates with it.
    """

    name = "delta"
    closed_form_grad = True
    feature_maps = True
    # The channel weights a_j, one tensor per trained block; None: all 1 (set by the training loop).
    attention: list[torch.Tensor] | None = None

    def forward(self) -> torch.Tensor:
        return self.scale * self.head_lambda / 2 * sq_distance(self.head, None, self.stacked)

    def accumulate_grad_(self) -> None:
        add_scaled_(self.head, self.scale * self.head_lambda, None)

    def data_penalty(
        self, maps: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        lead = 2 if self.stacked else 1  # (folds,) batch
        terms = []
        for j, (fm, ref) in enumerate(zip(maps, refs, strict=True)):
            sq = (fm - ref).square()
            if self.attention is None:
                per_sample = sq.reshape(*sq.shape[:lead], -1).sum(-1)
            else:
                # Channels are the dimension after the batch; the attention weighs each one.
                per_channel = sq.reshape(*sq.shape[: lead + 1], -1).sum(-1)
                per_sample = (per_channel * self.attention[j].unsqueeze(-2)).sum(-1)
            terms.append(per_sample.mean(-1))
        return self.lambda_ / 2 * torch.stack(terms).sum(0)
