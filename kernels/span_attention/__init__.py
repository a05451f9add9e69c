"""Ragged paged span attention (DESIGN 2.3 / 4): reference, Pallas GPU/TPU kernels, dispatcher."""

from spanjax.kernels.span_attention.dispatch import get_attention_impl, resolve_impl, span_attention
from spanjax.kernels.span_attention.reference import span_attention_reference

__all__ = ["span_attention", "get_attention_impl", "resolve_impl", "span_attention_reference"]
