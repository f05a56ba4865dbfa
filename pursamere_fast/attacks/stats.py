"""Binomial confidence intervals for accuracies and a paired test between two defences."""

from __future__ import annotations

import math
from collections.abc import Mapping

from .. import checks


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
    n = checks.integer("n", n, 1)
    k = checks.integer("k", k, 0, n)
    z = checks.real("z", z, positive=True)
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes.

    Two defences judged on the same images disagree on b + c of them: b where only the first
    is right, c where only the second is. Under "equally accurate" each disagreement goes
    either way with probability 1/2, so the p-value is a binomial tail. Pairing removes the
    images both get right or both get wrong, which is why it separates defences whose
    separate Wilson intervals overlap.

    Args:
        b, c: discordant counts, ints >= 0.

    Returns:
        p in (0, 1]; 1.0 when b + c = 0.

    Raises:
        ValueError: on a negative or non-int count.
    """
    b, c = checks.integer("b", b, 0), checks.integer("c", c, 0)
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def format_accuracy(acc: float | None, ci=None, digits: int = 1) -> str:
    """An accuracy in percent with its interval, e.g. "87.5 [80.1, 92.3]"; "-" when acc is None.

    The one formatter of every table the harness writes (runner, suite, sweep, convergence,
    protocol, summarise).

    Args:
        acc: accuracy in [0, 1], or None (no rows yet).
        ci: (low, high) in [0, 1], or None for the accuracy alone.
        digits: decimals of the interval's bounds (the accuracy always has one).
    """
    if acc is None:
        return "-"
    return f"{100 * acc:.1f}" + (f" [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]" if ci else "")


def paired_robust(a: Mapping[int, bool], b: Mapping[int, bool]) -> dict:
    """Paired comparison of two {index: robust} maps on their common images (exact McNemar): the one paired test of the
    harness (suite, sweep compare, protocol verdicts, summarise).

    Returns:
        {"n", "a", "b" (robust counts), "a_only", "b_only" (discordant pairs), "p"}.
    """
    common = sorted(set(a) & set(b))
    a_only = sum(a[i] and not b[i] for i in common)
    b_only = sum(b[i] and not a[i] for i in common)
    return {"n": len(common), "a": sum(a[i] for i in common), "b": sum(b[i] for i in common), "a_only": a_only,
            "b_only": b_only, "p": mcnemar_exact(a_only, b_only)}
