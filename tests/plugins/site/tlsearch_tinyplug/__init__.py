"""A plug-in distribution as a user would publish one: one model, found through its entry point.

``site/`` beside this package is what ``pip install`` would leave in site-packages: the package and
its ``.dist-info`` folder, whose ``entry_points.txt`` puts :data:`ENTRY` in group
``tlsearch.models``. tests/test_plugins.py puts ``site/`` on a subprocess's ``PYTHONPATH``.

Importing this package loads no torch: the entry names its builder, which only ``create()`` imports.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tlsearch.registry import Entry


class TinyOptions(BaseModel):
    """``[model]`` options of ``tinyplug``: the width of both hidden layers."""

    model_config = ConfigDict(extra="forbid", strict=True)

    width: int = Field(16, gt=0)


ENTRY = Entry(
    name="tinyplug",
    target="tlsearch_tinyplug.model:build",
    options=TinyOptions,
    blocks=lambda options: 2,
)
