"""Sampling uncertainty of the report's accuracies: Wilson score intervals.

An accuracy measured on n points is a binomial proportion; the Wilson interval (Wilson 1927;
recommended over the normal approximation by Brown, Cai & DasGupta 2001) stays inside [0, 1] and
behaves at 0 and 1, where robust accuracies often sit. Two figures whose 95 % intervals overlap
are reported as a tie: at n = 500 an interval is about +-4 points wide, so +1 point is noise.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson(p: float | None, n: int | None, z: float = Z95) -> list[float] | None:
    """The Wilson interval ``[lo, hi]`` of a proportion ``p`` measured on ``n`` points (None when
    either is missing or n is 0). ``p`` is the accuracy itself; ``p * n`` successes."""
    if p is None or not n:
        return None
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def overlaps(a: list[float] | None, b: list[float] | None) -> bool:
    """True when both intervals are known and overlap (the difference is within the noise)."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]
