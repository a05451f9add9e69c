"""Ragged paged span attention in plain jnp, blocked by query tiles: the fast
path for CPU (and any backend without a Pallas kernel).

Same contract as `reference.py`, same tiling as the Pallas kernels
(`tiling.py`): tokens are grouped into tiles of up to `block_q` tokens of ONE
sequence, so each tile gathers its sequence's pages once per page group
instead of once per token. The reference gathers per token, which is the
clearest statement of the semantics but moves T times more KV through memory
during a long prefill chunk.
"""

import jax
import jax.numpy as jnp

from kernels.rope import apply_rope
from kernels.span_attention import tiling
from kernels.span_attention.reference import online_softmax_finish, online_softmax_init, online_softmax_step


def span_attention_xla(
    q,
    k_pages,
    v_pages,
    block_tables,
    block_pos,
    block_lens,
    cu_q_lens,
    q_pos,
    *,
    rope_inv_freq,
    sm_scale,
    block_q=None,
    pages_per_step=8,
):
    T, Hq, D = q.shape
    N, page_size, Hkv, _ = k_pages.shape
    S = block_tables.shape[0]
    G = Hq // Hkv
    if block_q is None:
        # Tiles are padded to block_q rows and each of S sequences may end in a
        # partial tile: keep the padding (about S * block_q rows) near T / 2.
        target = max(1, T // (2 * S))
        block_q = min(64, 1 << (target.bit_length() - 1))  # largest power of two <= target
    block_q = max(1, min(block_q, tiling.next_pow2(T)))
    step = max(1, min(pages_per_step, block_tables.shape[1]))
    tables, pos, lens = tiling.pad_block_tables(block_tables, block_pos, block_lens, N, step)
    nt = tiling.max_num_tiles(T, S, block_q)
    tiles, rpos = tiling.make_tiles(cu_q_lens, q_pos, lens, T, block_q, step, nt)
    qt, row_pos = tiling.pack_queries(q, tiles, rpos, Hkv, block_q, G)  # [nt, Hkv, R, D], [nt, R]
    qt = qt.astype(jnp.float32) * sm_scale
    R = qt.shape[2]
    t_tables, t_pos, t_lens = tables[tiles.seq], pos[tiles.seq], lens[tiles.seq]  # [nt, Mp]
    slot = jnp.arange(page_size, dtype=jnp.int32)
    num_steps = tables.shape[1] // step

    def body(carry, i):
        m, l, acc = carry
        cols = i * step + jnp.arange(step)
        pages = t_tables[:, cols]  # [nt, step]
        kpos = (t_pos[:, cols][:, :, None] + slot).reshape(nt, step * page_size)
        valid = (slot < t_lens[:, cols][:, :, None]).reshape(nt, step * page_size)
        k = k_pages[pages].astype(jnp.float32).reshape(nt, step * page_size, Hkv, D)
        v = v_pages[pages].astype(jnp.float32).reshape(nt, step * page_size, Hkv, D)
        k = apply_rope(k, kpos, rope_inv_freq)
        v = jnp.where(valid[:, :, None, None], v, 0.0)  # junk in unseen slots must not leak
        seen = valid[:, None, None, :] & (kpos[:, None, None, :] <= row_pos[:, None, :, None])  # [nt, 1, R, K]
        s = jnp.einsum("nhrd,nkhd->nhrk", qt, k)
        p, (m, l, acc) = online_softmax_step((m, l, acc), s, seen)
        return (m, l, acc + jnp.einsum("nhrk,nkhd->nhrd", p, v)), None

    (m, l, acc), _ = jax.lax.scan(body, online_softmax_init((nt, Hkv, R), D), jnp.arange(num_steps))
    return tiling.unpack_output(online_softmax_finish(l, acc), tiles, Hq, block_q, G, q.dtype)
