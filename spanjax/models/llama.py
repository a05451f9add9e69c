"""Functional Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Granite 3.x).

Parameters and caches are `flax.struct` dataclasses (pytrees) with the layers
stacked on a leading axis, so the decoder is one `lax.scan` over a pure function
(compile time does not grow with depth); the KV cache rides in the scan carry
and is updated in place. Attention is pluggable: `forward_dense` keeps a classic
[B, T_max] cache of post-RoPE keys (the simple generator and a reference), while
`forward_paged` writes pre-RoPE keys into a page pool and runs ragged paged span
attention over a `SpanBatchMeta` (the engine's path; see kernels/span_attention).

Weights are stored [in, out] so projections are `x @ w` (`linear`: fp32 accumulation), or
block-quantized [out, in] as GGUF stores them (`BlockQuantized`, see kernels/quantized_matmul),
or fp32 packed in column panels for the CPU kernel (`PackedMatrix`, kernels/packed_matmul):
`linear` dispatches on the type, so any matrix field may be any of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels.packed_matmul import PackedMatrix, is_packed, pack, packed_matmuls
from spanjax.kernels.quantized_matmul import (
    BlockQuantized,
    is_block_quantized,
    quantized_matmul,
    quantized_matmuls,
    take_rows,
)
from spanjax.kernels.rope import apply_rope
from spanjax.kernels.span_attention.meta import SpanBatchMeta, check_inputs
from spanjax.kernels.span_attention.reference import span_attention_reference
from spanjax.models.config import ModelConfig


@flax.struct.dataclass
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


# LayerParams' weight matrices (the rest are norm vectors)
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@flax.struct.dataclass
class UnrolledLayers:
    """Stacked layers that the decoder unrolls over (`unstack_layers`, block-quantized or packed
    weights): layer i views each such matrix of the stack in place (`at_layer`, read at an
    offset by the CPU kernels) and slices the small dense fields (the norms)."""

    stack: LayerParams

    @property
    def num_layers(self) -> int:
        return self.stack.attn_norm.shape[0]

    def layer(self, i: int) -> LayerParams:
        view = lambda a: a.at_layer(i) if _in_place(a) else a[i]  # noqa: E731
        return jax.tree.map(view, self.stack, is_leaf=_in_place)


def _in_place(x) -> bool:
    """Whether x is a matrix the CPU kernels read a layer of in place (block-quantized, packed)."""
    return is_block_quantized(x) or is_packed(x)


@flax.struct.dataclass
class Params:
    embed: jax.Array  # [V, H]
    # stacked (leading axis L), one per layer, or stacked and unrolled over (`unstack_layers`)
    layers: LayerParams | tuple[LayerParams, ...] | UnrolledLayers
    final_norm: jax.Array  # [H]
    lm_head: jax.Array | PackedMatrix | None  # [H, V]; None when tied to `embed` (packed: a copy)


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


def unstack_layers(params: Params, pack_matrices: bool = False) -> Params:
    """The same weights with `layers` as a tuple of per-layer LayerParams (one buffer per weight).

    The decoder unrolls its layer loop over unstacked layers, which inference on CPU wants: a
    `lax.scan` over stacked weights copies every layer's slice out of the stack on each step
    (and converts bf16 slices to fp32), so the engine unstacks. Training keeps them stacked
    (the scan's compile time does not grow with depth).

    Where every matrix of the layers is block-quantized, nothing is copied: the layers stay
    stacked (`UnrolledLayers`) and the kernels read each layer of a stack in place. A step then
    takes a few dozen arrays instead of one per layer and matrix (SmolLM2 with lane copies:
    ~50 instead of ~1,300), and each array a step takes costs its dispatch ~1 us on CPU.

    pack_matrices: fp32 matrices are packed in column panels (`PackedMatrix`) and, like
    block-quantized ones, stay stacked: the CPU kernel reads a layer in place (the engine on
    CPU; kernels/packed_matmul says why)."""
    if isinstance(params.layers, (tuple, UnrolledLayers)):
        return params
    layers = params.layers
    if pack_matrices:
        fp32 = lambda a: isinstance(a, jax.Array | np.ndarray) and a.dtype == jnp.float32  # noqa: E731
        layers = layers.replace(**{f: pack(getattr(layers, f)) for f in LAYER_MATRICES if fp32(getattr(layers, f))})
        # The LM head too; a tied one gets its own packed copy of embed.T (embed stays for the
        # token lookup): 113 MB more for SmolLM2, where XLA's one-row dot over the tied [V, H]
        # table took 4-7 ms of each step, the kernel ~4.
        if params.lm_head is None:
            head = params.embed.T if fp32(params.embed) else None  # a block-quantized table stays tied
        else:
            head = params.lm_head
        if fp32(head):
            params = params.replace(lm_head=pack(head))
    if all(_in_place(getattr(layers, f)) for f in LAYER_MATRICES):
        return params.replace(layers=UnrolledLayers(layers))
    n = layers.attn_norm.shape[0]
    return params.replace(layers=tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)))


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def _dot_f32(x, w, w_in_axis: int):
    """x [..., in] contracted with w's `w_in_axis`, accumulated and returned in fp32.

    Asking for an fp32 result is what makes bf16 fast on XLA CPU: a bf16 x bf16 -> bf16 dot
    converts the whole weight to fp32 first (slower than fp32 weights), while bf16 x bf16 ->
    fp32 runs the bf16 GEMM (2-3x faster than fp32). A single row is padded to two: XLA CPU
    runs a one-row bf16 product (a matrix-vector product) by converting the weight as well."""
    lead, rows = x.shape[:-1], math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1]).astype(w.dtype)
    if rows == 1 and w.dtype != jnp.float32:
        x2 = jnp.concatenate([x2, x2])
    y = jax.lax.dot_general(x2, w, (((1,), (w_in_axis,)), ((), ())), preferred_element_type=jnp.float32)
    return y[:rows].reshape(*lead, y.shape[-1])


def linear(x, w, rows=None):
    """x [..., in] @ w [in, out], accumulated in fp32 and rounded to x's dtype: what transformers'
    bf16 does too. A block-quantized w ([out, in]) goes through `quantized_matmul`, a packed one
    through `packed_matmuls`. rows: how many leading rows of x hold tokens (the rest padding);
    the packed kernel skips the others and leaves them zero, other paths compute every row."""
    if isinstance(w, BlockQuantized):
        return quantized_matmul(x, w).astype(x.dtype)
    if isinstance(w, PackedMatrix):
        return packed_matmuls(x, (w,), rows)[0].astype(x.dtype)
    return _dot_f32(x, w, 0).astype(x.dtype)


def linears(x, ws, rows=None):
    """`linear(x, w, rows)` for each w of `ws`; block-quantized or packed ones in one product call
    (on CPU one kernel call: a decode step's small k and v products would each pay a call's
    fixed cost)."""
    if all(isinstance(w, BlockQuantized) for w in ws):
        return tuple(y.astype(x.dtype) for y in quantized_matmuls(x, tuple(ws)))
    if all(isinstance(w, PackedMatrix) for w in ws):
        return tuple(y.astype(x.dtype) for y in packed_matmuls(x, tuple(ws), rows))
    return tuple(linear(x, w, rows) for w in ws)


def has_quantized_weights(tree) -> bool:
    """Whether any leaf of `tree` (Params, or anything holding them) is block-quantized."""
    return any(is_block_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_block_quantized))


def embed_tokens(params: Params, tokens):
    """Rows of the embedding table for `tokens` (only those rows are expanded when quantized)."""
    if isinstance(params.embed, BlockQuantized):
        return take_rows(params.embed, tokens)
    return params.embed[tokens]


def mlp(layer: LayerParams, x, rows=None):
    gate, up = linears(x, (layer.w_gate, layer.w_up), rows)
    return linear(jax.nn.silu(gate) * up, layer.w_down, rows)


# attention_fn(layer_index, cache, q_roped, k_raw, v, positions) -> (out, cache)
AttentionFn = Callable


def decoder(
    params: Params,
    cfg: ModelConfig,
    tokens,
    positions,
    cache,
    attention_fn: AttentionFn,
    adapter=None,
    adapter_mask=None,
    rows=None,
):
    """Embedding -> L layers -> final norm. Token axes are [..., T]; returns (hidden, cache).

    `cache` is any pytree whose leaves have a leading [L] axis. It rides in the
    scan carry, whole, and `attention_fn` updates layer `layer_index` of it in
    place: passing per-layer slices as scan inputs/outputs would make XLA copy
    the entire KV pool every step.

    `adapter` (a spanjax.adapters.AdapterBank) adds LoRA deltas per token:
    `adapter_mask` [..., T] is a bool mask (adapter 0) or an int adapter index
    (-1 = base weights); None applies adapter 0 everywhere.

    `rows` (flat ragged batches): how many leading tokens are real, the rest padding whose
    products the packed CPU kernel may skip (`linear`); None = all.
    """
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    x = embed_tokens(params, tokens) * jnp.asarray(cfg.embedding_multiplier, params.embed.dtype)
    lead = tokens.shape
    ids = None if adapter is None else adapter.token_ids(adapter_mask, lead)

    def layer_step(x, cache, layer, idx, lora):
        def proj(module, h, w):  # x W, plus the adapter's per-token delta when one is given
            y = linear(h, w, rows)
            return y if adapter is None else adapter.apply(module, lora, idx, h, y, ids)

        h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
        if adapter is None:
            q, k, v = linears(h, (layer.wq, layer.wk, layer.wv), rows)
        else:
            q, k, v = (proj(m, h, w) for m, w in (("q_proj", layer.wq), ("k_proj", layer.wk), ("v_proj", layer.wv)))
        q = q.reshape(*lead, cfg.num_heads, cfg.head_dim)
        k = k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, inv_freq)
        attn, cache = attention_fn(idx, cache, q, k, v, positions)
        attn = attn.reshape(*lead, cfg.num_heads * cfg.head_dim)
        x = x + cfg.residual_multiplier * proj("o_proj", attn, layer.wo)
        h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
        if adapter is None:
            m = mlp(layer, h, rows)
        else:
            m = proj(
                "down_proj",
                jax.nn.silu(proj("gate_proj", h, layer.w_gate)) * proj("up_proj", h, layer.w_up),
                layer.w_down,
            )
        x = x + cfg.residual_multiplier * m
        return x, cache

    lora_layers = None if adapter is None else adapter.layers
    layers = params.layers
    if isinstance(layers, UnrolledLayers):
        layers = tuple(layers.layer(i) for i in range(layers.num_layers))
    if isinstance(layers, tuple):  # unrolled (see `unstack_layers`)
        for i, layer in enumerate(layers):
            lora = None if lora_layers is None else jax.tree.map(lambda a, i=i: a[i], lora_layers)
            x, cache = layer_step(x, cache, layer, i, lora)
    else:

        def scan_step(carry, inputs):
            return layer_step(*carry, *inputs), None

        (x, cache), _ = jax.lax.scan(scan_step, (x, cache), (params.layers, jnp.arange(cfg.num_layers), lora_layers))
    return rms_norm(x, params.final_norm, cfg.rms_norm_eps), cache


def compute_logits(params: Params, cfg: ModelConfig, hidden):
    """Final hidden states [..., H] -> fp32 logits [..., V] (Granite divides by logits_scaling)."""
    head = params.embed if params.lm_head is None else params.lm_head
    if isinstance(head, PackedMatrix):
        return packed_matmuls(hidden, (head,))[0] / cfg.logits_scaling
    if isinstance(head, BlockQuantized):  # [V, H] blocks either way
        return quantized_matmul(hidden, head) / cfg.logits_scaling
    if params.lm_head is None:  # tied: contract with embed [V, H] as it lies (`embed.T` would copy it)
        return _dot_f32(hidden, params.embed, 1) / cfg.logits_scaling
    return _dot_f32(hidden, params.lm_head, 0) / cfg.logits_scaling


# ----------------------------------------------------------------------------
# Dense cache: [L, B, T_max, Hkv, D] post-RoPE keys, written at each token's position.


@flax.struct.dataclass
class DenseKVCache:
    k: jax.Array  # [L, B, T_max, Hkv, D]
    v: jax.Array


def _first_maximum(x):
    """The index of the first maximum over the last axis (a NaN counts as the maximum), as a max
    and a min over positions: XLA CPU runs argmax's paired (value, index) reduction ~5x slower."""
    V = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def greedy_tokens(logits, width: int = 128):
    """jnp.argmax over the last axis (the first of equal maxima; a NaN counts as the maximum), in
    two levels: the first block of `width` holding the maximum, then the first maximum in it. The
    compare-and-select pass then covers one block, not the vocabulary: eight rows of a 49k
    vocabulary 0.18 -> 0.08 ms on 2 cores (one level; jnp.argmax ~0.85 ms)."""
    *lead, V = logits.shape
    pad = -V % width  # -inf padding is never the first maximum (an all--inf row gives 0 either way)
    x = jnp.pad(logits, [(0, 0)] * len(lead) + [(0, pad)], constant_values=-jnp.inf) if pad else logits
    blocks = x.reshape(*lead, -1, width)
    block = _first_maximum(jnp.max(blocks, axis=-1))
    within = _first_maximum(jnp.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :])
    return block * width + within


