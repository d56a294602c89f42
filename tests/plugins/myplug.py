"""A ``--plugin`` module: a user's own file that registers a model when imported.

tests/test_plugins.py copies it into a study's working directory and names it as ``--plugin myplug``,
``--plugin ./myplug.py`` or ``$TLSEARCH_PLUGINS``. The builder is the function itself, not a
``"module:attribute"`` string, so it is found however the file was imported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from tlsearch.registry import MODELS

if TYPE_CHECKING:
    from tlsearch.models import BlockNet


class MyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    depth: int = Field(2, gt=0)
    width: int = Field(8, gt=0)


@MODELS.register("myplug", options=MyOptions, blocks=lambda options: options["depth"])
def build(
    input_shape: Sequence[int], num_classes: int, depth: int = 2, width: int = 8
) -> BlockNet:
    # torch only once a model is built: loading the plug-in stays as quick as checking a study file.
    from torch import nn

    from tlsearch.models import BlockNet

    log = os.environ.get("TLSEARCH_TEST_BUILDS")
    if log:
        with open(log, "a") as f:
            f.write(f"myplug {os.getpid()} {width}\n")
    n_in = math.prod(input_shape)
    blocks = []
    for i in range(depth):
        layers = [nn.Linear(n_in if i == 0 else width, width), nn.ReLU()]
        blocks.append(nn.Sequential(*([nn.Flatten()] if i == 0 else []), *layers))
    return BlockNet(blocks, nn.Linear(width, num_classes), input_shape)
