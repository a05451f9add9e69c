"""Products with block-quantized weights (GGUF Q4_1 / Q8_0 kept as they are stored).

`quantized_matmul(x, w)` is what models call. On CPU, for few rows (a decode step), it runs
the C++ kernel (`cpu_kernel.cc`), which reads 20 bytes per 32 weights where an fp32 matrix
reads 128: decode on CPU is bound by reading weights. For more rows (prefill), and on other
platforms, it expands the blocks to fp32 and runs XLA's dot (`reference.py`): there the
product's arithmetic, not the weight read, is the cost.
"""

from __future__ import annotations

import math

import jax

from spanjax.kernels.quantized_matmul import cpu
from spanjax.kernels.quantized_matmul.format import BLOCK, FORMATS, BlockQuantized, LaneCodes, check, is_block_quantized
from spanjax.kernels.quantized_matmul.lanes import int8_matmul_reference, pack_lanes, with_lanes
from spanjax.kernels.quantized_matmul.reference import dequantize, quantized_matmul_reference, take_rows

# Up to this many rows the CPU kernel beats expanding the weights for XLA's GEMM (measured
# in docs/results/engine_bench.md); above it the GEMM's arithmetic dominates.
KERNEL_MAX_ROWS = 16

__all__ = [
    "BLOCK",
    "FORMATS",
    "KERNEL_MAX_ROWS",
    "BlockQuantized",
    "LaneCodes",
    "check",
    "dequantize",
    "int8_matmul_reference",
    "is_block_quantized",
    "pack_lanes",
    "quantized_matmul",
    "quantized_matmul_reference",
    "quantized_matmuls",
    "take_rows",
    "with_lanes",
]


def quantized_matmul(x, w: BlockQuantized, impl: str = "auto") -> jax.Array:
    """x [..., in] times w [out, in] transposed -> fp32 [..., out].

    impl: "auto" (the CPU kernel where it applies, else the reference), "cpu", "reference"."""
    return quantized_matmuls(x, (w,), impl)[0]


def quantized_matmuls(x, ws: tuple[BlockQuantized, ...], impl: str = "auto") -> tuple[jax.Array, ...]:
    """`quantized_matmul(x, w)` for each w of `ws`, the same x: on CPU one kernel call for all
    (a layer's q, k and v projections; gate and up), so the small ones do not each pay a call."""
    for w in ws:
        check(w)  # trace time: a malformed pytree fails here, not inside the kernel
        if x.shape[-1] != w.in_features or w.q.ndim != (3 if w.layer is None else 4):
            raise ValueError(f"x [..., {x.shape[-1]}] against a quantized matrix of shape {tuple(w.q.shape)}")
    if len({w.layer for w in ws}) > 1:  # one call reads one layer of its stacks
        ws = tuple(w.sliced() for w in ws)
    lead, rows = x.shape[:-1], math.prod(x.shape[:-1])
    use_kernel = impl == "cpu" or (impl == "auto" and rows <= KERNEL_MAX_ROWS and cpu.available())
    if impl == "cpu" and not cpu.available():
        raise RuntimeError(f"the quantized CPU kernel is unavailable: {cpu.unavailable_reason()}")
    if not use_kernel or rows == 0:
        return tuple(quantized_matmul_reference(x, w) for w in ws)
    x2 = x.reshape(rows, x.shape[-1])
    # Where every w carries a lane copy (`lanes.py`): int8 activations if it says so (the VNNI
    # kernel, or its jnp reference on CPUs and platforms without it), else fp32 products on the
    # lane copy from two rows up (one row reads the blocks faster).
    lanes = all(w.lanes is not None for w in ws)
    int8 = lanes and all(w.lanes.int8_activations for w in ws)
    reference = int8_matmul_reference if int8 else quantized_matmul_reference
    if int8:
        kernel = cpu.quantized_matmuls_int8_cpu
    elif lanes and rows >= 2:
        kernel = cpu.quantized_matmuls_lanes_cpu
    else:
        kernel = cpu.quantized_matmuls_cpu

    def elsewhere(x2):
        return tuple(reference(x2, w) for w in ws)

    def on_cpu(x2):
        return elsewhere(x2) if int8 and not cpu.vnni_supported() else kernel(x2, ws)

    ys = jax.lax.platform_dependent(x2, cpu=on_cpu, default=elsewhere)
    return tuple(y.reshape(*lead, w.out_features) for y, w in zip(ys, ws, strict=True))