def init_dense_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> DenseKVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return DenseKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def _dense_attention(cfg: ModelConfig, inv_freq, idx, cache, q, k, v, positions):
    k_all, v_all = cache
    B, T = positions.shape
    k = apply_rope(k, positions, inv_freq)
    rows = jnp.arange(B)[:, None]
    # Positions past the cache (right padding of short prompts) are dropped.
    k_all = k_all.at[idx, rows, positions].set(k.astype(k_all.dtype), mode="drop")
    v_all = v_all.at[idx, rows, positions].set(v.astype(v_all.dtype), mode="drop")
    key_pos = jnp.arange(k_all.shape[2])
    mask = key_pos[None, None, :] <= positions[:, :, None]
    return masked_attention(cfg, q, k_all[idx], v_all[idx], mask), (k_all, v_all)


def masked_attention(cfg: ModelConfig, q, k, v, mask):
    """Dense attention with an explicit mask: q [B, T, Hq, D] (rotated), k [B, K, Hkv, D]
    (rotated), v [B, K, Hkv, D], mask [B, T, K] bool (True = visible) -> [B, T, Hq, D]. fp32 softmax."""
    B, T = q.shape[:2]
    G = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(B, T, cfg.num_kv_heads, G, cfg.head_dim).astype(jnp.float32)
    s = jnp.einsum("bthgd,bkhd->bhgtk", qg, k.astype(jnp.float32)) * cfg.sm_scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhgtk,bkhd->bthgd", p, v.astype(jnp.float32))
    return out.reshape(B, T, cfg.num_heads, cfg.head_dim).astype(q.dtype)


