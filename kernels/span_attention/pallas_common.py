"""What the GPU (kernel.py) and TPU (kernel_tpu.py) Pallas kernels share.

Each jitted wrapper does: `check_inputs` (meta.py) -> its own block sizes ->
`prepare` (tile the batch, fp32 RoPE frequencies, matmul precision) ->
`pallas_call` -> `tiling.untile` (merge split-KV partials, unpack tiles).
Inside the kernels, q.k^T is two half-dim NT matmuls and p.V one NN matmul,
with masked logits set to the finite `NEG`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from spanjax.kernels.span_attention import tiling
from spanjax.kernels.span_attention.meta import SpanBatchMeta

NEG = -1e30  # finite mask value: exp() of masked logits stays 0, never NaN


def dot_nt(a, b, precision):
    """a [M, K] . b [N, K]^T -> [M, N] in fp32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
    """a [M, K] . b [K, N] -> [M, N] in fp32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Prepared:
    batch: tiling.TiledBatch
    inv_freq: jax.Array  # [D // 2] fp32
    precision: lax.Precision  # HIGHEST for fp32 queries (no TF32), DEFAULT otherwise


def prepare(q, k_pages, meta: SpanBatchMeta, q_pos, rope_inv_freq, *, block_q, g_pad, pages_per_block) -> Prepared:
    """The wrapper preamble both kernels share (after `check_inputs` and their block sizes)."""
    batch = tiling.tile_batch(q, k_pages, meta, q_pos, block_q=block_q, g_pad=g_pad, pages_per_block=pages_per_block)
    inv_freq = jnp.asarray(rope_inv_freq, jnp.float32).reshape(q.shape[-1] // 2)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    return Prepared(batch, inv_freq, precision)
