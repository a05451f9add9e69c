"""Span attention on a device mesh: every device attends with its own heads, under `jax.shard_map`.

    impl = shard_heads(get_attention_impl(), mesh)        # same contract as the impl it wraps
    out = impl(q, k_pages, v_pages, meta, q_pos, rope_inv_freq=..., sm_scale=...)

Tensor parallelism splits q's heads and the KV pool's kv heads over the mesh axis `axis` in
contiguous blocks (q [T, Hq, D] on dim 1, the pool [N, P, Hkv, D] on dim 2). With GQA, query
head h reads kv head h // G, so device j's query heads read exactly device j's kv heads when
Hkv divides the axis: each device runs the wrapped implementation (the XLA path on CPU, the
Pallas kernel on GPU/TPU) on its local [T, Hq/n, D] and [N, P, Hkv/n, D], and nothing of the
pool moves between devices. The batch metadata, positions and RoPE table are small and
replicated. The output stays split by heads, as the o projection that follows wants it.

Why shard_map and not the partitioner: the kernels are opaque custom calls (Pallas) or
gather-heavy loops (XLA path) that XLA's SPMD partitioner cannot split by heads on its own;
it would gather the pool onto every device.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, PartitionSpec

from spanjax.kernels.span_attention.meta import SpanBatchMeta, check_inputs


def shard_heads(impl, mesh: Mesh, axis: str = "model"):
    """`impl` (the span-attention contract, meta.py) run per device on its heads along `axis`.

    Raises ValueError at call time when the kv heads (or query heads) do not divide the axis."""
    n = int(mesh.shape[axis])
    heads = PartitionSpec(None, axis, None)  # q and the output [T, Hq, D]
    pool = PartitionSpec(None, None, axis, None)  # k_pages / v_pages [N, P, Hkv, D]
    replicated = PartitionSpec()

    def call(q, k_pages, v_pages, meta: SpanBatchMeta, q_pos, *, rope_inv_freq, sm_scale):
        shapes = check_inputs(q, k_pages, v_pages, meta, q_pos, rope_inv_freq)
        if shapes.Hkv % n:
            raise ValueError(f"span attention: {shapes.Hkv} kv heads are not divisible by the {axis} axis ({n})")
        local = functools.partial(_local, impl, sm_scale)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(heads, pool, pool, replicated, replicated, replicated),
            out_specs=heads,
            # The implementations' loops start from fresh (device-invariant) carries that the
            # body makes per-device; the varying-axes check would reject that. Sound here: every
            # input is split along `axis` or replicated, so is the output.
            check_vma=False,
        )(q, k_pages, v_pages, meta, q_pos, rope_inv_freq)

    if hasattr(impl, "prepare_meta"):  # the metadata stays replicated, so its preparation does too
        call.prepare_meta = impl.prepare_meta
    return call


def _local(impl, sm_scale, q, k_pages, v_pages, meta, q_pos, rope_inv_freq):
    return impl(q, k_pages, v_pages, meta, q_pos, rope_inv_freq=rope_inv_freq, sm_scale=sm_scale)
