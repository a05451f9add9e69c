"""Span attention through the C++ CPU kernels (`cpu_attention.cc`, built and registered with the
other CPU kernels by `spanjax.kernels.cpu_library`): one for decode-only batches, one for every
other batch. `xla.py` calls them on CPU; same contract and result as its jnp paths, up to fp32
rounding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels import cpu_library
from spanjax.kernels.rope import rope_tables
from spanjax.kernels.span_attention.meta import SpanBatchMeta, SpanShapes, logit_weights, reweighted

TARGETS = {
    (kind, dtype): f"spanjax_{kind}_attention_{dtype}" for kind in ("decode", "prefill") for dtype in ("f32", "bf16")
}
MAX_GROUP, MAX_HEAD_DIM = 16, 256  # as cpu_attention.cc


def supports(n: SpanShapes, pages_dtype) -> bool:
    """Whether the kernels take this call: built here, AVX2-friendly head sizes, an fp32 or bf16
    pool (a uint16 pool holds bf16 bits)."""
    dtype_ok = jnp.dtype(pages_dtype) in (jnp.float32, jnp.bfloat16, jnp.uint16)
    shape_ok = n.D % 16 == 0 and n.D <= MAX_HEAD_DIM and n.G <= MAX_GROUP
    return dtype_ok and shape_ok and cpu_library.available()


def position_rope(width: int, rope_inv_freq):
    """RoPE tables (cos, sin), each [width, D // 2], of positions 0 .. width - 1: the kernels
    index them by key position. A key's position is below the block table's width in slots
    (M * P) unless a sequence's positions run past its listed keys; the kernels compute such a
    position's rows themselves. The same values as the per-slot tables of `rope_tables`, at a
    fraction of their cost: S * M * P slots share M * P positions (~1 ms of an 8-stream SmolLM2
    decode step on 2 cores was the per-slot sin and cos). With concrete frequencies (the
    models pass their config's) the tables are computed while tracing, once per width, and
    every layer's call reads the same constant; XLA had computed them in every step (~1% of
    an 8-stream decode step, in scalar sin and cos)."""
    if isinstance(rope_inv_freq, jax.core.Tracer):
        cos, sin = rope_tables(jnp.arange(width, dtype=jnp.int32), rope_inv_freq)
        return cos.reshape(width, -1), sin.reshape(width, -1)
    return _constant_position_rope(width, np.asarray(rope_inv_freq, np.float32).tobytes())


@functools.lru_cache(maxsize=16)
def _constant_position_rope(width: int, inv_freq: bytes):
    """One pair of arrays per (width, frequencies), in numpy (fp32 angles as `rope_tables`
    forms them; eager JAX ops would each compile a program in a fresh process, ~0.3 s): a
    program that uses them in every layer holds them once, since JAX shares a constant used
    by several ops only when it is the same array."""
    angles = np.arange(width, dtype=np.float32)[:, None] * np.frombuffer(inv_freq, np.float32)[None, :]
    return np.cos(angles), np.sin(angles)


def attention_cpu(q, k_pages, v_pages, meta: SpanBatchMeta, q_pos, n: SpanShapes, *, rope_inv_freq, sm_scale):
    """One kernel call: the decode kernel when `meta.max_q_len == 1` promises one query token per
    sequence, else the prefill kernel (tiles of query tokens); `n` from `check_inputs`."""
    cos, sin = position_rope(n.M * n.P, rope_inv_freq)
    if reweighted(meta):
        scale, bias = logit_weights(meta)
    else:  # empty: the kernel's plain program
        scale = bias = jnp.zeros((0,), jnp.float32)
    bf16 = k_pages.dtype in (jnp.bfloat16, jnp.uint16)
    if bf16:  # bit patterns, a free reinterpretation
        k_pages, v_pages = (
            x if x.dtype == jnp.uint16 else jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (k_pages, v_pages)
        )
    kind = "decode" if meta.max_q_len == 1 else "prefill"
    out_shape = jax.ShapeDtypeStruct((n.T, n.Hq, n.D), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS[kind, "bf16" if bf16 else "f32"], out_shape)
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    out = call(
        q.astype(jnp.float32),
        k_pages,
        v_pages,
        i32(meta.block_tables),
        i32(meta.block_pos),
        i32(meta.block_lens),
        i32(meta.cu_q_lens),
        i32(q_pos),
        cos,
        sin,
        jnp.asarray(rope_inv_freq, jnp.float32).reshape(-1),
        scale,
        bias,
        sm_scale=np.float32(sm_scale),
    )
    return out.astype(q.dtype)
