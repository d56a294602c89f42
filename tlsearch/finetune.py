"""Fine-tuning of one model on one set of labelled target samples, read top to bottom.

load pretrained blocks → new head → freeze the first k blocks → (warm up the head alone) → train with the
penalty → return the model. Data stays in device tensors: a few-label target set fits many times over, and
slicing a tensor costs far less than a per-sample ``DataLoader``.

Two fast paths give the plain path's models, up to float rounding:

* ``start = k``: the input is the output of the first k blocks, computed once (frozen blocks run in eval
  mode, so that output depends only on the checkpoint, k and the data); training never runs them again.
* :func:`finetune_folds` trains the models of several folds at once: their parameters are stacked along a
  leading fold dimension and one ``torch.func.vmap`` over ``functional_call`` runs every fold in each
  step. Adam and SGD update each element on its own, so one optimizer over the stacked tensors is k
  independent ones; each fold keeps its seed, hence its head initialisation and its minibatch order.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlsearch.config import StudyConfig
from tlsearch.errors import DivergedError
from tlsearch.models import BlockNet, create_model
from tlsearch.regularizers import Regularizer, create_regularizer

__all__ = [
    "FinetuneParams",
    "channels_last",
    "evaluate",
    "finetune",
    "finetune_folds",
    "fold_batchable",
    "minibatches",
    "to_tensors",
]


@dataclass(frozen=True)
class FinetuneParams:
    """What a trial chooses; the names are those the search space and the export use."""

    lam: float
    lr: float
    frozen_blocks: int
    backbone_lr_mult: float = 1.0
    regularizer: str = "l2sp"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneParams:
        return cls(
            lam=float(d["lambda"]),
            lr=float(d["lr"]),
            frozen_blocks=int(d["frozen_blocks"]),
            backbone_lr_mult=float(d.get("backbone_lr_mult", 1.0)),
            regularizer=str(d.get("regularizer", "l2sp")),
        )


def to_tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor | None]:
    """Index tensors of one shuffled epoch; ``None`` once when one batch holds everything."""
    if n <= batch_size:
        yield None
        return
    perm = torch.randperm(n, generator=generator)
    yield from perm.split(batch_size)


def channels_last(model: BlockNet) -> BlockNet:
    """On the CPU, convolution weights (and so activations) in channels-last layout; returns ``model``.

    oneDNN's max-pooling and convolutions run several times faster in that layout than in NCHW; other
    devices keep their default. Values are the same, rounding may differ.
    """
    if next(model.parameters()).device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


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


# Per fold: the divergence that ended its training, or None.
_Diverged = list[DivergedError | None]


def _train_epochs(
    model: BlockNet,
    optimizer: torch.optim.Optimizer | _FusedAdam,
    data_loss: Callable[[tuple[torch.Tensor | None, ...]], torch.Tensor],
    penalty: Regularizer,
    n: int,
    epochs: int,
    batch_size: int,
    generators: Sequence[torch.Generator],
    diverged: _Diverged,
) -> None:
    """Train for ``epochs``; one generator per fold draws that fold's minibatch order.

    ``data_loss`` maps each fold's batch indices to the mean cross-entropy (one per fold when the folds
    are stacked); the training loss adds ``penalty``. A penalty with a closed-form gradient adds it to
    ``.grad`` after the backward pass and is evaluated only for the divergence check, on the last batch
    of each epoch; any other is part of the loss that backpropagates. A fold whose training loss becomes
    NaN/inf is noted in ``diverged``; training stops once the first fold diverged, since the folds are
    scored in order and the trial ends there.
    """
    closed_form = penalty.closed_form_grad
    model.train()
    for epoch in range(epochs):
        batches = list(zip(*(minibatches(n, batch_size, g) for g in generators), strict=True))
        for i, idx in enumerate(batches):
            loss = data_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            if closed_form:
                if i == len(batches) - 1:
                    with torch.no_grad():
                        last = loss.detach() + penalty()
                loss.sum().backward()
                penalty.accumulate_grad_()
            else:
                loss = loss + penalty()
                last = loss.detach()
                loss.sum().backward()
            optimizer.step()
        for fold, value in enumerate(last.reshape(-1).tolist()):
            if diverged[fold] is None and not math.isfinite(value):
                diverged[fold] = DivergedError(f"training loss became {value} in epoch {epoch + 1}")
        if diverged[0] is not None:
            return


class _FusedAdam:
    """The update of ``torch.optim.Adam(fused=True)`` without its per-step Python.

    ``Optimizer.step`` regroups the tensors by device and dtype, checks the state of every parameter
    and wraps the call in hooks and profiler scopes on every step: on the CPU that cost more than the
    fused kernel itself for the default CNN's 600 steps a trial. Here the state is allocated once and
    each step is one ``_foreach_add_`` on the step counters and one ``aten::_fused_adam_`` per group,
    the very kernel ``Adam(fused=True)`` calls (defaults: β = (0.9, 0.999), ε = 1e-8, no weight
    decay, which the penalty replaces). A test checks it gives ``Adam(fused=True)``'s parameters bit
    for bit.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float) -> None:
        self._groups = []
        for group in groups:
            params = list(group["params"])
            self._groups.append(
                (
                    params,
                    float(group.get("lr", lr)),
                    [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
                    [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
                    [torch.zeros((), dtype=torch.float32, device=p.device) for p in params],
                )
            )
        self._params = [p for params, *_ in self._groups for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for params, lr, exp_avgs, exp_avg_sqs, steps in self._groups:
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(
                params,
                [p.grad for p in params],
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=lr,
                beta1=0.9,
                beta2=0.999,
                weight_decay=0.0,
                eps=1e-8,
                amsgrad=False,
                maximize=False,
            )


def _batch_loss(
    model: BlockNet, x: torch.Tensor, y: torch.Tensor, start: int, stacked: bool
) -> Callable[[tuple[torch.Tensor | None, ...]], torch.Tensor]:
    """Mean cross-entropy of each fold's minibatch (without the penalty)."""
    if not stacked:

        def loss(idx: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
            (i,) = idx
            xb, yb = (x, y) if i is None else (x[i.to(x.device)], y[i.to(y.device)])
            return F.cross_entropy(model(xb, start=start), yb)

        return loss

    # The stacked leaves themselves: the optimizer updates them in place, vmap hands each fold its slice.
    params = dict(model.named_parameters())
    logits = torch.func.vmap(
        lambda p, xb: torch.func.functional_call(model, p, (xb,), {"start": start})
    )
    rows = torch.arange(len(x), device=x.device)[:, None]

    def stacked_loss(idx: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        if idx[0] is None:
            xb, yb = x, y
        else:
            i = torch.stack(idx).to(x.device)
            xb, yb = x[rows, i], y[rows, i]
        out = logits(params, xb)
        ce = F.cross_entropy(out.flatten(0, 1), yb.flatten(), reduction="none")
        return ce.view(yb.shape).mean(1)

    return stacked_loss


def _finetune_seed(seed: int) -> int:
    """The global seed of a fine-tuning run: ``seed`` hashed, far from the small pretraining seeds."""
    digest = hashlib.sha256(f"tlsearch.finetune:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _init_model(
    pretrained: Mapping[str, torch.Tensor],
    cfg: StudyConfig,
    params: FinetuneParams,
    num_classes: int,
    input_shape: tuple[int, ...],
    seed: int,
    device: torch.device,
) -> BlockNet:
    # The new head (and dropout) draw from a stream of their own. Seeded with the bare seed, fold 0
    # (seed 0) would draw the very head the source model started from under pretrain.seed = 0, which
    # the pretrained blocks learned to fit: untrained, that "new" head scored 75 % on mnist-noisy.
    torch.manual_seed(_finetune_seed(seed))
    # 1) the pretrained blocks, and a new head sized for the target's classes
    model = channels_last(create_model(cfg.model, input_shape, num_classes).to(device))
    blocks = {k: v for k, v in pretrained.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(blocks, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)

    # 2) freeze the first k blocks (their BatchNorm stays in eval mode, see BlockNet.train)
    model.freeze(params.frozen_blocks)
    return model


def _fit(
    model: BlockNet,
    cfg: StudyConfig,
    params: FinetuneParams,
    pretrained: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    start: int,
    generators: Sequence[torch.Generator],
    stacked: bool,
) -> _Diverged:
    """Steps 3-5 for one model, or for the stacked models of several folds."""
    ft = cfg.finetune
    n = y.shape[-1]

    # 3) the penalty, over the parameters that will train
    scale = 1.0 / n if cfg.regularizer.scale == "per_sample" else 1.0
    penalty = create_regularizer(
        params.regularizer,
        model,
        pretrained,
        params.lam,
        head_lam=cfg.regularizer.head_lambda,
        penalize=cfg.regularizer.penalize,
        scale=scale,
        stacked=stacked,
    )
    data_loss = _batch_loss(model, x, y, start, stacked)

    # Fused kernels: one optimizer call updates every tensor, instead of a dozen small ops per tensor.
    fused = x.device.type in ("cpu", "cuda")

    def make_optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer | _FusedAdam:
        if ft.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=params.lr, momentum=ft.momentum, fused=fused)
        if fused:
            return _FusedAdam(groups, lr=params.lr)
        return torch.optim.Adam(groups, lr=params.lr)

    head_params = list(model.head.parameters())
    backbone_params = [p for p in model.blocks.parameters() if p.requires_grad]
    diverged: _Diverged = [None] * len(generators)

    # 4) optionally warm up the new head alone, so random head gradients do not wreck the backbone
    if ft.head_warmup_epochs and backbone_params:
        for p in backbone_params:
            p.requires_grad_(False)
        warm = make_optimizer([{"params": head_params}])
        _train_epochs(
            model,
            warm,
            data_loss,
            penalty,
            n,
            ft.head_warmup_epochs,
            ft.batch_size,
            generators,
            diverged,
        )
        for p in backbone_params:
            p.requires_grad_(True)
        if diverged[0] is not None:
            return diverged

    # 5) fine-tune head and unfrozen blocks, pretrained blocks at lr × backbone_lr_mult
    groups = [{"params": head_params}]
    if backbone_params and params.backbone_lr_mult > 0:
        groups.append({"params": backbone_params, "lr": params.lr * params.backbone_lr_mult})
    elif backbone_params:
        for p in backbone_params:
            p.requires_grad_(False)
    optimizer = make_optimizer(groups)
    _train_epochs(
        model, optimizer, data_loss, penalty, n, ft.epochs, ft.batch_size, generators, diverged
    )
    return diverged


def finetune(
    pretrained: Mapping[str, torch.Tensor],
    cfg: StudyConfig,
    params: FinetuneParams,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
    seed: int,
    *,
    start: int = 0,
) -> BlockNet:
    """Fine-tune a copy of the pretrained model on ``(x, y)``; the pretrained state is not changed.

    With ``start = k`` (at most ``params.frozen_blocks``), ``x`` holds the output of the first k blocks
    (``BlockNet.features(x, stop=k)`` of the pretrained model in eval mode), which are then never run.
    Raises :class:`DivergedError` when the training loss becomes NaN or infinite.
    """
    assert 0 <= start <= params.frozen_blocks, (start, params.frozen_blocks)
    model = _init_model(pretrained, cfg, params, num_classes, input_shape, seed, x.device)
    generator = torch.Generator().manual_seed(seed)
    (error,) = _fit(model, cfg, params, pretrained, x, y, start, [generator], stacked=False)
    if error is not None:
        raise error
    return model


def _stack(models: Sequence[BlockNet]) -> BlockNet:
    """A copy of ``models[0]`` whose parameters hold every model's, along a new leading dimension."""
    stacked = copy.deepcopy(models[0])
    for name, p in models[0].named_parameters():
        owner, _, attr = name.rpartition(".")
        value = torch.stack([m.get_parameter(name).detach() for m in models])
        setattr(stacked.get_submodule(owner), attr, nn.Parameter(value, p.requires_grad))
    return stacked


def finetune_folds(
    pretrained: Mapping[str, torch.Tensor],
    cfg: StudyConfig,
    params: FinetuneParams,
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
    """
    assert len(x) == len(y) == len(seeds), (len(x), len(y), len(seeds))
    assert 0 <= start <= params.frozen_blocks, (start, params.frozen_blocks)
    models = [
        _init_model(pretrained, cfg, params, num_classes, input_shape, seed, x.device)
        for seed in seeds
    ]
    assert fold_batchable(models[0], params.frozen_blocks), "BatchNorm/dropout in trained blocks"
    stacked = _stack(models)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    diverged = _fit(stacked, cfg, params, pretrained, x, y, start, generators, stacked=True)
    with torch.no_grad():
        for name, value in stacked.named_parameters():
            for fold, model in enumerate(models):
                model.get_parameter(name).copy_(value[fold])
    return [model if error is None else error for model, error in zip(models, diverged, strict=True)]


@torch.no_grad()
def evaluate(
    model: BlockNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096, *, start: int = 0
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)`` (``x`` enters block ``start``)."""
    model.eval()
    correct, loss = 0, 0.0
    for first in range(0, len(y), batch_size):
        logits = model(x[first : first + batch_size], start=start)
        yb = y[first : first + batch_size]
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), loss / len(y)
