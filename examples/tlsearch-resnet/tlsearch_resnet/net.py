"""The network of ``resnet``: a ResNet of basic blocks (He et al., "Deep Residual Learning for
Image Recognition", CVPR 2016) in plain torch, built as a :class:`tlsearch.models.BlockNet`.

Module and parameter names follow torchvision's ``ResNet`` inside each block (``conv1``, ``bn1``,
``layerI.J.conv1``, ``downsample.0``/``.1``), so :func:`tlsearch_resnet.from_torchvision` is a
renaming of prefixes only; with ``stem = "imagenet"``, ``width = 64``, ``stages = 4`` and
``blocks_per_stage = 2`` every tensor has the shape of torchvision's ``resnet18``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from tlsearch import ConfigError
from tlsearch.models import BlockNet

__all__ = ["BasicBlock", "resnet"]


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm, added to the block's input, then ReLU.

    The shortcut is the identity, or a 1×1 convolution and BatchNorm where the block changes the
    resolution (``stride`` 2) or the channels: torchvision's "option B" projection.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


def resnet(
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 16,
    stages: int = 3,
    blocks_per_stage: int = 1,
    stem: str = "small",
) -> BlockNet:
    """The ResNet as blocks ``[stem, stage 1, ..., stage N]`` and a linear head.

    Stage i has ``width · 2^(i-1)`` channels and, from stage 2 on, starts at stride 2. Global
    average pooling closes the last stage, so any image size fits (a 1×1 map just stays 1×1).
    A training minibatch of one image whose last stage is 1×1 leaves BatchNorm one value per
    channel, which torch refuses: keep images at least ``2^stages`` wide with the small stem.
    """
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.name: 'resnet' needs image inputs (channels, height, width), got shape "
            f"{tuple(input_shape)}; set image_shape on the data files"
        )
    if stem == "imagenet":
        first = [
            ("conv1", nn.Conv2d(input_shape[0], width, 7, 2, padding=3, bias=False)),
            ("bn1", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU()),
            ("maxpool", nn.MaxPool2d(3, 2, padding=1)),
        ]
    else:
        first = [
            ("conv1", nn.Conv2d(input_shape[0], width, 3, 1, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU()),
        ]
    blocks: list[nn.Module] = [nn.Sequential(OrderedDict(first))]
    c_in = width
    for i in range(stages):
        c_out = width * 2**i
        layers: list[nn.Module] = [
            BasicBlock(c_in if j == 0 else c_out, c_out, 2 if i > 0 and j == 0 else 1)
            for j in range(blocks_per_stage)
        ]
        if i == stages - 1:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        blocks.append(nn.Sequential(*layers))
        c_in = c_out
    for m in nn.ModuleList(blocks).modules():
        # torchvision's initialisation, so a network trained here starts where theirs does.
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return BlockNet(blocks, nn.Linear(c_in, num_classes), input_shape)
