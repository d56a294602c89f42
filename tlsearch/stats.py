"""How far a held-out accuracy, and a difference of two, can be trusted: the few tests ``final`` uses.

Torch-free and small: the standard library and numpy. Every function takes plain numbers or
sequences and states its assumptions.

- :func:`wilson_interval`: the Wilson score interval of a proportion (Wilson 1927). Unlike the
  normal-approximation ("Wald") interval it stays inside [0, 1] and does not collapse to a point
  at 0/n or n/n, which matters on a few hundred test images where accuracies near 1 are common.
- :func:`mcnemar_exact`: McNemar's test of two models scored on the same images, exact: under
  "equally good", each of the ``b + c`` images exactly one of the two gets right is a fair coin.
- :func:`paired_difference`: the mean per-image difference of two models on the same images,
  with a normal-approximation interval from the per-image differences (their paired standard
  error, so what both models get right or wrong alike cancels out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from tlsearch.errors import TlsearchError

__all__ = [
    "format_pp",
    "mcnemar_exact",
    "mean_se",
    "paired_difference",
    "wilson_interval",
    "z_value",
]


def mean_se(values: Sequence[float]) -> float | None:
    """The standard error of the mean of ``values``: ``std(ddof=1) / √n``; None for n < 2."""
    if len(values) < 2:
        return None
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var) / math.sqrt(len(values))


def format_pp(x: float) -> str:
    """A difference of accuracies in signed percentage points: ``+0.4``, ``−1.1`` (``0.0``)."""
    value = round(x * 100, 1)
    if value == 0:
        return "0.0"
    return f"{value:+.1f}".replace("-", "−")


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard normal quantile: 1.96 for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise TlsearchError(f"confidence must lie strictly between 0 and 1, not {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``successes / n``.

    Centre ``(x + z²/2) / (n + z²)``, half-width ``z·sqrt(p(1−p)/n + z²/(4n²)) / (1 + z²/n)`` with
    ``p = x/n``. ``successes`` may be fractional (a mean over seeds times ``n``); ``n`` is the number
    of independent units, here test images.
    """
    if n <= 0:
        raise TlsearchError(f"wilson_interval needs n > 0, not {n}")
    if not 0.0 <= successes <= n:
        raise TlsearchError(f"wilson_interval: successes must lie in [0, {n}], not {successes}")
    z = z_value(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0/n and n/n one end is exactly 0 or 1; computed, it would be off by a rounding error.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    ``b``: images the first model gets right and the second wrong; ``c``: the reverse. Under the
    null hypothesis each of the ``b + c`` discordant images goes either way with probability 1/2,
    so ``p = min(1, 2·P(X ≤ min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``; 1 when ``b + c = 0``.
    Computed with integers, exactly, then divided once.
    """
    if b < 0 or c < 0:
        raise TlsearchError(f"mcnemar_exact needs counts ≥ 0, not b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_difference(
    a_correct: Sequence[float] | np.ndarray,
    b_correct: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of ``a − b`` over the same images, with a normal-approximation interval.

    ``a_correct[i]`` and ``b_correct[i]`` are image i's correctness for two models: 0/1, or a
    fraction of seeds in [0, 1]. The interval is ``mean(d) ± z·std(d, ddof=1)/sqrt(n)`` with
    ``d = a − b`` per image: the paired standard error, which is all the sampling of test images
    adds when both models are scored on the same ones. When the two models agree on every image,
    ``d`` is all zero and so is the interval's width: the test images cannot tell them apart.
    Returns ``(difference, low, high)``, clipped to [−1, 1].
    """
    a = np.asarray(a_correct, dtype=float)
    b = np.asarray(b_correct, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise TlsearchError(
            f"paired_difference needs two equally long, non-empty sequences, not {a.shape} "
            f"and {b.shape}"
        )
    d = a - b
    diff = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    half = z_value(confidence) * se
    return diff, max(-1.0, diff - half), min(1.0, diff + half)
