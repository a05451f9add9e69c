"""eval/stats.py: Wilson intervals against published values, McNemar's exact test against
hand-computed p-values (and scipy's binomial test when scipy is installed)."""

from __future__ import annotations

import math

import pytest

from spanjax.eval import locality as L
from spanjax.eval import stats as S


def test_wilson_known_values():
    # Newcombe (1998), Table I: 81/263 -> 0.2553 .. 0.3662; the rest from the closed form.
    lo, hi = S.wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    lo, hi = S.wilson(1, 10)
    assert lo == pytest.approx(0.0179, abs=1e-4) and hi == pytest.approx(0.4042, abs=1e-4)
    assert S.wilson(0, 10) == (0.0, pytest.approx(S.Z95**2 / (10 + S.Z95**2)))
    lo, hi = S.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and lo + hi == pytest.approx(1.0)
    assert S.wilson(0, 0) == (0.0, 1.0)
    assert S.wilson(10, 10)[1] == 1.0 and S.wilson(7, 7)[1] == 1.0  # exact ends: no 1 - 1e-16
    assert L.wilson is S.wilson  # the old import path keeps working


@pytest.mark.parametrize(
    "b, c, p",
    [
        (0, 5, 0.0625),  # 2 / 2^5
        (5, 0, 0.0625),
        (1, 9, 0.021484375),  # 2 (1 + 10) / 2^10
        (2, 8, 0.109375),  # 2 (1 + 10 + 45) / 2^10
        (0, 1, 1.0),
        (4, 4, 1.0),
        (37, 37, 1.0),
        (0, 0, 1.0),
        (0, 10, 2 / 1024),
    ],
)
def test_mcnemar_exact_hand_values(b, c, p):
    assert S.mcnemar_exact(b, c) == p


def test_mcnemar_exact_large_counts_are_exact():
    # 2 P[X <= 0] with X ~ Bin(3000, 1/2) = 2^-2999: no float overflow, no underflow to a wrong value
    assert S.mcnemar_exact(0, 3000) == math.ldexp(1.0, -2999)
    assert S.mcnemar_exact(1500, 1500) == 1.0
    with pytest.raises(ValueError):
        S.mcnemar_exact(-1, 2)


def test_mcnemar_exact_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    cases = [(b, c) for b in range(0, 25) for c in range(0, 25) if b + c] + [(300, 360), (1000, 1100), (2, 700)]
    for b, c in cases:
        assert S.mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_paired_test_counts_discordant_pairs():
    pairs = [(True, True)] * 3 + [(False, False)] * 2 + [(True, False)] * 1 + [(False, True)] * 9
    t = S.paired_test(pairs)
    assert t == {"b": 1, "c": 9, "p": 0.021484375, "significant": True, "n_pairs": 15}
    assert S.paired_test([]) == {"b": 0, "c": 0, "p": 1.0, "significant": False, "n_pairs": 0}
    assert not S.paired_test([(True, False)] * 5)["significant"]  # p = 0.0625
