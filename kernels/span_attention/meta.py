"""The span-attention contract: one batch-metadata pytree and the checks every implementation runs.

Every implementation (reference.py, xla.py, kernel.py for GPU, kernel_tpu.py for
TPU, and the dispatcher) and the model's paged step (spanjax.models.llama) take

    f(q, k_pages, v_pages, meta, q_pos, *, rope_inv_freq, sm_scale) -> [T, Hq, D]

  q             [T, Hq, D]          queries of T tokens from S sequences, RoPE applied
  k_pages       [N, P, Hkv, D]      paged keys, stored BEFORE RoPE
  v_pages       [N, P, Hkv, D]      paged values (floating, or uint16 holding bf16 bit patterns:
                                    how the engine stores a bf16 pool, see `gather_pages`)
  meta          SpanBatchMeta       which pages each sequence sees (below)
  q_pos         [T] int             logical position of every query token
  rope_inv_freq [D // 2] float      RoPE frequencies applied to keys at attention time
  sm_scale      float               softmax scale (1/sqrt(D), or a model's multiplier)

Rule: a query token of sequence s at position p sees the key in slot j of
listed page i iff j < block_lens[s, i] and block_pos[s, i] + j <= p. Its logit
is block_logit_scale[s, i] * (q . k * sm_scale) + block_logit_bias[s, i] when the
meta carries those (optional) per-entry arrays, else q . k * sm_scale. Tokens
past cu_q_lens[S] are padding and give zeros, as do rows that see no key at
all. Padded sequences repeat the last cu_q_lens value (empty). Entries with
block_lens 0 are ignored whatever their page id; values in unseen slots may be
anything, even inf/NaN.

`check_inputs` validates shapes and dtypes (static, so it costs nothing under
jit) and raises a ValueError naming the bad field.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class SpanBatchMeta:
    """Per-step metadata of a flat ragged batch of T tokens from S sequences."""

    block_tables: jax.Array  # [S, M] int: page ids each sequence may see (its visibility)
    block_pos: jax.Array  # [S, M] int: logical position of the first token of each listed page
    block_lens: jax.Array  # [S, M] int: valid tokens in each listed page (0 = unused entry)
    cu_q_lens: jax.Array  # [S + 1] int: offsets of each sequence's tokens in the batch
    # [T] int: page * page_size + offset where each token's K/V is written (-1 = padding).
    # Only the model's cache write reads it; attention alone may leave it None.
    slot_mapping: jax.Array | None = None
    # Optional attention re-weighting per block-table entry (APE-style, arXiv 2502.05431): the
    # logit of a key listed at entry i of sequence s is scale[s, i] * (q . k * sm_scale) +
    # bias[s, i], before the softmax (masked keys stay masked). None = scale 1 / bias 0; both
    # None is the plain contract, and every implementation then runs its plain program.
    block_logit_scale: jax.Array | None = None  # [S, M] float
    block_logit_bias: jax.Array | None = None  # [S, M] float
    # Optional RoPE tables of every listed slot, (cos, sin) each [S, M * P, 1, D // 2] float32,
    # for slot j of entry i at position block_pos[s, i] + j. A step computes them once for all
    # layers (`xla.with_key_rope`); implementations that rotate keys in jnp use them, the
    # others ignore them. None = each call computes what it needs.
    key_rope: tuple[jax.Array, jax.Array] | None = None
    # Static promise (part of the jit cache key, not an array): every sequence has at most
    # this many query tokens. 1 marks a decode-only batch, which the XLA path computes per
    # sequence in one pass; None promises nothing. Implementations may ignore it.
    max_q_len: int | None = flax.struct.field(pytree_node=False, default=None)


def reweighted(meta: SpanBatchMeta) -> bool:
    """Whether the meta carries per-entry logit re-weighting (a static fact: pytree structure)."""
    return meta.block_logit_scale is not None or meta.block_logit_bias is not None


def logit_weights(meta: SpanBatchMeta):
    """(scale, bias) [S, M] float32 of a re-weighted meta, the missing one filled (1 / 0)."""
    shape = meta.block_tables.shape
    scale, bias = meta.block_logit_scale, meta.block_logit_bias
    scale = jnp.ones(shape, jnp.float32) if scale is None else jnp.asarray(scale, jnp.float32)
    bias = jnp.zeros(shape, jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    return scale, bias


class SpanShapes(NamedTuple):
    """The sizes of a validated call (see the module docstring for the letters)."""

    T: int
    Hq: int
    D: int
    N: int
    P: int
    Hkv: int
    S: int
    M: int

    @property
    def G(self) -> int:
        """Query heads per KV head."""
        return self.Hq // self.Hkv


def _shape(name, x):
    if x is None:
        raise ValueError(f"span attention: {name} is missing (None)")
    return tuple(np.shape(x))


def page_values(pages):
    """The pool as values: a uint16 pool holds bf16 bit patterns (a free reinterpretation)."""
    return jax.lax.bitcast_convert_type(pages, jnp.bfloat16) if pages.dtype == jnp.uint16 else pages


def gather_pages(pages, index):
    """`pages[index]` as fp32, gathered in 16-bit storage when the pool is bf16.

    XLA CPU has no bf16 gather or scatter: it upcasts the operand, i.e. converts the WHOLE
    pool (every layer's slice of it) to fp32 in every layer of every step. The engine therefore
    stores a bf16 pool as its uint16 bit patterns (models/llama.py `init_paged_cache`), which
    it writes and gathers in place, and only the gathered pages are converted here
    (SmolLM2-135M, 512-page pool, 2 cores: a decode step 207 ms with a bf16 pool vs 27 ms fp32
    before this, ~the fp32 time after)."""
    if pages.dtype == jnp.bfloat16:
        pages = jax.lax.bitcast_convert_type(pages, jnp.uint16)
    return page_values(pages[index]).astype(jnp.float32)


def _kind(name, x, kind, what):
    dtype = getattr(x, "dtype", None)
    dtype = np.asarray(x).dtype if dtype is None else dtype
    if not jnp.issubdtype(dtype, kind):
        raise ValueError(f"span attention: {name} must have {what} dtype, got {dtype}")


def _pages_kind(name, x):
    if getattr(x, "dtype", None) != jnp.uint16:  # bf16 bit patterns (`gather_pages`)
        _kind(name, x, jnp.floating, "a floating (or uint16: bf16 bits)")


def _expect(name, x, shape, layout):
    got = _shape(name, x)
    if got != tuple(shape):
        raise ValueError(f"span attention: {name} has shape {got}, expected {layout} = {tuple(shape)}")


def _ndim(name, x, layout):
    got = _shape(name, x)
    if len(got) != layout.count(",") + 1:
        raise ValueError(f"span attention: {name} has shape {got}, expected {layout}")
    return got


def check_inputs(q, k_pages, v_pages, meta: SpanBatchMeta, q_pos, rope_inv_freq=None) -> SpanShapes:
    """Validate one call's arguments; returns their sizes. Raises ValueError naming the bad field."""
    if not isinstance(meta, SpanBatchMeta):
        raise ValueError(f"span attention: meta must be a SpanBatchMeta, got {type(meta).__name__}")
    T, Hq, D = _ndim("q", q, "[T, Hq, D]")
    _kind("q", q, jnp.floating, "a floating")
    N, P, Hkv, Dk = _ndim("k_pages", k_pages, "[N, P, Hkv, D]")
    _pages_kind("k_pages", k_pages)
    if Dk != D:
        raise ValueError(f"span attention: k_pages has head_dim {Dk}, q has {D}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"span attention: q's {Hq} heads are not a multiple of k_pages' {Hkv} KV heads")
    if D % 2:
        raise ValueError(f"span attention: head_dim {D} of q must be even (RoPE rotates halves)")
    _expect("v_pages", v_pages, (N, P, Hkv, D), "k_pages' shape [N, P, Hkv, D]")
    _pages_kind("v_pages", v_pages)
    S, M = _ndim("block_tables", meta.block_tables, "[S, M]")
    _kind("block_tables", meta.block_tables, jnp.integer, "an integer")
    for name in ("block_pos", "block_lens"):
        x = getattr(meta, name)
        _expect(name, x, (S, M), "block_tables' shape [S, M]")
        _kind(name, x, jnp.integer, "an integer")
    _expect("cu_q_lens", meta.cu_q_lens, (S + 1,), "[S + 1]")
    _kind("cu_q_lens", meta.cu_q_lens, jnp.integer, "an integer")
    _expect("q_pos", q_pos, (T,), "[T] (one per query token)")
    _kind("q_pos", q_pos, jnp.integer, "an integer")
    for name in ("block_logit_scale", "block_logit_bias"):
        x = getattr(meta, name)
        if x is not None:
            _expect(name, x, (S, M), "block_tables' shape [S, M]")
            _kind(name, x, jnp.floating, "a floating")
    if meta.key_rope is not None:
        for name, x in zip(("key_rope cos", "key_rope sin"), meta.key_rope):
            _expect(name, x, (S, M * P, 1, D // 2), "[S, M * P, 1, D // 2]")
    if meta.slot_mapping is not None:
        _expect("slot_mapping", meta.slot_mapping, (T,), "[T] (one per query token)")
        _kind("slot_mapping", meta.slot_mapping, jnp.integer, "an integer")
    if rope_inv_freq is not None:
        got = _shape("rope_inv_freq", rope_inv_freq)
        if int(np.prod(got)) != D // 2:
            raise ValueError(f"span attention: rope_inv_freq has shape {got}, expected [D // 2] = ({D // 2},)")
    return SpanShapes(T, Hq, D, N, P, Hkv, S, M)
