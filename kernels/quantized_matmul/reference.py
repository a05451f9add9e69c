"""Pure jnp semantics of block-quantized products: expand the blocks, then an fp32 dot; and the
int8-activation product the CPU kernel runs when a matrix asks for it."""

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
    codes = unpack_codes(w)
    values = codes * w.scale.astype(jnp.float32)[..., None]
    if w.offset is not None:
        values = values + w.offset.astype(jnp.float32)[..., None]
    return values.reshape(*w.q.shape[:-2], w.q.shape[-2] * BLOCK)


def take_rows(w: BlockQuantized, index) -> jax.Array:
    """Rows `index` of the fp32 matrix (an embedding lookup) without expanding the others."""
    return dequantize(jax.tree.map(lambda a: a[index], w))


def quantized_matmul_reference(x, w: BlockQuantized) -> jax.Array:
    """x [..., in] times the matrix [out, in] transposed: fp32 [..., out]."""
    return jax.lax.dot_general(
        x.astype(jnp.float32), dequantize(w), (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def quantize_activations(x):
    """x [..., in] as GGUF Q8_0-style blocks of 32: (codes int8 [..., in / 32, 32], scale
    [..., in / 32], exact block sums [..., in / 32]); scale = max|x| / 127, codes =
    round(x * (1 / scale)), nearest even, as the kernel rounds."""
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    scale = jnp.max(jnp.abs(xb), axis=-1) / 127.0
    inv = jnp.where(scale != 0, 1.0 / jnp.where(scale != 0, scale, 1.0), 0.0)
    codes = jnp.round(xb * inv[..., None]).astype(jnp.int8)
    return codes, scale, xb.sum(axis=-1)


def quantized_matmul_int8_reference(x, w: BlockQuantized) -> jax.Array:
    """What the CPU kernel computes for `w.int8_activations`: per block b of 32,
    d_b dx_b sum_k q_k qx_k (+ m_b sum_k x_k for q4), summed over blocks. fp32 [..., out]."""
    codes, xscale, xsum = quantize_activations(x)  # [..., B, 32], [..., B], [..., B]
    wq = unpack_codes(w).astype(jnp.int32)  # [out, B, 32]
    dots = jnp.einsum("...bk,obk->...ob", codes.astype(jnp.int32), wq).astype(jnp.float32)
    y = jnp.sum(dots * w.scale.astype(jnp.float32) * xscale[..., None, :], axis=-1)
    if w.offset is not None:
        y = y + jnp.einsum("...b,ob->...o", xsum, w.offset.astype(jnp.float32))
    return y
