"""The quantized products' call into the C++ CPU kernel (`cpu_kernel.cc`, built and registered
with the other CPU kernels by `spanjax.kernels.cpu_library`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels.cpu_library import available, unavailable_reason, vnni_supported
from spanjax.kernels.quantized_matmul.format import BlockQuantized

__all__ = [
    "TARGET",
    "TARGET_INT8",
    "TARGET_LANES",
    "available",
    "quantized_matmul_cpu",
    "quantized_matmuls_cpu",
    "quantized_matmuls_int8_cpu",
    "quantized_matmuls_lanes_cpu",
    "unavailable_reason",
    "vnni_supported",
]

TARGET = "spanjax_quantized_matmuls"
TARGET_INT8 = "spanjax_quantized_matmuls_int8"
TARGET_LANES = "spanjax_quantized_matmuls_lanes"


def _products(target: str, x2, ws, codes) -> tuple[jax.Array, ...]:
    """One call of `target` on x2 and, per w, `codes(w)` (the blocks or their lane copy)."""
    outs = tuple(jax.ShapeDtypeStruct((x2.shape[0], w.out_features), jnp.float32) for w in ws)
    no_offset = jnp.zeros((0,), jnp.float16)
    args = [a for c in map(codes, ws) for a in (c.q, c.scale, no_offset if c.offset is None else c.offset)]
    # A layer view (`BlockQuantized.layer`, the same for all ws) passes the whole stacks: the
    # kernel reads layer `layer` of each at its offset, where a slice would be a copy.
    layer = np.int64(-1 if ws[0].layer is None else ws[0].layer)
    return tuple(jax.ffi.ffi_call(target, outs)(x2.astype(jnp.float32), *args, layer=layer))


def quantized_matmuls_cpu(x2, ws: tuple[BlockQuantized, ...]) -> tuple[jax.Array, ...]:
    """x2 fp32 [R, in] times each w [out, in] transposed -> fp32 [R, out] each, in one kernel
    call (one parallel loop over every product's columns); the ws have no leading axes."""
    return _products(TARGET, x2, ws, lambda w: w)


def quantized_matmuls_int8_cpu(x2, ws: tuple[BlockQuantized, ...]) -> tuple[jax.Array, ...]:
    """`quantized_matmuls_cpu` with int8 activations (`cpu_int8.cc`): each w needs its lane
    copy (`lanes.with_lanes`); the CPU needs AVX512-VNNI (`vnni_supported`)."""
    return _products(TARGET_INT8, x2, ws, lambda w: w.lanes)


def quantized_matmuls_lanes_cpu(x2, ws: tuple[BlockQuantized, ...]) -> tuple[jax.Array, ...]:
    """`quantized_matmuls_cpu` on each w's lane copy (fp32 activations; faster from two rows up)."""
    return _products(TARGET_LANES, x2, ws, lambda w: w.lanes)


def quantized_matmul_cpu(x2, w: BlockQuantized) -> jax.Array:
    """x2 fp32 [R, in] times w [out, in] transposed -> fp32 [R, out]; w has no leading axes."""
    return quantized_matmuls_cpu(x2, (w,))[0]
