"""Functional Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Granite 3.x).

Parameters are a pytree of registered dataclasses with the layers stacked on a
leading axis, so the decoder is one `lax.scan` (compile time does not grow with
depth). Attention is pluggable: `forward_dense` keeps a classic [B, T_max]
cache of post-RoPE keys (the simple generator and a reference), while
`forward_paged` writes pre-RoPE keys into a page pool and runs ragged paged
span attention (the engine's path; see kernels/span_attention).

Weights are stored [in, out] so projections are `x @ w`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from kernels.rope import apply_rope
from spanjax.models.config import ModelConfig


def _pytree_dataclass(cls):
    cls = dataclasses.dataclass(cls)
    return jax.tree_util.register_dataclass(cls)


@_pytree_dataclass
class LayerParams:
    """One decoder layer's weights; in `Params.layers` every field has a leading [L] axis."""

    attn_norm: jax.Array  # [H]
    wq: jax.Array  # [H, Hq * D]
    wk: jax.Array  # [H, Hkv * D]
    wv: jax.Array  # [H, Hkv * D]
    wo: jax.Array  # [Hq * D, H]
    mlp_norm: jax.Array  # [H]
    w_gate: jax.Array  # [H, I]
    w_up: jax.Array  # [H, I]
    w_down: jax.Array  # [I, H]


@_pytree_dataclass
class Params:
    embed: jax.Array  # [V, H]
    layers: LayerParams  # stacked, leading axis L
    final_norm: jax.Array  # [H]
    lm_head: jax.Array | None  # [H, V]; None when tied to `embed`


