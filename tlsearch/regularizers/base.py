"""Penalties that pull fine-tuned weights toward zero or toward the pretrained starting point.

Each regularizer is an ``nn.Module`` whose ``forward()`` returns the scalar penalty that the fine-tuning
loop adds to the mean cross-entropy of a batch. Convention (see also ``tlsearch.config``)::

    penalty = scale · λ/2 · Σ_p ‖p − p⁰‖²      scale = 1, or 1/m with regularizer.scale = "per_sample"

over the *trainable* parameters the regularizer covers (frozen ones have no gradient to pull). With
``penalize = "weights"`` only weight kernels (tensors of rank ≥ 2) are covered, as in the L2-SP authors'
code; ``"all"`` adds biases and norm-layer parameters, as tllib does.

With ``stacked=True`` the model's parameters carry a leading fold dimension (k fold models trained
together, see :func:`tlsearch.training.finetune_folds`) and ``forward()`` returns the k penalties, one per
fold; their sum has, for each fold's slice, that fold's gradient.

Adding a regularizer is one :class:`Regularizer` subclass and its registry entry
(``REGULARIZERS.register("name", "module:Class")`` in :mod:`tlsearch.registry`, a plug-in's entry point
or a ``--plugin`` module); each penalty has a file of its own here. A penalty with hyperparameters
of its own declares them in its entry (``hyperparameters=(Hyperparameter("name", default=...),)``,
:class:`tlsearch.registry.Hyperparameter`): the search asks for them under their names, exports
and reports show them, and the penalty receives each as a keyword argument of its class (a λ of
its own as ``lambda_``). A penalty whose
gradient has a closed form may also implement :meth:`Regularizer.accumulate_grad_`: the fine-tuning
loop then adds that gradient to ``.grad`` after the backward pass of the data loss, with two fused
``_foreach`` ops, instead of building and backpropagating the penalty's graph in every step (a
sixth of a fine-tuning step of the default CNN on the CPU). ``forward()`` stays the definition; a
test checks each closed form against autograd.

A penalty may also have a *data term*, a function of the batch rather than of the weights alone
(DELTA's distance between feature maps, :mod:`tlsearch.regularizers.delta`): it is then also a
:class:`DataTerm`, the one interface the training loop has for every term computed from a batch's
block outputs, penalty or not (BSS, :mod:`tlsearch.regularizers.bss`, is a registered term of its
own). Before a fold trains, each term's :meth:`DataTerm.prepare` sees the model at its start and the
fold's training set (:class:`Start`: DELTA computes its pretrained feature maps and channel
attention there); in each step the loop runs the batch through the blocks keeping their outputs
and adds each term's :meth:`DataTerm.batch_term`. Data terms backpropagate with the cross-entropy;
only a weight term can have a closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tlsearch.models import BlockNet

if TYPE_CHECKING:
    from tlsearch.config import RegularizerConfig

__all__ = ["DataTerm", "Regularizer", "Start", "add_scaled_", "sq_distance"]


def covered(
    params: Iterable[tuple[str, nn.Parameter]], penalize: str, stacked: bool
) -> list[tuple[str, nn.Parameter]]:
    rank = 3 if stacked else 2
    return [
        (n, p) for n, p in params if p.requires_grad and (penalize == "all" or p.dim() >= rank)
    ]


def sq_distance(
    params: list[nn.Parameter], refs: list[torch.Tensor] | None, stacked: bool
) -> torch.Tensor:
    """Σ‖p − ref‖² (or Σ‖p‖² when ``refs`` is None): a scalar, or one per fold when ``stacked``.

    One fused ``_foreach`` call per step instead of a Python loop over parameters; stacked, the
    references hold the fold dimension too (see ``Regularizer.__init__``).
    """
    if not params:
        return torch.zeros(())
    diffs = params if refs is None else torch._foreach_sub(params, refs)
    if stacked:
        norms = [torch.linalg.vector_norm(d.flatten(1), dim=1) for d in diffs]
        return torch.stack(norms).square().sum(0)
    return torch.stack(torch._foreach_norm(diffs)).square().sum()


def add_scaled_(params: list[nn.Parameter], coef: float, refs: list[torch.Tensor] | None) -> None:
    """``p.grad += coef · (p − ref)`` (or ``coef · p``) for the parameters that train right now."""
    pairs = [(p, r) for p, r in zip(params, refs or params, strict=True) if p.requires_grad]
    if not pairs or coef == 0.0:
        return
    grads = []
    for p, _ in pairs:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    ps = [p.detach() for p, _ in pairs]
    diffs = ps if refs is None else torch._foreach_sub(ps, [r for _, r in pairs])
    torch._foreach_add_(grads, diffs, alpha=coef)


@dataclass(frozen=True)
class Start:
    """What a :class:`DataTerm` sees once per fold, before it trains.

    Attributes:
        model: the model at its starting point (the pretrained blocks, a new head).
        outputs: the model's block outputs on inputs like ``x`` (from the first block it runs).
        x: the fold's training inputs (stacked: ``(folds, n, ...)``), entering the first block run.
        y: their labels (stacked: ``(folds, n)``).
        first_trained: the index, in those outputs, of the first block that trains.
        first_block: that block's index in ``model.blocks``.
        seeds: each fold's seed.
        stacked: whether the model holds several folds' parameters.
        reference: where the minibatches are augmented (new images, not rows of ``x``), the
            model's block outputs at its start (a frozen copy) on any inputs; None otherwise.
    """

    model: BlockNet
    outputs: Callable[[torch.Tensor], list[torch.Tensor]]
    x: torch.Tensor
    y: torch.Tensor
    first_trained: int
    first_block: int
    seeds: Sequence[int]
    stacked: bool
    reference: Callable[[torch.Tensor], list[torch.Tensor]] | None = None


class DataTerm:
    """A term of the training loss computed from a batch's block outputs (the training loop's one
    interface for them: it names none). ``batch_term(outputs, rows, inputs)`` is added to each
    step's loss: ``outputs`` are the blocks' outputs on the batch (the last one the head's input),
    ``rows`` indexes the batch's samples in the fold's training set, as a training-set tensor of
    the fold (stacked: of each fold) is indexed. Where the batch is augmented its images are new:
    ``rows`` is None and ``inputs`` holds them (:attr:`Start.reference` runs the model at its
    start on them). One value, or one per fold when stacked."""

    def prepare(self, start: Start) -> None:
        """Once per fold, before it trains (nothing by default)."""

    def batch_term(
        self, outputs: Sequence[torch.Tensor], rows: Any, inputs: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


class Regularizer(nn.Module):
    """Base class: holds the covered parameters of ``model`` and returns the penalty as a scalar.

    Subclasses set ``name`` and implement :meth:`forward`. ``lambda_`` is the searched λ,
    ``head_lambda`` the fixed β some penalties use for the new head, ``scale`` the factor (1 or 1/m) in front;
    ``stacked`` says the parameters carry a leading fold dimension (one penalty per fold);
    ``settings`` is the study's ``regularizer`` section, for options of a penalty's own (DELTA's
    attention). Subclasses whose gradient has a closed form set ``closed_form_grad`` and implement
    :meth:`accumulate_grad_`; those with a data term are also a :class:`DataTerm` and implement
    :meth:`data_penalty`, the term's formula.

    Attributes a subclass reads: ``backbone`` and ``head``, the covered trainable parameters of
    the blocks and of the new head; ``backbone_refs``, their pretrained starting points (in the
    same order).
    """

    name: str = ""
    closed_form_grad: bool = False

    def __init__(
        self,
        model: BlockNet,
        pretrained: Mapping[str, torch.Tensor],
        lambda_: float,
        head_lambda: float = 0.0,
        penalize: str = "weights",
        scale: float = 1.0,
        stacked: bool = False,
        settings: RegularizerConfig | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.lambda_ = float(lambda_)
        self.head_lambda = float(head_lambda)
        self.scale = float(scale)
        self.stacked = stacked
        backbone = covered(model.blocks.named_parameters(prefix="blocks"), penalize, stacked)
        head = covered(model.head.named_parameters(prefix="head"), penalize, stacked)
        self.backbone = [p for _, p in backbone]
        self.head = [p for _, p in head]
        # Copies of the starting point: the pretrained state may be shared by folds and trials.
        # Stacked, each fold's slice gets the same reference (materialised: _foreach ops do not
        # broadcast).
        self.backbone_refs = [
            pretrained[n].detach().to(p.device, p.dtype).expand_as(p).clone() for n, p in backbone
        ]

    def forward(self) -> torch.Tensor:
        raise NotImplementedError

    def accumulate_grad_(self) -> None:
        """Add the gradient of :meth:`forward` (summed over folds when stacked) to each covered
        parameter's ``.grad``, for the parameters that have ``requires_grad`` now."""
        raise NotImplementedError(f"regularizer '{self.name}' has no closed-form gradient")

    def data_penalty(
        self, maps: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The data term on one batch: ``maps[j]`` is the output of the j-th trained block
        (``(batch, ...)``, stacked ``(folds, batch, ...)``), ``refs[j]`` the pretrained block's
        output on the same samples; a scalar, or one value per fold when stacked."""
        raise NotImplementedError(f"regularizer '{self.name}' has no data term")
