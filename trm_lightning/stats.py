"""Confidence intervals for counts: the one definition the evaluator, the reports and the benchmarks share."""

from __future__ import annotations

import math


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of ``successes / n`` as fractions in [0, 1]; ``(0.0, 1.0)`` when ``n <= 0``. The ends
    are exact at 0 and ``n`` successes (no rounding noise below 0 or above 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if p <= 0.0 else max(0.0, centre - half)
    hi = 1.0 if p >= 1.0 else min(1.0, centre + half)
    return (lo, hi)


def format_count(successes: int, n: int) -> str:
    """``12/182 (6.6%) [3.8%, 11.2%]``: the count, its percentage and its 95% Wilson interval."""
    if n <= 0:
        return f"{successes}/0"
    lo, hi = wilson_interval(successes, n)
    return f"{successes}/{n} ({100.0 * successes / n:.1f}%) [{100 * lo:.1f}%, {100 * hi:.1f}%]"
