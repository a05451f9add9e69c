"""Ragged paged span attention in plain jnp, blocked by query tiles: the path for any backend
without a Pallas kernel, and for CPU where the C++ kernels (`cpu.py`) are not built or do not
take the shapes; on CPU with them, `span_attention_xla` is one kernel call.

Same contract as every implementation (`meta.py`), same tiling as the Pallas kernels
(`tiling.py`): tokens are grouped into tiles of up to `block_q` tokens of ONE
sequence. The loop walks a work list of (tile, page group) items, as many items
per iteration as there are tiles (few, large operations, which is what XLA on CPU
runs well), so each tile costs the page groups it needs: a decode token over a
long context does not make the short chunks beside it walk that context too. The
reference gathers per token, which is the clearest statement of the semantics but
moves T times more KV through memory during a long prefill chunk. Unused tiles
(sequences the caller padded) cost nothing but their share of the packing, and
decode-only batches take `decode_attention`.
"""

import jax
import jax.numpy as jnp

from spanjax.kernels.rope import apply_rope, rope_tables, rotate
from spanjax.kernels.span_attention import cpu, tiling
from spanjax.kernels.span_attention.meta import SpanBatchMeta, check_inputs, gather_pages
from spanjax.kernels.span_attention.reference import online_softmax_finish, online_softmax_init, online_softmax_step


