"""Products with fp32 weights packed in column panels (`PackedMatrix`, `format.py`).

`packed_matmuls(x, ws)` is what models call. On CPU it runs the C++ kernel (`cpu_kernel.cc`:
tiles of up to 8 rows x 48 columns in registers, 1.1-2x faster than XLA's GEMM at 1-512 rows on a
2-core AVX512 machine), which also skips the rows that are padding when told how many rows
hold tokens. Elsewhere, or without the kernel library, it unpacks and runs XLA's dot: the same
values, so the two differ only in fp32 summation order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels import cpu_library
from spanjax.kernels.packed_matmul.format import PANEL, PackedMatrix, is_packed, pack, unpack

TARGET = "spanjax_packed_matmuls"

__all__ = [
    "PANEL",
    "TARGET",
    "PackedMatrix",
    "is_packed",
    "pack",
    "packed_matmul_reference",
    "packed_matmuls",
    "unpack",
]


def packed_matmul_reference(x, w: PackedMatrix) -> jax.Array:
    """x [..., in] @ the matrix of w, fp32 (XLA's dot)."""
    return jax.lax.dot_general(
        x.astype(jnp.float32), unpack(w), (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def packed_matmuls(x, ws: tuple[PackedMatrix, ...], rows=None, impl: str = "auto") -> tuple[jax.Array, ...]:
    """x [..., in] times each w's matrix -> fp32 [..., out] each; on CPU one kernel call for all.

    rows: how many leading rows of x (flattened) hold tokens, a traced or static int; the
    kernel leaves the others' outputs zero (the reference computes them). None: all of them.
    impl: "auto" (the kernel on CPU where the library is built, else the reference), "cpu",
    "reference"."""
    for w in ws:
        if x.shape[-1] != w.in_features:
            raise ValueError(f"x [..., {x.shape[-1]}] against packed panels of shape {tuple(w.panels.shape)}")
    if len({w.layer for w in ws}) > 1:  # one call reads one layer of its stacks
        ws = tuple(w.sliced() for w in ws)
    lead, n = x.shape[:-1], math.prod(x.shape[:-1])
    if impl == "cpu" and not cpu_library.available():
        raise RuntimeError(f"the packed CPU kernel is unavailable: {cpu_library.unavailable_reason()}")
    x2 = x.reshape(n, x.shape[-1]).astype(jnp.float32)

    def elsewhere(x2):
        return tuple(packed_matmul_reference(x2, w) for w in ws)

    def on_cpu(x2):
        count = jnp.full((1,), n, jnp.int32) if rows is None else jnp.reshape(rows, (1,)).astype(jnp.int32)
        outs = tuple(jax.ShapeDtypeStruct((n, w.out_features), jnp.float32) for w in ws)
        layer = np.int64(-1 if ws[0].layer is None else ws[0].layer)
        return tuple(jax.ffi.ffi_call(TARGET, outs)(x2, count, *(w.panels for w in ws), layer=layer))

    if impl == "reference" or n == 0 or not (impl == "cpu" or cpu_library.available()):
        ys = elsewhere(x2)
    else:
        ys = jax.lax.platform_dependent(x2, cpu=on_cpu, default=elsewhere)
    return tuple(y.reshape(*lead, w.out_features) for y, w in zip(ys, ws, strict=True))
