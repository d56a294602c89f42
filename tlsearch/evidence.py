"""What a trial keeps image by image and epoch by epoch, and two trials compared image by image.

Every complete trial stores, for each labelled target image, its out-of-fold predicted probability
of the true class and whether it was right (user attribute ``oof``: one row per CV repeat, images
in the target training split's order; about 8 bytes an image). Two trials scored on the same folds
are then compared image by image (:func:`paired`): the per-image differences of log loss and of
correctness, whose standard error is what the images add (what both trials get right or wrong
alike cancels out). Every trial also stores each fold's held-out loss and accuracy every few epochs
(user attribute ``curve``), its learning curves.

Torch-free: numpy and the standard library, so ``export``, ``status`` and the selection rules read
it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "CURVE_ATTR",
    "OOF_ATTR",
    "Evidence",
    "Paired",
    "decode_oof",
    "encode_curve",
    "encode_oof",
    "paired",
]

OOF_ATTR = "oof"
CURVE_ATTR = "curve"
# Significant digits kept of each stored probability, loss and accuracy: 5 keeps a per-image log
# loss to 1e-4 for probabilities down to 1e-30, far below what separates two trials.
DIGITS = 5
# The least probability a log loss is taken of (a stored 0 is an underflow of one below 1e-38).
_FLOOR = 1e-38


def _round(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


@dataclass(frozen=True)
class Evidence:
    """A trial's out-of-fold predictions: ``p_true[r, i]`` is image i's probability of its true
    class when its fold of repeat r was held out, ``correct[r, i]`` whether it was predicted."""

    p_true: np.ndarray
    correct: np.ndarray

    @property
    def log_loss(self) -> np.ndarray:
        """Each image's log loss, averaged over the repeats: shape ``(n,)``."""
        return (-np.log(np.maximum(self.p_true, _FLOOR))).mean(0)

    @property
    def accuracy(self) -> np.ndarray:
        """Each image's share of repeats predicted right: shape ``(n,)``."""
        return self.correct.mean(0)


def encode_oof(p_true: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """The ``oof`` user attribute: ``{"p_true": [[...] per repeat], "correct": ["0110...", ...]}``."""
    assert p_true.shape == correct.shape and p_true.ndim == 2, (p_true.shape, correct.shape)
    return {
        "p_true": [[_round(float(p)) for p in row] for row in p_true],
        "correct": ["".join("1" if c else "0" for c in row) for row in correct],
    }


def decode_oof(attrs: Mapping[str, Any]) -> Evidence | None:
    """A trial's :class:`Evidence` from its user attributes; None for a trial that has none (made
    before tlsearch kept it, or not complete)."""
    raw = attrs.get(OOF_ATTR)
    if not isinstance(raw, Mapping):
        return None
    p = np.asarray(raw["p_true"], dtype=float)
    c = np.asarray([[ch == "1" for ch in row] for row in raw["correct"]], dtype=bool)
    return Evidence(p, c)


def encode_curve(
    epochs: Sequence[int], losses: Sequence[Sequence[float]], accuracies: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """The ``curve`` user attribute: the epochs evaluated, and per fold its held-out loss and
    accuracy at each (a fold that stopped early has fewer)."""
    return {
        "epochs": list(epochs),
        "loss": [[_round(v) for v in fold] for fold in losses],
        "accuracy": [[_round(v) for v in fold] for fold in accuracies],
    }


@dataclass(frozen=True)
class Paired:
    """A candidate trial against a reference, image by image on the same folds.

    Advantages are the candidate's: ``loss`` is ``mean(loss_ref − loss_cand)`` (positive: the
    candidate's log loss is lower), ``accuracy`` ``mean(correct_cand − correct_ref)``; each with
    the standard error of a mean of per-image differences.
    """

    n: int
    loss: float
    loss_se: float
    accuracy: float
    accuracy_se: float

    def p_value(self, what: str = "loss") -> float:
        """One-sided p-value of "no advantage" (normal approximation to the per-image mean)."""
        mean, se = (
            (self.loss, self.loss_se) if what == "loss" else (self.accuracy, self.accuracy_se)
        )
        if se <= 0:
            return 0.0 if mean > 0 else 1.0
        return 1.0 - NormalDist().cdf(mean / se)

    def to_dict(self) -> dict[str, float]:
        return {
            "images": self.n,
            "loss_advantage": self.loss,
            "loss_se": self.loss_se,
            "accuracy_advantage": self.accuracy,
            "accuracy_se": self.accuracy_se,
        }


def paired(candidate: Evidence, reference: Evidence) -> Paired:
    """Compare two trials' out-of-fold evidence image by image (see :class:`Paired`)."""
    loss = reference.log_loss - candidate.log_loss
    acc = candidate.accuracy - reference.accuracy
    n = len(loss)
    assert n == len(reference.log_loss) and n > 1, (n, len(reference.log_loss))

    def se(d: np.ndarray) -> float:
        return float(d.std(ddof=1)) / math.sqrt(n)

    return Paired(n, float(loss.mean()), se(loss), float(acc.mean()), se(acc))
