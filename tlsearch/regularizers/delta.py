"""DELTA: keep the trained blocks' feature maps near the pretrained ones."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from tlsearch.models import BlockNet, per_fold
from tlsearch.regularizers.base import DataTerm, Regularizer, Start, add_scaled_, sq_distance

__all__ = ["Delta", "channel_attention"]


class Delta(Regularizer, DataTerm):
    """DELTA (Li, Xiong, Wang, Rao, Liu, Chen & Huan, ICLR 2019, "DELTA: DEep Learning Transfer
    using Feature Map with Attention").

    A behavioural penalty: not the weights but what they compute is held near the start::

        λ/2 · mean_b Σ_j Σ_c a_jc · ‖FM_jc(w, x_b) − FM_jc(w⁰, x_b)‖²  +  β/2 · ‖w_head‖²

    ``FM_j(w, x)`` is the output of trained block j (j ≥ ``frozen_blocks``: a frozen block's output
    is the pretrained one, so it adds nothing) and ``c`` its channel (a feature of a fully connected
    block); ``FM_j(w⁰, x)`` the same output of the pretrained blocks, which :meth:`prepare`
    computes once per fold, in eval mode, on that fold's training set. ``a_jc = 1`` by default;
    ``attention`` gives the paper's channel weights instead (one tensor per trained block, of its
    channel count, stacked: ``(folds, channels)``), of mean 1 so that λ keeps its meaning. With
    ``regularizer.delta_attention``, :meth:`prepare` computes them there too, from the same
    training set, and sets ``attention`` (:func:`channel_attention`): a linear head fitted on the
    pretrained penultimate features, ``Δ_jc`` the rise of its loss when channel c of block j is
    zeroed, and ``a_j = C_j · softmax(zscore(Δ_j) / 5)``. Its cost: one forward of the remaining
    blocks per channel of each trained block, per fold.
    The new head is pulled toward zero with β = ``head_lambda``, as in L2-SP.

    λ is DELTA's own (``search.delta_lambda``, named ``delta_lambda`` in a study: see its entry in
    :data:`tlsearch.registry.REGULARIZERS`): it scales a distance between feature maps, not
    between weights.

    Two parts, because they are computed differently: :meth:`forward` is the weight term (β, times
    ``scale``), whose gradient has a closed form (:meth:`accumulate_grad_`); :meth:`data_penalty`
    is the data term, a mean over the batch like the cross-entropy (so not times ``scale``), which
    backpropagates with it.
    """

    name = "delta"
    closed_form_grad = True
    # The channel weights a_j, one tensor per trained block; None: all 1 (set by prepare).
    attention: list[torch.Tensor] | None = None
    # The pretrained blocks' outputs on the fold's training set, from the first trained block on.
    refs: list[torch.Tensor] | None = None
    first_trained = 0
    # The pretrained model's block outputs on any inputs, where minibatches are augmented.
    reference: Callable[[torch.Tensor], list[torch.Tensor]] | None = None

    def forward(self) -> torch.Tensor:
        return self.scale * self.head_lambda / 2 * sq_distance(self.head, None, self.stacked)

    def accumulate_grad_(self) -> None:
        add_scaled_(self.head, self.scale * self.head_lambda, None)

    def prepare(self, start: Start) -> None:
        """The pretrained feature maps FM_j(w⁰, x) of the fold's training set and, with
        ``regularizer.delta_attention``, the channel weights: the model is at its start."""
        model = start.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.refs = start.outputs(start.x)[start.first_trained :]
            if self.settings is not None and self.settings.delta_attention:
                self.attention = channel_attention(
                    model, self.refs, start.y, start.first_block, start.seeds, start.stacked
                )
        model.train(was_training)
        self.first_trained = start.first_trained
        self.reference = start.reference

    def batch_term(
        self, outputs: Sequence[torch.Tensor], rows: Any, inputs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The data term on a batch: against the pretrained maps of its rows, or, for augmented
        images (``inputs``), the pretrained model's maps of those very images."""
        assert self.refs is not None, "prepare() runs before the first batch"
        maps = outputs[self.first_trained :]
        if inputs is None:
            return self.data_penalty(maps, [r[rows] for r in self.refs])
        assert self.reference is not None, "augmented batches come with a reference model"
        with torch.no_grad():
            refs = self.reference(inputs)[self.first_trained :]
        return self.data_penalty(maps, refs)

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


