"""An installed plug-in whose entry point names its builder instead of an Entry: a common slip."""

from __future__ import annotations


def build(*args: object, **kwargs: object) -> None:
    raise AssertionError("never called: the registry refuses this entry point")
