"""sample_tokens: greedy, top-k/top-p support against an independent numpy computation, seeding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spanjax.engine.sampling import SamplingParams, sample_tokens, sampling_arrays
from spanjax.models.llama import greedy_tokens

B, V = 8, 64  # one shape for the whole module: one compile


def _logits(seed, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((B, V)) * scale).astype(np.float32)


def _run(logits, temperature, top_k, top_p, seeds, steps=0):
    full = lambda x, dt: np.broadcast_to(np.asarray(x, dt), (B,)).copy()  # noqa: E731
    return np.asarray(
        sample_tokens(
            logits,
            full(temperature, np.float32),
            full(top_k, np.int32),
            full(top_p, np.float32),
            full(seeds, np.uint32),
            full(steps, np.int32),
        )
    )


def allowed_set(row, temperature, top_k, top_p, slack=1e-5):
    """Tokens that temperature -> top-k -> top-p may emit, computed independently in float64 numpy.

    `slack` widens the top-p boundary a little so float32 rounding in the
    implementation's cumsum cannot flag a token exactly on the edge.
    """
    z = row.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    k = len(z) if top_k == 0 else min(top_k, len(z))
    kept = order[:k]
    p = np.exp(z[kept] - z[kept].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    if top_p >= 1.0:
        return set(kept.tolist())
    return set(kept[before < top_p + slack].tolist())


def test_greedy_is_argmax():
    logits = _logits(0)
    np.testing.assert_array_equal(_run(logits, 0.0, 0, 1.0, np.arange(B)), logits.argmax(-1))
    # Greedy rows ignore top-k/top-p/seed entirely.
    np.testing.assert_array_equal(_run(logits, 0.0, 3, 0.2, 7, steps=5), logits.argmax(-1))

    # Ties take the first of the maxima, and a NaN counts as the maximum, as np.argmax does.
    tied = np.zeros((3, 7), np.float32)
    tied[0, [2, 5]] = 1.0
    tied[1, [4, 6]] = np.nan
    tied[2] = -np.inf
    np.testing.assert_array_equal(greedy_tokens(tied), tied.argmax(-1))
    np.testing.assert_array_equal(greedy_tokens(tied), [2, 4, 0])
    # The same across blocks of 128 (a vocabulary padded to them): ties in two blocks, a NaN in a
    # later block than a maximum and in an earlier one, the maximum in the padded last block.
    wide = np.zeros((5, 300), np.float32)
    wide[0, [140, 290]] = 2.0
    wide[1, 3], wide[1, 200] = 5.0, np.nan
    wide[2, 260], wide[2, 10] = 9.0, np.nan
    wide[3] = -np.inf
    wide[4, 299] = 1.0
    np.testing.assert_array_equal(greedy_tokens(wide), wide.argmax(-1))
    np.testing.assert_array_equal(greedy_tokens(wide), [140, 200, 10, 0, 299])


def test_top_k_one_is_greedy():
    for seed in range(5):
        logits = _logits(seed)
        np.testing.assert_array_equal(_run(logits, 1.5, 1, 1.0, np.arange(B) + seed), logits.argmax(-1))


def test_tiny_top_p_is_greedy():
    logits = _logits(3)
    np.testing.assert_array_equal(_run(logits, 1.0, 0, 1e-6, np.arange(B)), logits.argmax(-1))


def test_mixed_batch_rows_are_independent():
    """Greedy and sampled rows share one call; greedy rows still take the argmax."""
    logits = _logits(4)
    temperature = np.array([0, 1, 0, 2, 0, 0.5, 0, 1], np.float32)
    ids = _run(logits, temperature, [0, 5, 0, 0, 0, 3, 0, 0], [1, 1, 1, 0.9, 1, 1, 1, 0.5], np.arange(B))
    greedy = temperature == 0
    np.testing.assert_array_equal(ids[greedy], logits.argmax(-1)[greedy])


@settings(max_examples=40, deadline=None)
@given(
    data_seed=st.integers(0, 2**16),
    temperature=st.floats(0.05, 4.0),
    top_k=st.integers(0, V + 5),
    top_p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
    step=st.integers(0, 1000),
)
def test_samples_stay_in_allowed_set(data_seed, temperature, top_k, top_p, seed, step):
    logits = _logits(data_seed)
    ids = _run(logits, temperature, top_k, top_p, (seed + np.arange(B, dtype=np.uint64)) % 2**32, step)
    for row, tok in zip(logits, ids):
        assert tok in allowed_set(row, temperature, top_k, top_p)


def test_top_k_and_top_p_sets_are_covered():
    """Many draws from a fixed row hit every allowed token and nothing else."""
    row = np.linspace(2.0, -2.0, V).astype(np.float32)[np.random.default_rng(0).permutation(V)]
    logits = np.tile(row, (B, 1))
    for top_k, top_p in [(5, 1.0), (0, 0.3), (10, 0.6)]:
        allowed = allowed_set(row, 1.0, top_k, top_p, slack=0.0)
        seen = set()
        for s in range(60):
            seen.update(_run(logits, 1.0, top_k, top_p, s * B + np.arange(B)).tolist())
        assert seen == allowed, (top_k, top_p)


def test_same_seed_same_tokens_different_seed_differs():
    logits = np.tile(np.zeros(V, np.float32), (B, 1))  # uniform: any token is possible
    a = [_run(logits, 1.0, 0, 1.0, 123, steps=s) for s in range(10)]
    b = [_run(logits, 1.0, 0, 1.0, 123, steps=s) for s in range(10)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    # Same seed and step in every row -> the same token in every row.
    assert all(len(set(x.tolist())) == 1 for x in a)
    # Different seeds: 8 uniform draws over 64 tokens all equal has probability 64**-7.
    assert len(set(_run(logits, 1.0, 0, 1.0, np.arange(B)).tolist())) > 1
    # Different steps of one seed move on.
    assert len({int(x[0]) for x in a}) > 1


def test_row_result_independent_of_batch_slot():
    """A request's draw depends on (seed, step, its logits), not on where it sits in the batch."""
    logits = _logits(9)
    seeds = np.arange(100, 100 + B)
    steps = np.arange(B) * 3
    ids = _run(logits, 0.8, 0, 0.95, seeds, steps)
    perm = np.random.default_rng(1).permutation(B)
    ids_perm = _run(logits[perm], 0.8, 0, 0.95, seeds[perm], steps[perm])
    np.testing.assert_array_equal(ids_perm, ids[perm])


def test_frequencies_follow_softmax():
    row = np.log(np.array([0.5, 0.3, 0.2] + [1e-9] * (V - 3), np.float32))
    logits = np.tile(row, (B, 1))
    draws = np.concatenate([_run(logits, 1.0, 0, 1.0, np.arange(B) + s * B) for s in range(100)])
    freq = np.bincount(draws, minlength=V)[:3] / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.08)


def test_sampling_params_validation():
    SamplingParams(max_tokens=1, temperature=0.7, top_k=40, top_p=0.9, seed=2**32 - 1, stop=["\n"])
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().greedy and not SamplingParams(temperature=0.1).greedy
    for bad, field in [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop=[3]), "stop"),
        (dict(max_tokens=True), "max_tokens"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


def test_sampling_arrays_pad_greedy():
    t, k, p, s = sampling_arrays([SamplingParams(temperature=0.5, top_k=3, top_p=0.8, seed=9)], pad_to=3)
    assert t.tolist() == [0.5, 0.0, 0.0] and k.tolist() == [3, 0, 0] and s.tolist() == [9, 0, 0]
    np.testing.assert_allclose(p, [0.8, 1.0, 1.0])
