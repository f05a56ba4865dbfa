"""Binomial confidence intervals for accuracies."""

from __future__ import annotations

import math


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n.

    The interval is the set of p with |k/n - p| <= z * sqrt(p (1 - p) / n); unlike the
    normal (Wald) interval it stays inside [0, 1] and is not degenerate at k = 0 or k = n.

    Args:
        k: successes, 0 <= k <= n.
        n: trials, >= 1.
        z: standard-normal quantile (1.96 for 95%), > 0.

    Returns:
        (low, high) with 0 <= low <= k/n <= high <= 1.

    Raises:
        ValueError: on n < 1, k outside [0, n], or z <= 0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, n={n}], got {k!r}")
    if not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0:
        raise ValueError(f"z must be a finite number > 0, got {z!r}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high
