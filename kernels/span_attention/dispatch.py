"""Pick the span-attention implementation the engine calls.

    from spanjax.kernels.span_attention import SpanBatchMeta, span_attention, get_attention_impl
    meta = SpanBatchMeta(block_tables=..., block_pos=..., block_lens=..., cu_q_lens=...)
    out = span_attention(q, k_pages, v_pages, meta, q_pos, rope_inv_freq=..., sm_scale=...)
    forward_paged(..., attention_impl=get_attention_impl())

`impl`: "auto" (default; env SPANJAX_ATTENTION_IMPL overrides) -> "pallas_gpu" on
GPU, "pallas_tpu" on TPU, "xla" (the tiled jnp path, xla.py) elsewhere, CPU
included; "reference" is the per-token jnp statement of the semantics; "pallas"
-> the Pallas variant of the current backend (the GPU variant, interpreted, on
CPU). Block sizes come from the tuned table for (device kind, shape bucket),
else a heuristic; pass `config=` to override. Shapes the GPU kernel cannot take
(head_dim not a power of two or < 32, page_size not a power of two) fall back
to the reference.
"""

import functools
import os

import jax

from spanjax.kernels.span_attention import tuning
from spanjax.kernels.span_attention.kernel import span_attention_gpu
from spanjax.kernels.span_attention.kernel_tpu import span_attention_tpu
from spanjax.kernels.span_attention.meta import SpanBatchMeta, check_inputs, page_values
from spanjax.kernels.span_attention.reference import span_attention_reference
from spanjax.kernels.span_attention.xla import prepare_meta, span_attention_xla

IMPLS = ("auto", "reference", "xla", "pallas", "pallas_gpu", "pallas_tpu")


def resolve_impl(impl=None, backend=None) -> str:
    impl = impl or os.environ.get("SPANJAX_ATTENTION_IMPL") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"unknown span attention impl {impl!r}; choose from {IMPLS}")
    backend = backend or jax.default_backend()
    if impl == "auto":
        return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}.get(
            backend, "xla"
        )
    if impl == "pallas":
        return "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    return impl


def _gpu_ok(q, k_pages):
    D, P = q.shape[-1], k_pages.shape[1]  # Triton: power-of-two tensor sizes, dots >= 16
    return D >= 32 and D == tuning.next_pow2(D) and P == tuning.next_pow2(P)


def span_attention(
    q,
    k_pages,
    v_pages,
    meta: SpanBatchMeta,
    q_pos,
    *,
    rope_inv_freq,
    sm_scale,
    impl=None,
    interpret=None,
    config=None,
):
    """The engine's entry point; same contract as `span_attention_reference` (meta.py)."""
    which = resolve_impl(impl)
    n = check_inputs(q, k_pages, v_pages, meta, q_pos, rope_inv_freq)
    args = (q, k_pages, v_pages, meta, q_pos)
    if which == "xla":
        return span_attention_xla(*args, rope_inv_freq=rope_inv_freq, sm_scale=sm_scale)
    if which == "reference" or (which == "pallas_gpu" and not _gpu_ok(q, k_pages)):
        return span_attention_reference(*args, rope_inv_freq=rope_inv_freq, sm_scale=sm_scale)
    variant = "gpu" if which == "pallas_gpu" else "tpu"
    args = (q, page_values(k_pages), page_values(v_pages), meta, q_pos)  # the kernels read bf16 natively
    if interpret is None:
        interpret = jax.default_backend() not in (("tpu",) if variant == "tpu" else ("gpu", "cuda", "rocm"))
    cfg = tuning.get_config(variant, n.T, n.S, n.M, n.P, n.Hq, n.Hkv, n.D, q.dtype)
    cfg.update(config or {})
    if variant == "gpu":
        return span_attention_gpu(
            *args, rope_inv_freq=rope_inv_freq, sm_scale=float(sm_scale), interpret=interpret, **cfg
        )
    cfg = {k: cfg[k] for k in ("block_q", "pages_per_block", "num_splits") if k in cfg}
    return span_attention_tpu(*args, rope_inv_freq=rope_inv_freq, sm_scale=float(sm_scale), interpret=interpret, **cfg)


def get_attention_impl(impl=None, *, interpret=None, config=None):
    """A callable with exactly span_attention_reference's signature, for
    `forward_paged(..., attention_impl=...)`. The choice is made now (not per call)."""
    which = resolve_impl(impl)
    if which == "reference":
        return span_attention_reference
    fn = functools.partial(span_attention, impl=which, interpret=interpret, config=config)
    if which == "xla":  # per-step work done once for all layers (forward_paged calls it)
        fn.prepare_meta = prepare_meta
    return fn
