"""Augmentations of a minibatch's images: a regularizer whose strength the search sets beside λ.

Each is an :class:`Augmentation` (the contract is in its docstring): built with its strength,
called on a batch ``(B, C, H, W)`` with its targets and the fold's own CPU
:class:`torch.Generator`, from which alone it draws (so a fold trains the same in turn, stacked,
in lanes and after a resume), on the batch's device, batched. Translation, a small affine map and
random erasing fill what they uncover with the image's background (:func:`background`); mixup and
cutmix also mix the targets (``mixes_labels``: the trainer gives them soft targets).

One file per augmentation; each is an entry of :data:`tlsearch.registry.AUGMENTATIONS` that
declares its strength (:class:`tlsearch.registry.Hyperparameter`, named like the entry, off at 0,
with its default search range). Adding one is a subclass and an entry, in tlsearch, a plug-in's
entry point (group ``tlsearch.augmentations``) or a ``--plugin`` module::

    class Blur(Augmentation):
        name = "blur"
        blur: float

        def augment(self, x, y, generator):
            ...  # draw from generator only

    AUGMENTATIONS.register(
        "blur", Blur, hyperparameters=(Hyperparameter("blur", default={"low": 0.1, "high": 1.0},
                                                      off=0.0),)
    )

:func:`create_augmentation` builds one by name from a trial's values.
"""

from __future__ import annotations

from collections.abc import Mapping

from tlsearch.augmentations.affine import Affine
from tlsearch.augmentations.base import Augmentation, background, draw_beta
from tlsearch.augmentations.cutmix import CutMix
from tlsearch.augmentations.erase import Erase
from tlsearch.augmentations.hflip import HorizontalFlip
from tlsearch.augmentations.mixup import Mixup
from tlsearch.augmentations.translate import Translate
from tlsearch.errors import ConfigError
from tlsearch.registry import AUGMENTATIONS

__all__ = [
    "Affine",
    "Augmentation",
    "CutMix",
    "Erase",
    "HorizontalFlip",
    "Mixup",
    "Translate",
    "background",
    "create_augmentation",
    "draw_beta",
]


def create_augmentation(name: str, hyperparameters: Mapping[str, float]) -> Augmentation:
    """The augmentation registered as ``name`` at the trial's strength.

    ``hyperparameters`` are the trial's values of the hyperparameters entries declare
    (``params.hyperparameters``; others' are ignored): the augmentation receives each of its own
    as a keyword argument, at its off value when absent (then it is the identity).
    """
    entry = AUGMENTATIONS.get(name)
    values = {h.name: hyperparameters.get(h.name, h.off) for h in entry.hyperparameters}
    augmentation = entry.load()(**values)
    if not isinstance(augmentation, Augmentation):
        raise ConfigError(
            f"augmentation '{name}' ({entry.origin}): {entry.target} builds a "
            f"{type(augmentation).__name__}, not a tlsearch.augmentations.Augmentation"
        )
    return augmentation
