"""Ragged paged span attention: the contract (meta.py), the jnp reference, the tiled XLA path,
the Pallas GPU/TPU kernels, and the dispatcher."""

from spanjax.kernels.span_attention.dispatch import get_attention_impl, resolve_impl, span_attention
from spanjax.kernels.span_attention.meta import SpanBatchMeta, check_inputs
from spanjax.kernels.span_attention.reference import span_attention_reference

__all__ = [
    "SpanBatchMeta",
    "check_inputs",
    "get_attention_impl",
    "resolve_impl",
    "span_attention",
    "span_attention_reference",
]