# The channel attention (regularizer.delta_attention): the linear head's fit and the softmax.
ATTENTION_STEPS = 100  # full-batch Adam steps of the head, on standardised features
ATTENTION_LR = 0.05
ATTENTION_TEMPERATURE = 5.0  # on the z-scored loss increases, as tllib (and the DELTA code)
ATTENTION_CHUNK = 1 << 22  # elements of channel-zeroed feature maps run through the blocks at once


@torch.no_grad()
def channel_attention(
    model: BlockNet,
    refs: Sequence[torch.Tensor],
    y: torch.Tensor,
    first_block: int,
    seeds: Sequence[int],
    stacked: bool,
) -> list[torch.Tensor]:
    """DELTA's channel weights (Li et al., ICLR 2019, section 3.3: "supervised attention"), per
    trained block, from the pretrained network on the fold's training set.

    ``model`` is at its start (the pretrained blocks, eval mode); ``refs[i]`` is the output of
    block ``first_block + i`` on the training set (every block from ``first_block`` on, the last
    the penultimate features ``z``), ``y`` its labels; stacked, both carry the fold dimension and
    fold f gets its own weights, from its own samples (``seeds[f]`` seeds its head). Steps:

    1. fit a linear head ``g`` for the target's classes on the standardised ``z``:
       :data:`ATTENTION_STEPS` full-batch Adam steps from a start drawn by a generator of its own
       (seeded from the fold's seed: the global random stream is not touched); ``L`` is its mean
       cross-entropy on the training set;
    2. for each trained block j and channel c of its output (dim 1 of a sample's map; a unit of a
       fully connected block), zero that channel on every sample, run blocks j+1… and ``g``:
       ``Δ_jc = max(L_{-jc} − L, 0)``;
    3. ``a_j = C_j · softmax(Δ̂_j / T)`` over the C_j channels of block j, where ``Δ̂_j`` is ``Δ_j``
       z-scored over those channels and T = :data:`ATTENTION_TEMPERATURE` = 5, as tllib's DELTA
       does: raw loss increases of one channel among many are small, and softmax(Δ/5) of them
       would be uniform. The weights average 1 (all equal, as when no channel matters, is plain
       DELTA), so λ keeps its meaning.

    Cost: per fold, one forward of the blocks after j per channel of each trained block j
    (channels batched, :data:`ATTENTION_CHUNK` elements at a time), plus the head's fit.
    """
    maps = [r if stacked else r.unsqueeze(0) for r in refs]  # (folds, n, ...)
    labels = y if stacked else y.unsqueeze(0)
    head = _fit_head(maps[-1], labels, model.head.weight.shape[-2], seeds)  # 1)
    base = head.losses(maps[-1][:, None])  # (folds, 1)
    rest = _rest_of_blocks(model, stacked)
    weights = []
    for i, fm in enumerate(maps):
        increase = _loss_increases(fm, head, base, rest, first_block + i + 1)  # 2)
        a = _softmax_weights(increase)  # 3)
        weights.append(a if stacked else a[0])
    return weights


