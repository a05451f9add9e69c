"""Span attention through the C++ CPU kernels (`cpu_attention.cc`, built and registered with the
other CPU kernels by `spanjax.kernels.cpu_library`): one for decode-only batches, one for every
other batch. `xla.py` calls them on CPU; same contract and result as its jnp paths, up to fp32
rounding."""

from __future__ import annotations

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


def _key_slot_rope(meta: SpanBatchMeta, page_size: int, rope_inv_freq):
    if meta.key_rope is not None:
        return meta.key_rope
    slot = jnp.arange(page_size, dtype=jnp.int32)
    kpos = (meta.block_pos.astype(jnp.int32)[:, :, None] + slot).reshape(meta.block_pos.shape[0], -1)
    return rope_tables(kpos, rope_inv_freq)


def attention_cpu(q, k_pages, v_pages, meta: SpanBatchMeta, q_pos, n: SpanShapes, *, rope_inv_freq, sm_scale):
    """One kernel call: the decode kernel when `meta.max_q_len == 1` promises one query token per
    sequence, else the prefill kernel (tiles of query tokens); `n` from `check_inputs`."""
    tables = _key_slot_rope(meta, n.P, rope_inv_freq)
    cos, sin = (t.astype(jnp.float32).reshape(n.S, n.M * n.P, n.D // 2) for t in tables)
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
        scale,
        bias,
        sm_scale=np.float32(sm_scale),
    )
    return out.astype(q.dtype)
