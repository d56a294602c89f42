"""The builder of ``tinyplug``: two hidden blocks of ``width`` units, in plain torch."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from torch import nn

from tlsearch.models import BlockNet


def build(input_shape: Sequence[int], num_classes: int, width: int = 16) -> BlockNet:
    # Which processes built the model: the test checks that spawned workers built it themselves.
    log = os.environ.get("TLSEARCH_TEST_BUILDS")
    if log:
        with open(log, "a") as f:
            f.write(f"tinyplug {os.getpid()} {width}\n")
    blocks = [
        nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
    ]
    return BlockNet(blocks, nn.Linear(width, num_classes), input_shape)
