"""Token sampling: greedy, temperature, top-k, top-p; seeded and reproducible.

`sample_tokens` takes every sampling knob as a per-row array, so a batch that
mixes greedy and sampled requests with different settings runs one compiled
function. A row's randomness is `fold_in(key(seed), step)`: the token a request
draws at its n-th step depends only on its own seed, step and logits, never on
which batch or batch slot it landed in. The dense generator and the paged
engine both call it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from spanjax.models.llama import greedy_tokens

MAX_SEED = 2**32 - 1  # seeds become uint32 PRNG keys


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop: tuple[str, ...] = ()  # generation ends when the text contains one; the text is cut before it
    ignore_eos: bool = False  # keep going past eos ids (benchmarks that need a fixed length)

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not is_num(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not is_int(self.seed) or not (0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise ValueError(f"stop must be a string or a sequence of strings, got {self.stop!r}") from None
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        object.__setattr__(self, "stop", stop)  # frozen: normalise list/str to a tuple once

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_arrays(params: Sequence[SamplingParams], pad_to: int | None = None):
    """Per-row (temperature, top_k, top_p, seeds) numpy arrays; padding rows are greedy."""
    n = len(params) if pad_to is None else pad_to
    temperature = np.zeros(n, np.float32)
    top_k = np.zeros(n, np.int32)
    top_p = np.ones(n, np.float32)
    seeds = np.zeros(n, np.uint32)
    for i, p in enumerate(params):
        temperature[i], top_k[i], top_p[i], seeds[i] = p.temperature, p.top_k, p.top_p, p.seed
    return temperature, top_k, top_p, seeds


def _sample_rows(logits, temperature, top_k, top_p, seeds, steps):
    """Temperature -> top-k -> top-p (over the top-k renormalised distribution) -> draw."""
    V = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # descending; ties keep the lower id first
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    keep = rank < k[:, None]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Smallest prefix whose mass reaches top_p; rank 0 always stays (mass_before = 0 < top_p).
    # top_p >= 1 keeps everything, so rounding in the cumsum cannot drop tail tokens.
    keep = keep & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@jax.jit
def sample_tokens(logits, temperature, top_k, top_p, seeds, steps):
    """logits [B, V]; temperature, top_p [B] f32; top_k [B] int; seeds [B] uint32; steps [B] int -> ids [B] int32.

    Rows with temperature 0 take the argmax. The sort that top-k/top-p need is
    skipped entirely (lax.cond) when the whole batch is greedy.
    """
    logits = logits.astype(jnp.float32)
    temperature = temperature.astype(jnp.float32)
    greedy_ids = greedy_tokens(logits)
    sampled = temperature > 0

    def draw():
        ids = _sample_rows(
            logits,
            temperature,
            top_k.astype(jnp.int32),
            top_p.astype(jnp.float32),
            seeds.astype(jnp.uint32),
            steps.astype(jnp.uint32),
        )
        return jnp.where(sampled, ids, greedy_ids)

    return jax.lax.cond(jnp.any(sampled), draw, lambda: greedy_ids)


@flax.struct.dataclass
class SamplingRows:
    """The per-row sampling inputs of one engine step (a pytree), each [S]: every row's
    request's knobs and `steps`, the index of the token the row samples next."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seeds: jax.Array
    steps: jax.Array

    def repeat(self, n: int) -> SamplingRows:
        """Each row n times, as the rows of its next n tokens (steps, steps + 1, ...)."""
        steps = (self.steps[:, None] + jnp.arange(n, dtype=self.steps.dtype)[None, :]).reshape(-1)
        knobs = (jnp.repeat(x, n) for x in (self.temperature, self.top_k, self.top_p, self.seeds))
        return SamplingRows(*knobs, steps)

    def sample(self, logits):
        return sample_tokens(logits, self.temperature, self.top_k, self.top_p, self.seeds, self.steps)