def init_params(cfg: ModelConfig, key, dtype=jnp.float32, scale=0.02) -> Params:
    """Random parameters (tests, smoke runs)."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    keys = iter(jax.random.split(key, 16))

    def rnd(*shape):
        return (scale * jax.random.normal(next(keys), shape)).astype(dtype)

    layers = LayerParams(
        attn_norm=(1.0 + rnd(L, H)).astype(dtype),
        wq=rnd(L, H, qd),
        wk=rnd(L, H, kvd),
        wv=rnd(L, H, kvd),
        wo=rnd(L, qd, H),
        mlp_norm=(1.0 + rnd(L, H)).astype(dtype),
        w_gate=rnd(L, H, I),
        w_up=rnd(L, H, I),
        w_down=rnd(L, I, H),
    )
    return Params(
        embed=rnd(cfg.vocab_size, H),
        layers=layers,
        final_norm=(1.0 + rnd(H)).astype(dtype),
        lm_head=None if cfg.tie_word_embeddings else rnd(H, cfg.vocab_size),
    )


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def mlp(layer: LayerParams, x):
    return (jax.nn.silu(x @ layer.w_gate) * (x @ layer.w_up)) @ layer.w_down


# attention_fn(layer_index, layer_cache, q_roped, k_raw, v, positions) -> (out, new_layer_cache)
AttentionFn = Callable


def decoder(params: Params, cfg: ModelConfig, tokens, positions, cache, attention_fn: AttentionFn):
    """Embedding -> L layers -> final norm. Token axes are [..., T]; returns (hidden, cache).

    `cache` is any pytree whose leaves have a leading [L] axis; each layer sees
    its own slice and `attention_fn` returns the updated slice.
    """
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    x = params.embed[tokens] * jnp.asarray(cfg.embedding_multiplier, params.embed.dtype)
    lead = tokens.shape

    def layer_step(x, inputs):
        layer, layer_cache, idx = inputs
        h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
        q = (h @ layer.wq).reshape(*lead, cfg.num_heads, cfg.head_dim)
        k = (h @ layer.wk).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        v = (h @ layer.wv).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, inv_freq)
        attn, layer_cache = attention_fn(idx, layer_cache, q, k, v, positions)
        attn = attn.reshape(*lead, cfg.num_heads * cfg.head_dim)
        x = x + cfg.residual_multiplier * (attn @ layer.wo)
        h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
        x = x + cfg.residual_multiplier * mlp(layer, h)
        return x, layer_cache

    x, cache = jax.lax.scan(layer_step, x, (params.layers, cache, jnp.arange(cfg.num_layers)))
    return rms_norm(x, params.final_norm, cfg.rms_norm_eps), cache


def compute_logits(params: Params, cfg: ModelConfig, hidden):
    """Final hidden states [..., H] -> fp32 logits [..., V] (Granite divides by logits_scaling)."""
    w = params.embed.T if params.lm_head is None else params.lm_head
    return (hidden @ w).astype(jnp.float32) / cfg.logits_scaling


# ----------------------------------------------------------------------------
# Dense cache: [L, B, T_max, Hkv, D] post-RoPE keys, written at each token's position.


@_pytree_dataclass
class DenseKVCache:
    k: jax.Array  # [L, B, T_max, Hkv, D]
    v: jax.Array


def init_dense_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> DenseKVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return DenseKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def _dense_attention(cfg: ModelConfig, inv_freq, idx, layer_cache, q, k, v, positions):
    del idx
    k_cache, v_cache = layer_cache
    B, T = positions.shape
    k = apply_rope(k, positions, inv_freq)
    rows = jnp.arange(B)[:, None]
    # Positions past the cache (right padding of short prompts) are dropped.
    k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype), mode="drop")
    G = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(B, T, cfg.num_kv_heads, G, cfg.head_dim).astype(jnp.float32)
    s = jnp.einsum("bthgd,bkhd->bhgtk", qg, k_cache.astype(jnp.float32)) * cfg.sm_scale
    key_pos = jnp.arange(k_cache.shape[1])
    mask = key_pos[None, None, None, None, :] <= positions[:, None, None, :, None]
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhgtk,bkhd->bthgd", p, v_cache.astype(jnp.float32))
    return out.reshape(B, T, cfg.num_heads, cfg.head_dim).astype(q.dtype), (k_cache, v_cache)


def forward_dense(params: Params, cfg: ModelConfig, tokens, positions, cache: DenseKVCache):
    """tokens, positions [B, T] -> (final hidden [B, T, H], cache).

    Every row attends to cache slots 0..position, so rows of different lengths
    are right-padded and decode at their own positions.
    """
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    attention = functools.partial(_dense_attention, cfg, inv_freq)
    hidden, (k, v) = decoder(params, cfg, tokens, positions, (cache.k, cache.v), attention)
    return hidden, DenseKVCache(k=k, v=v)


# ----------------------------------------------------------------------------
# Paged cache: pre-RoPE keys in a page pool; visibility through block tables.


@_pytree_dataclass
class PagedKVCache:
    k: jax.Array  # [L, num_pages, page_size, Hkv, D], keys before RoPE
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> PagedKVCache:
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return PagedKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@_pytree_dataclass
class PagedAttentionMeta:
    """Per-step metadata of a flat ragged batch (see kernels/span_attention/reference.py)."""

    slot_mapping: jax.Array  # [T] page * page_size + offset where each token's K/V goes; -1 = padding
    block_tables: jax.Array  # [S, M]
    block_pos: jax.Array  # [S, M]
    block_lens: jax.Array  # [S, M]
    cu_q_lens: jax.Array  # [S + 1]


def _paged_attention(cfg: ModelConfig, inv_freq, attention_impl, meta: PagedAttentionMeta, idx, layer_cache, q, k, v, positions):
    del idx
    k_pages, v_pages = layer_cache
    N, P = k_pages.shape[:2]
    flat = jnp.where(meta.slot_mapping < 0, N * P, meta.slot_mapping)  # out of range -> dropped
    k_pages = k_pages.reshape(N * P, *k_pages.shape[2:]).at[flat].set(k.astype(k_pages.dtype), mode="drop").reshape(k_pages.shape)
    v_pages = v_pages.reshape(N * P, *v_pages.shape[2:]).at[flat].set(v.astype(v_pages.dtype), mode="drop").reshape(v_pages.shape)
    out = attention_impl(
        q,
        k_pages,
        v_pages,
        meta.block_tables,
        meta.block_pos,
        meta.block_lens,
        meta.cu_q_lens,
        positions,
        rope_inv_freq=inv_freq,
        sm_scale=cfg.sm_scale,
    )
    return out, (k_pages, v_pages)


def forward_paged(params: Params, cfg: ModelConfig, tokens, positions, cache: PagedKVCache, meta: PagedAttentionMeta, attention_impl=None):
    """tokens, positions [T] (flat ragged batch) -> (final hidden [T, H], cache).

    Writes every token's pre-RoPE K/V to `meta.slot_mapping`, then attends over
    the pages each token's sequence lists. `attention_impl` defaults to the jnp
    reference; the kernel dispatcher passes the Pallas kernel on accelerators.
    """
    if attention_impl is None:
        from kernels.span_attention.reference import span_attention_reference as attention_impl
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    attention = functools.partial(_paged_attention, cfg, inv_freq, attention_impl, meta)
    hidden, (k, v) = decoder(params, cfg, tokens, positions, (cache.k, cache.v), attention)
    return hidden, PagedKVCache(k=k, v=v)
