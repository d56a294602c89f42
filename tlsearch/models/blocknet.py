"""Networks as an ordered list of blocks plus a head, so "freeze the first k blocks" is well defined.

The built-in ``mlp`` and ``cnn`` are registered by name in :mod:`tlsearch.registry` (with their options
and block counts), which imports this module only to build one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tlsearch.errors import ConfigError

__all__ = ["BlockNet", "cnn", "mlp"]


class BlockNet(nn.Module):
    """``blocks`` applied in order, then ``head`` (a linear classifier).

    ``input_shape`` is the shape of one sample; inputs are reshaped to it, so a flat 784-vector feeds a
    CNN and a 1×28×28 image feeds an MLP alike.
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Linear, input_shape: Sequence[int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_shape = tuple(input_shape)

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Output of blocks ``start..stop`` (the input is block ``start``'s input)."""
        if start == 0:
            x = x.reshape(x.shape[0], *self.input_shape)
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits; with ``start = k`` the input is the output of the first k blocks (cached features)."""
        return self.head(self.features(x, start))

    def replace_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_classes).to(self.head.weight.device)

    def freeze(self, frozen_blocks: int) -> None:
        """Freeze the first ``frozen_blocks``: no gradients, and eval mode (BatchNorm statistics
        fixed)."""
        assert 0 <= frozen_blocks <= len(self.blocks), (frozen_blocks, len(self.blocks))
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                p.requires_grad_(i >= frozen_blocks)
        self.frozen_blocks = frozen_blocks

    def train(self, mode: bool = True) -> BlockNet:
        super().train(mode)
        for block in self.blocks[: getattr(self, "frozen_blocks", 0)]:
            block.eval()
        return self


def _linear_block(n_in: int, n_out: int, batch_norm: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, n_out)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(n_out))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (256, 128),
    batch_norm: bool = False,
    dropout: float = 0.0,
    **_: object,
) -> BlockNet:
    """One block per hidden size: Linear → (BatchNorm) → ReLU → (Dropout)."""
    n_in = math.prod(input_shape)
    blocks: list[nn.Module] = []
    for i, width in enumerate(hidden):
        block = _linear_block(n_in, width, batch_norm, dropout)
        if i == 0:
            block.insert(0, nn.Flatten())
        blocks.append(block)
        n_in = width
    return BlockNet(blocks, nn.Linear(n_in, num_classes), input_shape)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (16, 32),
    fc: int = 128,
    batch_norm: bool = False,
    dropout: float = 0.0,
    **_: object,
) -> BlockNet:
    """Conv blocks (3×3 conv → (BatchNorm) → 2×2 max-pool → ReLU), then one fully connected block.

    Max-pooling before the ReLU gives the same values and gradients as the usual ReLU-then-pool
    (ReLU is monotonic, so it commutes with a max; a window with no positive value gives 0 and a
    zero gradient either way), and the ReLU runs on a quarter of the elements: a fine-tuning step
    of the default CNN on the CPU is about a sixth faster. Parameter names are the same.
    """
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.name: 'cnn' needs image inputs (channels, height, width), got shape "
            f"{tuple(input_shape)}; set image_shape on the data files or use 'mlp'"
        )
    c, h, w = input_shape
    blocks: list[nn.Module] = []
    for out in channels:
        layers: list[nn.Module] = [nn.Conv2d(c, out, 3, padding=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers += [nn.MaxPool2d(2), nn.ReLU()]
        blocks.append(nn.Sequential(*layers))
        c, h, w = out, h // 2, w // 2
    fc_block = _linear_block(c * h * w, fc, batch_norm, dropout)
    fc_block.insert(0, nn.Flatten())
    blocks.append(fc_block)
    return BlockNet(blocks, nn.Linear(fc, num_classes), input_shape)
