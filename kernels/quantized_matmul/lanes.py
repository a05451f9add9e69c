"""The lane layout of block-quantized weights (16 output columns side by side), and the int8
activations that one of its two kernels uses.

`with_lanes(params, int8_activations)` gives every block-quantized matrix a second copy of its
codes in the lane layout. Products of 2 to `KERNEL_MAX_ROWS` rows then read it:
- `int8_activations=False`: fp32 products (`cpu_kernel.cc`, `QuantizedMatmulsLanes`), the
  dequantized model's results in another order of summation, ~1.3x faster than the block
  layout at eight rows (a decode batch); one-row products keep the block layout;
- `int8_activations=True` (opt-in, `EngineConfig.int8_activations`): x is quantized per block of
  32 to int8 and the products are integer dot products (AVX512-VNNI, `cpu_int8.cc`), as
  llama.cpp does on CPU, for every row count; results carry x's int8 rounding.
`int8_matmul_reference` is the int8 arithmetic in jnp: the kernel's test reference, and what
runs where the CPU has no VNNI.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spanjax.kernels.quantized_matmul.format import BLOCK, LANES, BlockQuantized, LaneCodes, is_block_quantized
from spanjax.kernels.quantized_matmul.reference import unpack_codes


def pack_lanes(w: BlockQuantized, int8_activations: bool = True) -> BlockQuantized:
    """`w` with `lanes` filled: byte 4t + i of column 16g + c's block b moves to [g, b, t, c, i]
    (for q4 that byte holds inputs 4t + i and 16 + 4t + i, for q8 input 4t + i)."""
    *lead, n, blocks, width = w.q.shape
    if n % LANES:
        raise ValueError(f"the lane layout needs a multiple of {LANES} outputs, got {n}")
    nl = len(lead)

    def to_lanes(a, quads):  # [..., N, B, 4 * quads] -> [..., N / 16, B, quads, 16, 4]
        a = a.reshape(*lead, n // LANES, LANES, blocks, quads, 4)
        return jnp.transpose(a, (*range(nl), nl, nl + 2, nl + 3, nl + 1, nl + 4))

    def scales(a):  # [..., N, B] -> [..., N / 16, B, 16]
        a = a.reshape(*lead, n // LANES, LANES, blocks)
        return jnp.swapaxes(a, -1, -2)

    offset = None if w.offset is None else scales(w.offset)
    return w.replace(lanes=LaneCodes(to_lanes(w.q, width // 4), scales(w.scale), offset, int8_activations))


def with_lanes(tree, int8_activations: bool = True):
    """Every block-quantized matrix of `tree` (Params, say) with its lane copy, where its outputs
    divide into groups of 16 (the others keep the block kernel)."""

    def pack(x):
        return pack_lanes(x, int8_activations) if is_block_quantized(x) and x.out_features % LANES == 0 else x

    return jax.tree.map(pack, tree, is_leaf=is_block_quantized)


def quantize_activations(x):
    """x fp32 [R, K] -> (int8 codes [R, K / 32, 32] as int32, scales [R, K / 32]): per block of 32,
    scale amax / 127 and codes rounded to nearest even (the kernel's `Quantize`)."""
    xb = x.reshape(x.shape[0], -1, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    inv = jnp.where(amax > 0, jnp.float32(127) / jnp.where(amax > 0, amax, 1), 0)
    return jnp.round(xb * inv[..., None]).astype(jnp.int32), amax / 127


def int8_matmul_reference(x, w: BlockQuantized) -> jax.Array:
    """What the int8 kernel computes, in jnp: x [R, in] (fp32) times w [out, in] transposed."""
    x, w = x.astype(jnp.float32), w.sliced()
    xq, dx = quantize_activations(x)
    codes = unpack_codes(w).astype(jnp.int32)  # [N, B, 32]
    dots = jnp.einsum("rbk,nbk->rnb", xq, codes, preferred_element_type=jnp.int32).astype(jnp.float32)
    y = jnp.einsum("rnb,rb,nb->rn", dots, dx, w.scale.astype(jnp.float32))
    if w.offset is not None:  # q4: the offset times the block's exact sum of x
        xsum = x.reshape(x.shape[0], -1, BLOCK).sum(-1)
        y = y + xsum @ w.offset.astype(jnp.float32).T
    return y
