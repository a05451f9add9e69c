"""Pure jnp semantics of block-quantized products: expand the blocks, then an fp32 dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spanjax.kernels.quantized_matmul.format import BLOCK, BlockQuantized


def unpack_codes(w: BlockQuantized) -> jax.Array:
    """The integer codes as fp32 [..., out, in / 32, 32] in input order."""
    if w.format == "q8":
        return w.q.astype(jnp.float32)
    low, high = w.q & 0x0F, w.q >> 4
    return jnp.concatenate([low, high], axis=-1).astype(jnp.float32)


def dequantize(w: BlockQuantized) -> jax.Array:
    """The fp32 matrix [..., out, in] (the values GGUF's own dequantization gives)."""
    w = w.sliced()
    codes = unpack_codes(w)
    values = codes * w.scale.astype(jnp.float32)[..., None]
    if w.offset is not None:
        values = values + w.offset.astype(jnp.float32)[..., None]
    return values.reshape(*w.q.shape[:-2], w.q.shape[-2] * BLOCK)


def take_rows(w: BlockQuantized, index) -> jax.Array:
    """Rows `index` of the fp32 matrix (an embedding lookup) without expanding the others."""
    return dequantize(jax.tree.map(lambda a: a[index], w.sliced().replace(lanes=None)))


def quantized_matmul_reference(x, w: BlockQuantized) -> jax.Array:
    """x [..., in] times the matrix [out, in] transposed: fp32 [..., out]."""
    return jax.lax.dot_general(
        x.astype(jnp.float32), dequantize(w), (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
