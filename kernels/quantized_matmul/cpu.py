"""The quantized product's call into the C++ CPU kernel (`cpu_kernel.cc`, built and registered
with the other CPU kernels by `spanjax.kernels.cpu_library`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spanjax.kernels.cpu_library import available, unavailable_reason
from spanjax.kernels.quantized_matmul.format import BlockQuantized

__all__ = ["TARGETS", "available", "quantized_matmul_cpu", "unavailable_reason"]

TARGETS = {"q4": "spanjax_q4_matmul", "q8": "spanjax_q8_matmul"}


def quantized_matmul_cpu(x2, w: BlockQuantized) -> jax.Array:
    """x2 fp32 [R, in] times w [out, in] transposed -> fp32 [R, out]; w has no leading axes."""
    out = jax.ShapeDtypeStruct((x2.shape[0], w.out_features), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS[w.format], out)
    x2 = x2.astype(jnp.float32)
    if w.format == "q4":
        return call(x2, w.q, w.scale, w.offset)
    return call(x2, w.q, w.scale)