class _Head(NamedTuple):
    """The linear head ``g`` of step 1, per fold, with the standardisation of its features and the
    labels it is scored on (``(folds, n)``)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    labels: torch.Tensor

    def losses(self, features: torch.Tensor) -> torch.Tensor:
        """Each fold's mean cross-entropy of ``g``: ``(folds, m, n, d)`` → ``(folds, m)``."""
        folds, n = self.labels.shape
        flat = ((features.flatten(3) - self.mean[:, None]) / self.std[:, None]).flatten(1, 2)
        logits = torch.baddbmm(self.bias[:, None], flat, self.weight.transpose(1, 2))
        target = self.labels[:, None].expand(folds, len(flat[0]) // n, n)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        return ce.view(target.shape).mean(-1)


def _fit_head(
    features: torch.Tensor, labels: torch.Tensor, classes: int, seeds: Sequence[int]
) -> _Head:
    """Step 1: ``g`` fitted on the standardised penultimate features ``(folds, n, ...)``."""
    z = features.flatten(2)
    mean = z.mean(1, keepdim=True)
    std = z.std(1, correction=0, keepdim=True)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    weight, bias = _attention_head((z - mean) / std, labels, classes, seeds)
    return _Head(mean, std, weight, bias, labels)


def _loss_increases(
    fm: torch.Tensor,
    head: _Head,
    base: torch.Tensor,
    rest: Callable[[torch.Tensor, int], torch.Tensor],
    after: int,
) -> torch.Tensor:
    """Step 2 for one block: ``Δ_c = max(L_{-c} − L, 0)`` per fold and channel ``(folds, C)``,
    zeroing each channel of its output ``fm`` ``(folds, n, C, ...)`` and running the blocks from
    ``after`` on and ``g``, a chunk of channels at a time."""
    folds, n = head.labels.shape
    channels = fm.shape[2]
    per_channel = max(1, ATTENTION_CHUNK // max(1, fm[:, :, 0].numel()))
    increase = []
    for first in range(0, channels, per_channel):
        m = min(per_channel, channels - first)
        keep = torch.ones(m, channels, dtype=fm.dtype, device=fm.device)
        keep[torch.arange(m), first + torch.arange(m)] = 0
        # m copies of the maps, copy k with channel first + k zeroed: (folds, m·n, C, ...)
        zeroed = fm[:, None] * keep.view(1, m, 1, channels, *[1] * (fm.dim() - 3))
        out = rest(zeroed.flatten(1, 2), after)
        increase.append(head.losses(out.reshape(folds, m, n, *out.shape[2:])) - base)
    return torch.cat(increase, 1).clamp_min(0)


def _softmax_weights(delta: torch.Tensor) -> torch.Tensor:
    """Step 3: ``C · softmax(Δ̂ / T)`` over the C channels of ``delta`` ``(folds, C)``, ``Δ̂`` z-scored
    over them (0 where all are equal)."""
    channels = delta.shape[1]
    spread = delta.std(1, correction=0, keepdim=True)
    scaled = torch.where(spread > 1e-6, (delta - delta.mean(1, keepdim=True)) / spread, 0.0)
    return channels * torch.softmax(scaled / ATTENTION_TEMPERATURE, dim=1)


def _attention_head(
    z: torch.Tensor, y: torch.Tensor, classes: int, seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head per fold on features ``z`` ``(folds, n, d)``: weight ``(folds, classes, d)``
    and bias ``(folds, classes)``; fold f starts from a draw of its own generator. Adam treats each
    element alone, so fitting the folds together is fitting each alone."""
    d = z.shape[-1]
    bound = 1 / math.sqrt(d)
    start = []
    for seed in seeds:
        digest = hashlib.sha256(f"tlsearch.delta_attention:{seed}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        start.append((torch.rand(classes, d, generator=g, dtype=z.dtype) * 2 - 1) * bound)
    weight = torch.stack(start).to(z.device).requires_grad_()
    bias = torch.zeros(len(seeds), classes, dtype=z.dtype, device=z.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=ATTENTION_LR)
    with torch.enable_grad():
        for _ in range(ATTENTION_STEPS):
            logits = torch.baddbmm(bias[:, None], z, weight.transpose(1, 2))
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            optimizer.zero_grad()
            loss.view(y.shape).mean(1).sum().backward()
            optimizer.step()
    return weight.detach(), bias.detach()


def _rest_of_blocks(model: BlockNet, stacked: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``rest(h, j)``: blocks j… of ``model`` on ``h`` ``(folds, m, ...)`` (each fold's own
    blocks when stacked), the head's input."""

    def rest(h: torch.Tensor, start: int) -> torch.Tensor:
        if start == len(model.blocks):
            return h
        if not stacked:
            return model.features(h[0], start).unsqueeze(0)
        return per_fold(model, lambda m, xb: m.features(xb, start))(h)

    return rest
