"""tlsearch.stats: the Wilson interval, McNemar's exact test and the paired difference, against
values worked out by hand and against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from tlsearch.errors import TlsearchError
from tlsearch.stats import mcnemar_exact, paired_difference, wilson_interval, z_value

Z95 = 1.959963984540054


def _wilson_by_hand(x: float, n: int, z: float = Z95) -> tuple[float, float]:
    """statsmodels' ``proportion_confint(method="wilson")``, written out."""
    p = x / n
    centre = (x + z * z / 2) / (n + z * z)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_z_value() -> None:
    assert z_value(0.95) == pytest.approx(Z95, abs=1e-12)
    assert z_value(0.90) == pytest.approx(1.644853626951472, abs=1e-12)
    with pytest.raises(TlsearchError, match="strictly between 0 and 1"):
        z_value(1.0)


def test_wilson_known_values() -> None:
    low, high = wilson_interval(81, 100)
    assert (round(low, 4), round(high, 4)) == (0.7222, 0.8749)
    assert (low, high) == pytest.approx(_wilson_by_hand(81, 100), abs=1e-12)
    # Not the Wald interval 0.81 ± 1.96·sqrt(0.81·0.19/100) = 0.7331 … 0.8869: Wilson pulls to 1/2.
    assert low < 0.7331 and high < 0.8869
    for x, n in [(0, 1), (1, 3), (37.5, 50), (619, 619), (250, 619)]:
        assert wilson_interval(x, n) == pytest.approx(_wilson_by_hand(x, n), abs=1e-12), (x, n)
    # A 90 % interval sits inside the 95 % one.
    l90, h90 = wilson_interval(81, 100, confidence=0.90)
    assert low < l90 < 0.81 < h90 < high


def test_wilson_stays_within_zero_and_one() -> None:
    # 0/10 and 10/10: the Wald interval collapses to a point; Wilson does not, and stays in [0, 1].
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z95**2 / (10 + Z95**2), abs=1e-12))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + Z95**2), abs=1e-12), 1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    for x in range(11):
        low, high = wilson_interval(x, 10)
        assert 0.0 <= low <= x / 10 <= high <= 1.0, (x, low, high)


def test_wilson_refuses_impossible_counts() -> None:
    with pytest.raises(TlsearchError, match="n > 0"):
        wilson_interval(0, 0)
    with pytest.raises(TlsearchError, match=r"successes must lie in \[0, 10\]"):
        wilson_interval(11, 10)


def test_mcnemar_known_values() -> None:
    # b=1, c=9: 2·P(X ≤ 1) with X ~ Bin(10, 1/2) = 2·(1 + 10)/1024.
    assert mcnemar_exact(1, 9) == 22 / 1024 == pytest.approx(0.02148, abs=1e-5)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 0) == 1.0  # no discordant image: no evidence either way
    for b in range(8):
        assert mcnemar_exact(b, b) == 1.0
    assert mcnemar_exact(0, 5) == 2 / 32
    with pytest.raises(TlsearchError, match="counts ≥ 0"):
        mcnemar_exact(-1, 3)


@pytest.mark.parametrize("b, c", [(1, 9), (0, 7), (3, 4), (12, 30), (60, 85), (200, 250)])
def test_mcnemar_matches_scipy_binomtest(b: int, c: int) -> None:
    expected = binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


def test_paired_difference_by_hand() -> None:
    # d = (1, 0, 0, −1): mean 0, std(ddof=1) = sqrt(2/3), so the half-width is z·sqrt(2/3)/2.
    diff, low, high = paired_difference([1, 1, 1, 0], [0, 1, 1, 1])
    half = Z95 * math.sqrt(2 / 3) / 2
    assert (diff, low, high) == pytest.approx((0.0, -half, half), abs=1e-12)

    # 0/1 outcomes on n images, b of them only a right, c only b right: McNemar's setting.
    n, b, c = 200, 12, 5
    a = np.zeros(n)
    other = np.zeros(n)
    a[:b] = 1
    other[b : b + c] = 1
    a[100:150] = other[100:150] = 1  # right for both: changes nothing
    diff, low, high = paired_difference(a, other)
    var = (b + c - (b - c) ** 2 / n) / (n - 1)
    assert diff == pytest.approx((b - c) / n)
    assert high - diff == pytest.approx(diff - low) == pytest.approx(Z95 * math.sqrt(var / n))
    # Swapping the two models flips the difference and its interval.
    assert paired_difference(other, a) == pytest.approx((-diff, -high, -low))


def test_paired_difference_of_identical_models_is_zero() -> None:
    same = [1, 0, 1, 1, 0, 0.5]
    assert paired_difference(same, same) == (0.0, 0.0, 0.0)


def test_paired_difference_needs_paired_sequences() -> None:
    with pytest.raises(TlsearchError, match="equally long"):
        paired_difference([1, 0], [1, 0, 1])
    with pytest.raises(TlsearchError, match="non-empty"):
        paired_difference([], [])