def forward_dense(
    params: Params, cfg: ModelConfig, tokens, positions, cache: DenseKVCache, adapter=None, adapter_mask=None
):
    """tokens, positions [B, T] -> (final hidden [B, T, H], cache).

    Every row attends to cache slots 0..position, so rows of different lengths
    are right-padded and decode at their own positions.
    """
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    attention = functools.partial(_dense_attention, cfg, inv_freq)
    hidden, (k, v) = decoder(params, cfg, tokens, positions, (cache.k, cache.v), attention, adapter, adapter_mask)
    return hidden, DenseKVCache(k=k, v=v)


# ----------------------------------------------------------------------------
# Paged cache: pre-RoPE keys in a page pool; visibility through block tables.


@flax.struct.dataclass
class PagedKVCache:
    """The page pool, every layer's pages in one array: layer l's page i is row l * num_pages + i.
    A bf16 pool is stored as its uint16 bit patterns (`pool_storage_dtype`).

    Flat, not [L, num_pages, ...]: the attention addresses all layers' pages as one pool (a
    layer's block table plus l * num_pages), and a reshape between a layer's cache write and
    its reader made XLA CPU duplicate the write into a second, reshaped buffer with copies of
    the whole pool around it whenever the reader was an FFI kernel (or the step's output)."""

    k: jax.Array  # [num_layers * num_pages, page_size, Hkv, D], keys before RoPE
    v: jax.Array
    num_layers: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def dtype(self):
        """The dtype of the values held (bf16 for a pool stored as uint16 bits)."""
        return jnp.dtype(jnp.bfloat16) if self.k.dtype == jnp.uint16 else self.k.dtype

    @property
    def num_pages(self) -> int:
        """Pages per layer."""
        return self.k.shape[0] // self.num_layers

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    def by_layer(self, x: jax.Array) -> jax.Array:
        """`x` (self.k or self.v) as [num_layers, num_pages, page_size, Hkv, D], for inspection."""
        return x.reshape(self.num_layers, self.num_pages, *x.shape[1:])


