"""tlsearch-resnet: a small ResNet as a tlsearch model plug-in, ``[model] name = "resnet"``.

Importing this package registers the model ``resnet`` (its options, its block count and a key
adapter for torchvision-named checkpoints) and loads no torch: the network is in
:mod:`tlsearch_resnet.net`, which tlsearch imports only when it builds one. The same import serves
both ways a plug-in arrives: the installed distribution's entry point (group ``tlsearch.models``,
whose object is this module) and ``--plugin tlsearch_resnet``. A module imports once per process,
so having both registers the model once.

Blocks, and what ``frozen_blocks = k`` freezes (``stages + 1`` blocks in all):

* block 0, the stem (``conv1 → bn1 → relu``, and a max-pool with ``stem = "imagenet"``);
* block i, for i = 1..stages, stage i: ``blocks_per_stage`` basic residual blocks; the last stage
  ends with the global average pooling, so the head (a linear layer) gets a vector.

``k = 0`` trains everything, ``k = 1`` freezes the stem, ``k`` freezes the stem and stages 1..k-1,
``k = stages + 1`` the whole backbone (the head trains alone, on the pooled features). Frozen
blocks keep their BatchNorm statistics (eval mode), as ``BlockNet.freeze`` does for any model, so
tlsearch computes their output once per depth and trains from there.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tlsearch.registry import MODELS, Entry

__all__ = ["ENTRY", "ResNetOptions", "from_torchvision", "torchvision_names"]


class ResNetOptions(BaseModel):
    """``[model]`` options of ``resnet``; the defaults are CIFAR's ResNet-8 at 16 channels, small
    enough to pretrain on the CPU in seconds."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Channels of the stem and stage 1; each later stage doubles them (16: He et al.'s CIFAR nets).
    width: int = Field(16, gt=0)
    # Residual stages; each after the first halves the resolution (3: an 8×8 digit ends at 2×2).
    stages: int = Field(3, ge=1, le=4)
    # Basic blocks per stage (2 with stages = 4 and width = 64 is ResNet-18's layout).
    blocks_per_stage: int = Field(1, ge=1)
    # "small": a 3×3 conv at stride 1, as CIFAR ResNets: small images keep their resolution.
    # "imagenet": torchvision's 7×7 stride-2 conv and 3×3 stride-2 max-pool, so that its
    # checkpoints' conv1 fits; it divides the resolution by 4 before stage 1.
    stem: Literal["small", "imagenet"] = "small"


# torchvision's (and timm's) ResNet names → the BlockNet's: the stem is block 0, stage i is block i,
# fc is the head. A name already in the BlockNet's form (a checkpoint tlsearch pretrained) matches
# none of these and is kept, so the adapter is safe on either naming.
_STAGE = re.compile(r"layer(\d+)\.")
_STEM = ("conv1.", "bn1.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def from_torchvision(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` under the BlockNet's names: ``conv1.*``/``bn1.*`` → ``blocks.0.*``, ``layerI.*`` →
    ``blocks.I.*``, ``fc.*`` → ``head.*``; any other name unchanged (the entry's key adapter)."""
    return {_to_blocknet(key): value for key, value in state.items()}


def torchvision_names(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a ``resnet`` BlockNet's) under torchvision's names: what
    :func:`from_torchvision` maps back. For tests and for sharing a checkpoint with torchvision."""
    out = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            rest = key[m.end() :]
            key = rest if m[1] == "0" else f"layer{m[1]}.{rest}"
        elif key.startswith("head."):
            key = "fc." + key.removeprefix("head.")
        out[key] = value
    return out


def _to_blocknet(key: str) -> str:
    m = _STAGE.match(key)
    if m:
        return f"blocks.{m[1]}.{key[m.end() :]}"
    if key.startswith(_STEM):
        return f"blocks.0.{key}"
    if key.startswith("fc."):
        return "head." + key.removeprefix("fc.")
    return key


ENTRY = Entry(
    "resnet",
    "tlsearch_resnet.net:resnet",
    options=ResNetOptions,
    blocks=lambda options: options["stages"] + 1,
    key_adapter=from_torchvision,
)
MODELS.add(ENTRY)
