"""Ragged paged span attention: the semantics, in pure jnp, one token at a time.

The contract (arguments, visibility rule, padding) is in `meta.py`. This is the
clearest statement of the semantics and what every other implementation is
tested against; it is not the engine's CPU path (that is the tiled `xla.py`,
which moves far less KV through memory during a long prefill).

The loop walks the block table `pages_per_step` pages at a time with an
online softmax, so memory stays O(T * pages_per_step * page_size).
"""

import jax
import jax.numpy as jnp

from spanjax.kernels.rope import apply_rope
from spanjax.kernels.span_attention.meta import SpanBatchMeta, check_inputs, gather_pages, logit_weights, reweighted


def token_sequence_ids(cu_q_lens, num_tokens):
    """Sequence index of every token and whether it belongs to any sequence."""
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], tok, side="right").astype(jnp.int32)
    valid = tok < cu_q_lens[-1]
    return jnp.minimum(seq, cu_q_lens.shape[0] - 2), valid


def span_attention_reference(
    q,
    k_pages,
    v_pages,
    meta: SpanBatchMeta,
    q_pos,
    *,
    rope_inv_freq,
    sm_scale,
    pages_per_step=8,
):
    """Attention of every query token over the pages its sequence lists (contract: meta.py)."""
    n = check_inputs(q, k_pages, v_pages, meta, q_pos, rope_inv_freq)
    T, Hq, Hkv, G, D, page_size, M = n.T, n.Hq, n.Hkv, n.G, n.D, n.P, n.M
    block_tables, block_pos, block_lens = meta.block_tables, meta.block_pos, meta.block_lens
    seq, tok_valid = token_sequence_ids(meta.cu_q_lens, T)
    weights = logit_weights(meta) if reweighted(meta) else None

    step = max(1, min(pages_per_step, M))
    num_steps = -(-M // step)
    pad = num_steps * step - M
    if pad:  # extra entries with block_lens 0 are never seen
        block_tables = jnp.pad(block_tables, ((0, 0), (0, pad)))
        block_pos = jnp.pad(block_pos, ((0, 0), (0, pad)))
        block_lens = jnp.pad(block_lens, ((0, 0), (0, pad)))
        if weights is not None:
            weights = tuple(jnp.pad(w, ((0, 0), (0, pad)), constant_values=c) for w, c in zip(weights, (1.0, 0.0)))

    # Each token's own row of the block table, gathered once.
    tok_tables, tok_pos, tok_lens = block_tables[seq], block_pos[seq], block_lens[seq]
    tok_weights = None if weights is None else tuple(w[seq] for w in weights)
    qg = q.astype(jnp.float32).reshape(T, Hkv, G, D) * sm_scale
    slot = jnp.arange(page_size, dtype=jnp.int32)

    def body(carry, i):
        m, l, acc = carry
        cols = i * step + jnp.arange(step)
        pages = tok_tables[:, cols]  # [T, step]
        starts = tok_pos[:, cols]
        lens = tok_lens[:, cols]
        kpos = starts[:, :, None] + slot  # [T, step, P_s]
        seen = (slot < lens[:, :, None]) & (kpos <= q_pos[:, None, None]) & tok_valid[:, None, None]
        k = gather_pages(k_pages, pages)  # [T, step, P_s, Hkv, D]
        v = gather_pages(v_pages, pages)
        k = apply_rope(k.reshape(T, step * page_size, Hkv, D), kpos.reshape(T, -1), rope_inv_freq)
        v = v.reshape(T, step * page_size, Hkv, D)
        seen = seen.reshape(T, 1, 1, step * page_size)
        # Pad/unseen slots may hold anything (stale or non-finite values): 0 * inf
        # would poison the row, so unseen values are zeroed, not just weighted 0.
        v = jnp.where(seen.reshape(T, step * page_size, 1, 1), v, 0.0)
        s = jnp.einsum("thgd,tkhd->thgk", qg, k)
        if tok_weights is not None:  # per entry, repeated over its slots: [T, 1, 1, step * P]
            scale, bias = (jnp.repeat(w[:, cols], page_size, axis=1)[:, None, None, :] for w in tok_weights)
            s = s * scale + bias
        p, carry = online_softmax_step((m, l, acc), s, seen)
        m, l, acc = carry
        return (m, l, acc + jnp.einsum("thgk,tkhd->thgd", p, v)), None

    (m, l, acc), _ = jax.lax.scan(body, online_softmax_init((T, Hkv, G), D), jnp.arange(num_steps))
    return online_softmax_finish(l, acc).reshape(T, Hq, D).astype(q.dtype)


def online_softmax_init(rows_shape, head_dim):
    """(running max, running sum, accumulator) for rows of shape `rows_shape`."""
    return (
        jnp.full(rows_shape, -jnp.inf, jnp.float32),
        jnp.zeros(rows_shape, jnp.float32),
        jnp.zeros((*rows_shape, head_dim), jnp.float32),
    )


def online_softmax_step(carry, scores, seen, rows=None):
    """Fold one block of `scores` [..., K] (masked by `seen`) into the carry.

    Returns the block's unnormalized probabilities and the carry with the
    accumulator already rescaled; the caller adds `p @ v` to it. Rows that
    have seen nothing keep max -inf and contribute exact zeros (no NaN).
    `rows` ([n], optional): the carry row each block row folds into, several block
    rows may share one (the caller then adds `p @ v` with `.at[rows].add`);
    None = the block's rows are the carry's."""
    m, l, acc = carry
    s = jnp.where(seen, scores, -jnp.inf)
    if rows is None:
        m_new = jnp.maximum(m, s.max(axis=-1))
    else:
        m_new = m.at[rows].max(s.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(seen, jnp.exp(s - (m_safe if rows is None else m_safe[rows])[..., None]), 0.0)
    alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
    l = l * alpha + p.sum(axis=-1) if rows is None else (l * alpha).at[rows].add(p.sum(axis=-1))
    return p, (m_new, l, acc * alpha[..., None])


def online_softmax_finish(l, acc):
    """Normalize; rows that saw no key give zeros."""
    return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
