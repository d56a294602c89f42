"""Fine-tuning of one model on one set of labelled target samples, read top to bottom.

load pretrained blocks → new head → freeze the first k blocks → (warm up the head alone) → train with the
penalty → return the model. Data stays in device tensors: a few-label target set fits many times over, and
slicing a tensor costs far less than a per-sample ``DataLoader``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tlsearch.config import StudyConfig
from tlsearch.errors import DivergedError
from tlsearch.models import BlockNet, create_model
from tlsearch.regularizers import create_regularizer

__all__ = ["FinetuneParams", "evaluate", "finetune", "minibatches", "to_tensors"]


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


def _train_epochs(
    model: BlockNet,
    optimizer: torch.optim.Optimizer,
    penalty: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    model.train()
    loss_value = math.nan
    for epoch in range(epochs):
        for idx in minibatches(len(y), batch_size, generator):
            xb, yb = (x, y) if idx is None else (x[idx.to(x.device)], y[idx.to(y.device)])
            loss = F.cross_entropy(model(xb), yb) + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise DivergedError(f"training loss became {loss_value} in epoch {epoch + 1}")
    return loss_value


def finetune(
    pretrained: Mapping[str, torch.Tensor],
    cfg: StudyConfig,
    params: FinetuneParams,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
    seed: int,
) -> BlockNet:
    """Fine-tune a copy of the pretrained model on ``(x, y)``; the pretrained state is not changed."""
    ft = cfg.finetune
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    # 1) the pretrained blocks, and a new head sized for the target's classes
    model = create_model(cfg.model, input_shape, num_classes).to(x.device)
    blocks = {k: v for k, v in pretrained.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(blocks, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)

    # 2) freeze the first k blocks (their BatchNorm stays in eval mode, see BlockNet.train)
    model.freeze(params.frozen_blocks)

    # 3) the penalty, over the parameters that will train
    scale = 1.0 / len(y) if cfg.regularizer.scale == "per_sample" else 1.0
    penalty = create_regularizer(
        params.regularizer,
        model,
        pretrained,
        params.lam,
        head_lam=cfg.regularizer.head_lambda,
        penalize=cfg.regularizer.penalize,
        scale=scale,
    )

    def make_optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if ft.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=params.lr, momentum=ft.momentum)
        return torch.optim.Adam(groups, lr=params.lr)

    head_params = list(model.head.parameters())
    backbone_params = [p for p in model.blocks.parameters() if p.requires_grad]

    # 4) optionally warm up the new head alone, so random head gradients do not wreck the backbone
    if ft.head_warmup_epochs and backbone_params:
        for p in backbone_params:
            p.requires_grad_(False)
        warm = make_optimizer([{"params": head_params}])
        _train_epochs(model, warm, penalty, x, y, ft.head_warmup_epochs, ft.batch_size, generator)
        for p in backbone_params:
            p.requires_grad_(True)

    # 5) fine-tune head and unfrozen blocks, pretrained blocks at lr × backbone_lr_mult
    groups = [{"params": head_params}]
    if backbone_params and params.backbone_lr_mult > 0:
        groups.append({"params": backbone_params, "lr": params.lr * params.backbone_lr_mult})
    elif backbone_params:
        for p in backbone_params:
            p.requires_grad_(False)
    optimizer = make_optimizer(groups)
    _train_epochs(model, optimizer, penalty, x, y, ft.epochs, ft.batch_size, generator)
    return model


@torch.no_grad()
def evaluate(
    model: BlockNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), loss / len(y)
