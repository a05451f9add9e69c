"""Tiling shared by the tiled XLA path and the GPU and TPU kernels (pure jnp, traced inside jit).

A *query tile* is up to `block_q` consecutive tokens of ONE sequence. The
kernels run one program per (tile, kv head[, kv split]); a tile's rows are its
tokens times the (padded) query heads of one KV head, row r = token (r // Gp),
head (r % Gp), so GQA packs a whole head group into one matmul.

Everything here only depends on static shapes plus the int metadata arrays, so
it traces once per shape bucket.
"""

import dataclasses

import jax
import jax.numpy as jnp

from spanjax.kernels.span_attention.meta import SpanBatchMeta, logit_weights, reweighted

# Row position of padding rows (tokens past a tile's length). Positions of real
# tokens and keys are >= 0, so `key_pos <= INVALID_POS` is never true.
INVALID_POS = -(2**30)


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a, b):
    return (a + b - 1) // b


def max_num_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Static upper bound on query tiles. A sequence of n tokens takes ceil(n / block_q) <=
    (n + block_q - 1) / block_q tiles, so all of them take at most
    (T + S * (block_q - 1)) // block_q, and a tile holds at least one token. (The looser
    T // block_q + S gave a one-sequence chunk of 32 tokens two tiles, one of them empty but
    computed: half of a short prefill's attention.)"""
    return max(1, min(num_tokens, (num_tokens + num_seqs * (block_q - 1)) // block_q))


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Per-tile metadata ([nt] int32 each) and the token <-> row maps."""

    seq: jax.Array  # sequence of the tile (0 for unused tiles)
    start: jax.Array  # first token of the tile
    length: jax.Array  # tokens in the tile (0 = unused tile)
    num_blocks: jax.Array  # page groups (of pages_per_block entries) to walk; 0 = nothing
    max_pos: jax.Array  # largest query position in the tile (INVALID_POS if unused)
    tok_tile: jax.Array  # [T] tile of each token
    tok_row: jax.Array  # [T] token row inside its tile
    tok_valid: jax.Array  # [T] token belongs to a sequence


def pad_block_tables(block_tables, block_pos, block_lens, num_pages, pages_per_block):
    """Pad the entry axis to a multiple of pages_per_block (with len-0 entries) and
    clamp page ids into [0, num_pages) so a kernel never reads out of bounds."""
    S, M = block_tables.shape
    Mp = cdiv(M, pages_per_block) * pages_per_block
    pad = ((0, 0), (0, Mp - M))
    lens = jnp.pad(block_lens.astype(jnp.int32), pad)
    tables = jnp.pad(block_tables.astype(jnp.int32), pad)
    tables = jnp.where(lens > 0, jnp.clip(tables, 0, num_pages - 1), 0)
    pos = jnp.pad(block_pos.astype(jnp.int32), pad)
    return tables, pos, jnp.maximum(lens, 0)


def pad_logit_weights(meta: SpanBatchMeta, width: int):
    """(scale, bias) [S, width] float32 of a re-weighted meta, padded like `pad_block_tables`
    (the padding entries have length 0, so their 1 / 0 is never used); None without re-weighting."""
    if not reweighted(meta):
        return None
    pad = ((0, 0), (0, width - meta.block_tables.shape[1]))
    scale, bias = logit_weights(meta)
    return jnp.pad(scale, pad, constant_values=1.0), jnp.pad(bias, pad)


def make_tiles(
    cu_q_lens, q_pos, block_lens, num_tokens: int, block_q: int, pages_per_block: int, num_tiles: int
) -> Tiles:
    cu = cu_q_lens.astype(jnp.int32)
    S = cu.shape[0] - 1
    seq_lens = jnp.maximum(cu[1:] - cu[:-1], 0)
    tiles_per_seq = (seq_lens + block_q - 1) // block_q
    cu_tiles = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(tiles_per_seq).astype(jnp.int32)])

    t_idx = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_tiles[1:], t_idx, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, S - 1)
    used = t_idx < cu_tiles[-1]
    start = cu[seq] + (t_idx - cu_tiles[seq]) * block_q
    length = jnp.where(used, jnp.clip(cu[seq + 1] - start, 0, block_q), 0)
    start = jnp.where(used, start, 0)

    # Entries to walk per sequence: up to the last one with a non-zero length.
    M = block_lens.shape[1]
    ent = jnp.arange(1, M + 1, dtype=jnp.int32)
    n_entries = jnp.max(jnp.where(block_lens > 0, ent[None, :], 0), axis=1)
    num_blocks = jnp.where(used, (n_entries[seq] + pages_per_block - 1) // pages_per_block, 0)

    rows = start[:, None] + jnp.arange(block_q, dtype=jnp.int32)[None, :]
    row_ok = jnp.arange(block_q)[None, :] < length[:, None]
    rpos = jnp.where(row_ok, q_pos.astype(jnp.int32)[jnp.clip(rows, 0, num_tokens - 1)], INVALID_POS)
    max_pos = jnp.max(rpos, axis=1)

    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = jnp.minimum(jnp.searchsorted(cu[1:], tok, side="right").astype(jnp.int32), S - 1)
    tok_valid = tok < cu[-1]
    within = tok - cu[tok_seq]
    tok_tile = jnp.where(tok_valid, cu_tiles[tok_seq] + within // block_q, 0)
    tok_row = jnp.where(tok_valid, within % block_q, 0)
    return Tiles(seq, start, length, num_blocks, max_pos, tok_tile, tok_row, tok_valid), rpos


def pack_queries(q, tiles: Tiles, rpos, num_kv_heads: int, block_q: int, g_pad: int):
    """q [T, Hq, D] -> [nt, Hkv, block_q * g_pad, D] and row positions [nt, block_q * g_pad]."""
    T, Hq, D = q.shape
    G = Hq // num_kv_heads
    rows = tiles.start[:, None] + jnp.arange(block_q, dtype=jnp.int32)[None, :]
    qt = q[jnp.clip(rows, 0, T - 1)]  # [nt, bq, Hq, D]
    nt = qt.shape[0]
    qt = qt.reshape(nt, block_q, num_kv_heads, G, D)
    if g_pad != G:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, 0), (0, g_pad - G), (0, 0)))
    qt = qt.transpose(0, 2, 1, 3, 4).reshape(nt, num_kv_heads, block_q * g_pad, D)
    row_pos = jnp.repeat(rpos, g_pad, axis=1)  # [nt, bq * g_pad]
    return qt, row_pos


def unpack_output(o, tiles: Tiles, num_q_heads: int, block_q: int, g_pad: int, dtype):
    """o [nt, Hkv, block_q * g_pad, D] -> [T, Hq, D] (zeros for padding tokens)."""
    nt, Hkv, _, D = o.shape
    G = num_q_heads // Hkv
    o = o.reshape(nt, Hkv, block_q, g_pad, D)[:, :, :, :G]
    out = o[tiles.tok_tile, :, tiles.tok_row]  # [T, Hkv, G, D]
    out = jnp.where(tiles.tok_valid[:, None, None, None], out, 0)
    return out.reshape(-1, num_q_heads, D).astype(dtype)


@dataclasses.dataclass(frozen=True)
class TiledBatch:
    """A batch laid out in query tiles: what every tiled implementation starts from."""

    tables: jax.Array  # [S, Mp] block tables padded to a multiple of pages_per_block, ids clamped
    pos: jax.Array  # [S, Mp]
    lens: jax.Array  # [S, Mp]
    tiles: Tiles
    q: jax.Array  # [nt, Hkv, block_q * g_pad, D] packed queries
    row_pos: jax.Array  # [nt, block_q * g_pad] position of every row (INVALID_POS for padding)
    block_q: int
    g_pad: int
    pages_per_block: int
    num_tiles: int
    num_q_heads: int
    # [S, Mp] float32 each (block_logit_scale / block_logit_bias, padded); None without re-weighting
    weights: tuple[jax.Array, jax.Array] | None = None


def tile_batch(q, k_pages, meta: SpanBatchMeta, q_pos, *, block_q: int, g_pad: int, pages_per_block: int):
    """Pad the block tables, cut the tokens into tiles and pack the queries (shapes already checked)."""
    T, Hq, _ = q.shape
    N, _, Hkv, _ = k_pages.shape
    S = meta.block_tables.shape[0]
    nt = max_num_tiles(T, S, block_q)
    tables, pos, lens = pad_block_tables(meta.block_tables, meta.block_pos, meta.block_lens, N, pages_per_block)
    tiles, rpos = make_tiles(meta.cu_q_lens, q_pos, lens, T, block_q, pages_per_block, nt)
    qt, row_pos = pack_queries(q, tiles, rpos, Hkv, block_q, g_pad)
    weights = pad_logit_weights(meta, tables.shape[1])
    return TiledBatch(tables, pos, lens, tiles, qt, row_pos, block_q, g_pad, pages_per_block, nt, Hq, weights)


def untile(o, batch: TiledBatch, dtype, m=None, l=None):
    """Tile outputs -> [T, Hq, D]. o [nt, Hkv, R, D]; with split-KV partials, o [K, nt, Hkv, R, D]
    and their softmax stats m, l (any shape holding [K, nt, Hkv, R]) are merged first."""
    if m is not None:
        rows = o.shape[:-1]
        o = combine_splits(o, m.reshape(rows), l.reshape(rows))
    return unpack_output(o, batch.tiles, batch.num_q_heads, batch.block_q, batch.g_pad, dtype)


def combine_splits(o, m, l):
    """Merge split-KV partials: o [K, ...rows, D] normalized per split, m/l [K, ...rows]."""
    m_tot = jnp.max(m, axis=0)
    w = l * jnp.exp(m - m_tot[None])
    den = jnp.sum(w, axis=0)
    num = jnp.sum(w[..., None] * o.astype(jnp.float32), axis=0)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