def default_block_q(num_tokens: int, num_seqs: int) -> int:
    """Tokens per tile, about the tokens per sequence (decode tiles are one token,
    prefill tiles large), a power of two in [1, 64]. Every sequence may end in a
    partial tile, so the padding is at most num_seqs * block_q rows, about T."""
    target = max(1, num_tokens // max(1, num_seqs))
    return min(64, 1 << (target.bit_length() - 1))


def key_slots(block_pos, block_lens, page_size: int):
    """Every listed slot's key position and whether it holds a key, each [S, M * page_size]
    (entry-major, like the gathered pages)."""
    slot = jnp.arange(page_size, dtype=jnp.int32)
    kpos = (block_pos.astype(jnp.int32)[:, :, None] + slot).reshape(block_pos.shape[0], -1)
    valid = (slot < block_lens.astype(jnp.int32)[:, :, None]).reshape(block_pos.shape[0], -1)
    return kpos, valid


# Decode batches of at least this many sequences (the padded bucket) take keys-major scores,
# [S, keys, Hq]. SmolLM2-135M fp32 engine step after 512 tokens, 2-core EPYC, keys-major vs
# queries-major: 8 sequences 132-158 vs 169-171 ms, 4: 102-127 vs 145-151, 2: 75-81 vs 81-94;
# one sequence no faster, so it keeps [S, Hq, keys].
KEYS_MAJOR_MIN_SEQS = 2


def decode_attention(q, k_pages, v_pages, meta: SpanBatchMeta, q_pos, *, rope_inv_freq, sm_scale):
    """The decode shape: at most one query token per sequence (`meta.max_q_len == 1`).

    One pass per sequence over its whole block table (no tiles, no loop): a decode step's
    attention is a few large operations instead of a loop of small ones, and the keys'
    positions, masks and RoPE angles depend only on the metadata, so XLA computes them once
    for all layers of an unrolled model. Work is S x M x page_size (M = the bucketed table
    width), which for decode is what the step has to read anyway.

    K and V stay in the pool's own layout, [S, keys, Hkv * D] with rows contiguous, and the
    products run against a block-diagonal query [S, Hq, Hkv * D] (each query head's vector in
    its KV head's block, zeros elsewhere). That does Hkv times the multiply-adds, which are
    cheap here, and spares the transpose a per-head product needs: XLA CPU fused the gather,
    the RoPE and a transpose to [S, Hkv, D, keys] into one strided loop, about 2 ms per layer
    at 8 sequences x 1024 keys (SmolLM2-135M, 2 cores), most of a decode step."""
    n = check_inputs(q, k_pages, v_pages, meta, q_pos, rope_inv_freq)
    S, M, P, Hkv, G, D, T = n.S, n.M, n.P, n.Hkv, n.G, n.D, n.T
    tables, pos, lens = tiling.pad_block_tables(meta.block_tables, meta.block_pos, meta.block_lens, n.N, 1)
    cu = meta.cu_q_lens.astype(jnp.int32)
    has_token = cu[1:] > cu[:-1]  # [S]
    tok = jnp.where(has_token, cu[:-1], T)  # the sequence's query token (T = none: dropped below)
    tok_in = jnp.minimum(tok, T - 1)  # where it is read from (sequences without one read junk, masked)
    kpos, valid = key_slots(pos, lens, P)
    qpos = q_pos.astype(jnp.int32)[tok_in]
    seen = valid & (kpos <= qpos[:, None]) & has_token[:, None]
    key_rope = rope_tables(kpos, rope_inv_freq) if meta.key_rope is None else meta.key_rope
    k = rotate(gather_pages(k_pages, tables).reshape(S, M * P, Hkv, D), *key_rope)
    k = k.reshape(S, M * P, Hkv * D)
    v = gather_pages(v_pages, tables).reshape(S, M * P, Hkv * D)
    v = jnp.where(seen[:, :, None], v, 0.0)  # junk in unseen slots must not leak
    heads = jnp.eye(Hkv, dtype=jnp.float32)
    qs = q[tok_in].astype(jnp.float32).reshape(S, Hkv, G, D) * sm_scale
    q_blocks = jnp.einsum("shgd,hj->shgjd", qs, heads).reshape(S, n.Hq, Hkv * D)
    # Scores [S, Hq, keys], or keys-major from KEYS_MAJOR_MIN_SEQS sequences on (measured there).
    keys_major = S >= KEYS_MAJOR_MIN_SEQS
    key_axis, per_key = (1, lambda x: x[:, :, None]) if keys_major else (2, lambda x: x[:, None, :])
    s = jnp.einsum("skc,sqc->skq", k, q_blocks) if keys_major else jnp.einsum("sqc,skc->sqk", q_blocks, k)
    weights = tiling.pad_logit_weights(meta, M)
    if weights is not None:  # per entry, repeated over its slots
        scale, bias = (per_key(jnp.repeat(w, P, axis=1)) for w in weights)
        s = s * scale + bias
    s = jnp.where(per_key(seen), s, -jnp.inf)
    m = s.max(axis=key_axis, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # rows that saw nothing: exp(-inf) = 0
    l = p.sum(axis=key_axis)
    o = jnp.einsum("skq,skc->sqc" if keys_major else "sqk,skc->sqc", p, v).reshape(S, Hkv, G, Hkv, D)
    o = jnp.einsum("shgjd,hj->shgd", o, heads).reshape(S, n.Hq, D)  # each head's own block
    out = online_softmax_finish(l.reshape(S, n.Hq), o)
    return jnp.zeros((T, n.Hq, D), q.dtype).at[tok].set(out.astype(q.dtype), mode="drop")


def with_key_rope(meta: SpanBatchMeta, page_size: int, rope_inv_freq) -> SpanBatchMeta:
    """`meta` with its `key_rope` tables filled: what a step does once, before its layers.

    The tables are computed inside a branch, so they are materialized once: inlined, XLA CPU
    fuses sin and cos into every layer's rotation and evaluates them per head and dimension
    (about 3 ms per layer at 8 sequences x 1024 keys, more than the rest of the attention).
    An optimization barrier does not survive its pipeline; a conditional's result does.
    `cu_q_lens[0] >= 0` always holds."""
    S, M = meta.block_tables.shape
    kpos, _ = key_slots(meta.block_pos, meta.block_lens, page_size)
    half = rope_inv_freq.shape[-1]
    tables = jax.lax.cond(
        meta.cu_q_lens[0] >= 0,
        lambda: rope_tables(kpos, rope_inv_freq),
        lambda: (jnp.zeros((S, M * page_size, 1, half), jnp.float32),) * 2,
    )
    return meta.replace(key_rope=tables)


def prepare_meta(meta: SpanBatchMeta, page_size: int, rope_inv_freq) -> SpanBatchMeta:
    """What this path wants computed once per step rather than per layer: the keys' RoPE
    tables (`with_key_rope`). Callers use it through the
    `prepare_meta` attribute of `get_attention_impl()`'s callable."""
    return meta if meta.key_rope is not None else with_key_rope(meta, page_size, rope_inv_freq)


def span_attention_xla(
    q,
    k_pages,
    v_pages,
    meta: SpanBatchMeta,
    q_pos,
    *,
    rope_inv_freq,
    sm_scale,
    block_q=None,
    pages_per_step=8,
):
    """Same result as `span_attention_reference`; `block_q` None picks `default_block_q`.
    On CPU, where the C++ kernels are built and take the shapes (`cpu.py`), the call is one
    kernel call (decode-only batches, `meta.max_q_len == 1`, their own); elsewhere decode-only
    batches take `decode_attention` and the rest the tiled loop below."""
    n = check_inputs(q, k_pages, v_pages, meta, q_pos, rope_inv_freq)
    args = (q, k_pages, v_pages, meta, q_pos)
    if meta.max_q_len == 1:
        jnp_path = lambda: decode_attention(*args, rope_inv_freq=rope_inv_freq, sm_scale=sm_scale)  # noqa: E731
    else:
        jnp_path = lambda: tiled_attention(  # noqa: E731
            *args, n, rope_inv_freq=rope_inv_freq, sm_scale=sm_scale, block_q=block_q, pages_per_step=pages_per_step
        )
    if not cpu.supports(n, k_pages.dtype):
        return jnp_path()
    kernel = lambda: cpu.attention_cpu(*args, n, rope_inv_freq=rope_inv_freq, sm_scale=sm_scale)  # noqa: E731
    return jax.lax.platform_dependent(cpu=kernel, default=jnp_path)


def tiled_attention(
    q, k_pages, v_pages, meta: SpanBatchMeta, q_pos, n, *, rope_inv_freq, sm_scale, block_q, pages_per_step
):
    """Any batch, as tiles of query tokens over page groups (the module docstring); `n` from
    `check_inputs`."""
    S, Hkv, G, D, page_size = n.S, n.Hkv, n.G, n.D, n.P
    block_q = block_q or default_block_q(n.T, S)
    block_q = max(1, min(block_q, tiling.next_pow2(n.T)))
    step = max(1, min(pages_per_step, n.M))
    tb = tiling.tile_batch(q, k_pages, meta, q_pos, block_q=block_q, g_pad=G, pages_per_block=step)
    tables, pos, lens, tiles, row_pos = tb.tables, tb.pos, tb.lens, tb.tiles, tb.row_pos  # row_pos [nt, R]
    qt = tb.q.astype(jnp.float32) * sm_scale  # [nt, Hkv, R, D]
    R = qt.shape[2]
    key_rope = meta.key_rope
    if key_rope is not None:  # padded like the block tables (the padding slots are never seen)
        pad = ((0, 0), (0, (tables.shape[1] - n.M) * page_size), (0, 0), (0, 0))
        key_rope = tuple(jnp.pad(t, pad) for t in key_rope)

    # Every key's position and validity, [S, keys], computed here, outside the loop, so the
    # loop gathers stored arrays: derived inside it from the page group's entries, they were
    # fused into the mask and exp loops as per-element index arithmetic, which XLA CPU ran
    # ~10x slower than the same loops over stored values (a 32-token question over 4k cached
    # keys, SmolLM2-135M, 2 cores: its step went 370 -> 150 ms).
    width = step * page_size
    kpos_all, valid_all = key_slots(pos, lens, page_size)

    # The work list: one item per (tile, page group) the tile needs, tile-major, walked in
    # chunks of `nt` items, so a step costs the groups its tiles need, not every tile times
    # the longest context. (Advancing all tiles through the groups together made a decode
    # token or a short chunk beside a long-context one walk that whole context: SmolLM2-135M,
    # 2 cores, 7 decodes over ~1.5k keys beside 500 tokens of 150-token chunks cost 1.5-2.4 s
    # a step, the chunks alone 0.6 s.) A chunk may hold several groups of one tile: the online
    # softmax merges them with a scatter-max and scatter-adds into the tile's accumulators.
    nt = tb.num_tiles
    ends = jnp.cumsum(tiles.num_blocks)  # [nt] end of each tile's items
    total = ends[-1]
    slot = jnp.arange(width, dtype=jnp.int32)
    entry = jnp.arange(step, dtype=jnp.int32)

    def body(i, carry):
        m, l, acc = carry
        w = i * nt + jnp.arange(nt, dtype=jnp.int32)
        live = w < total
        tile = jnp.minimum(jnp.searchsorted(ends, w, side="right").astype(jnp.int32), nt - 1)
        group = jnp.where(live, w - (ends[tile] - tiles.num_blocks[tile]), 0)
        seq = tiles.seq[tile]
        keys = group[:, None] * width + slot  # [C, width] the item's key slots
        kpos = kpos_all[seq[:, None], keys]
        valid = valid_all[seq[:, None], keys] & live[:, None]
        cols = group[:, None] * step + entry  # [C, step] the item's block-table entries
        pages = tables[seq[:, None], cols]
        k = gather_pages(k_pages, pages).reshape(nt, width, Hkv, D)
        v = gather_pages(v_pages, pages).reshape(nt, width, Hkv, D)
        if key_rope is None:
            k = apply_rope(k, kpos, rope_inv_freq)
        else:  # tables computed once per step: inlined sin/cos run per tile, head and dimension
            k = rotate(k, *(t[seq[:, None], keys] for t in key_rope))
        v = jnp.where(valid[:, :, None, None], v, 0.0)  # junk in unseen slots must not leak
        seen = valid[:, None, None, :] & (kpos[:, None, None, :] <= row_pos[tile][:, None, :, None])  # [C, 1, R, K]
        s = jnp.einsum("nhrd,nkhd->nhrk", qt[tile], k)
        if tb.weights is not None:  # per entry, repeated over its slots: [C, 1, 1, K]
            scale, bias = (jnp.repeat(w_[seq[:, None], cols], page_size, axis=1)[:, None, None, :] for w_ in tb.weights)
            s = s * scale + bias
        p, (m, l, acc) = online_softmax_step((m, l, acc), s, seen, rows=tile)
        return m, l, acc.at[tile].add(jnp.einsum("nhrk,nkhd->nhrd", p, v))

    num_chunks = (total + nt - 1) // nt
    m, l, acc = jax.lax.fori_loop(0, num_chunks, body, online_softmax_init((nt, Hkv, R), D))
    return tiling.untile(online_softmax_finish(l, acc), tb, q.dtype)
