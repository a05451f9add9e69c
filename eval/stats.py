"""Statistics of paired accuracy results (docs/evaluation.md#statistics): Wilson score
intervals of a proportion and McNemar's exact test of two systems on the same items.

McNemar: of the pairs (the same question at the same gold position, answered by both
systems) only the discordant ones carry information: b where only the first system is
right, c where only the second is. Under the null hypothesis (both equally accurate)
each discordant pair goes either way with probability 1/2, so the exact two-sided
p-value is p = min(1, 2 P[X <= min(b, c)]) with X ~ Bin(b + c, 1/2) (p = 1 when
b + c = 0). Computed with exact integers, so it is right for any number of pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
ALPHA = 0.05  # significance level of the marks in the summaries (95%)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n (sane at 0 and n); (0, 1) for n = 0."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # exactly 0 at k = 0 and 1 at k = n (rounding would leave 1 - 1e-16: an accuracy above its interval)
    return (0.0 if k == 0 else max(0.0, mid - half), 1.0 if k == n else min(1.0, mid + half))


def binom_half_cdf(k: int, n: int) -> float:
    """P[X <= k] for X ~ Bin(n, 1/2), exactly (integer sums, one correctly rounded division)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    total, term = 0, 1  # term = C(n, i)
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    return total / (1 << n)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of b and c discordant pairs: min(1, 2 P[X <= min(b, c)]),
    X ~ Bin(b + c, 1/2); 1 when there are no discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_half_cdf(min(b, c), n))


def paired_test(pairs: Iterable[tuple[bool, bool]], alpha: float = ALPHA) -> dict:
    """McNemar's exact test of pairs (first system correct, second system correct):
    b = only the first correct, c = only the second; `significant` when p < alpha."""
    b = c = n = 0
    for x, y in pairs:
        n += 1
        b += bool(x) and not y
        c += bool(y) and not x
    p = mcnemar_exact(b, c)
    return {"b": b, "c": c, "p": p, "significant": p < alpha, "n_pairs": n}