def pool_storage_dtype(dtype):
    """What a pool of `dtype` values is stored as: bf16 as uint16 bit patterns. XLA CPU has no
    bf16 scatter or gather and converts the whole pool around each one; a bitcast inside the
    step does not help either (the donated buffer cannot change type in place, so the pool was
    copied twice per step). The kernels read uint16 pools as bf16 (span_attention/meta.py)."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> PagedKVCache:
    shape = (cfg.num_layers * num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    storage = pool_storage_dtype(dtype)
    return PagedKVCache(k=jnp.zeros(shape, storage), v=jnp.zeros(shape, storage), num_layers=cfg.num_layers)


def _write_slots(pool, index, values):
    """pool.at[index].set(values), out-of-range indices dropped, in place under donation.
    A uint16 pool holds bf16 bits (`pool_storage_dtype`) and is written as such."""
    if pool.dtype != jnp.uint16:
        return pool.at[index].set(values.astype(pool.dtype), mode="drop")
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), jnp.uint16)
    return pool.at[index].set(bits, mode="drop")


def _paged_attention(
    cfg: ModelConfig, inv_freq, attention_impl, meta: SpanBatchMeta, num_pages: int, idx, cache, q, k, v, positions
):
    """One layer's cache write and attention over the flat pool (`PagedKVCache`): this layer's
    page i is row idx * N + i."""
    k_all, v_all = cache
    N, P = num_pages, k_all.shape[1]
    if meta.slot_mapping is None:
        raise ValueError("forward_paged: meta.slot_mapping is missing (where each token's K/V is written)")
    k_layer, v_layer = (jax.ShapeDtypeStruct((N, *x.shape[1:]), x.dtype) for x in cache)
    check_inputs(q, k_layer, v_layer, meta, positions, inv_freq)  # before the cache write, naming the bad field
    pages = jnp.where(meta.slot_mapping < 0, k_all.shape[0], idx * N + meta.slot_mapping // P)  # out of range: dropped
    slots = meta.slot_mapping % P
    k_all = _write_slots(k_all, (pages, slots), k)
    v_all = _write_slots(v_all, (pages, slots), v)
    meta = meta.replace(block_tables=meta.block_tables + idx * N)
    out = attention_impl(q, k_all, v_all, meta, positions, rope_inv_freq=inv_freq, sm_scale=cfg.sm_scale)
    return out, (k_all, v_all)


def forward_paged(
    params: Params,
    cfg: ModelConfig,
    tokens,
    positions,
    cache: PagedKVCache,
    meta: SpanBatchMeta,
    attention_impl=None,
    adapter=None,
    adapter_mask=None,
    rows=None,
):
    """tokens, positions [T] (flat ragged batch) -> (final hidden [T, H], cache).

    Writes every token's pre-RoPE K/V to `meta.slot_mapping`, then attends over
    the pages each token's sequence lists (with the per-entry logit scale and bias
    when `meta` carries `block_logit_scale` / `block_logit_bias`: they pass through
    to the attention unchanged, like the rest of `meta`). `attention_impl` (the span-attention
    contract, kernels/span_attention/meta.py) defaults to the per-token jnp
    reference; the engine passes `get_attention_impl()`'s choice (the tiled XLA
    path on CPU, the Pallas kernel on GPU/TPU). `rows`: the real tokens (`decoder`), e.g.
    `meta.cu_q_lens[-1]` when the padding follows them.
    """
    attention_impl = span_attention_reference if attention_impl is None else attention_impl
    inv_freq = cfg.rope_inv_freq()  # numpy: tables of it alone become constants of the program
    prepare = getattr(attention_impl, "prepare_meta", None)  # per-step work, once for all layers
    if prepare is not None:
        meta = prepare(meta, cache.page_size, inv_freq)
    # Every layer writes into and attends over the one flat pool (layer l's page i is row
    # l * N + i). Slicing out a layer's pages instead copies its whole slice of the pool on
    # every layer of every step: a step then costs what the pool costs, not its tokens.
    if cache.num_layers != cfg.num_layers:
        raise ValueError(f"forward_paged: the pool holds {cache.num_layers} layers, the model has {cfg.num_layers}")
    attention = functools.partial(_paged_attention, cfg, inv_freq, attention_impl, meta, cache.num_pages)
    hidden, (k, v) = decoder(params, cfg, tokens, positions, (cache.k, cache.v), attention, adapter, adapter_mask, rows)
    return hidden, cache.replace(k=k, v=v)
