"""Ragged paged span attention: the TPU Pallas kernel (Mosaic).

Grid: (query tile, kv split, page group). The block tables, their positions and
lengths and the per-tile metadata are scalar-prefetched into SMEM; the K/V
BlockSpecs' index maps read them, so Pallas' pipeline DMAs the next page group
([pages_per_block] whole pages, all KV heads) while the current one computes.
Steps past a tile's last page group repeat the previous block index (no new
DMA) and do no work. The tile's query rows for every KV head stay resident in
VMEM; the fp32 online-softmax state (m, l, acc) lives in VMEM scratch across the
page-group axis ("arbitrary"), the tile and split axes are "parallel".

Per page and KV head: RoPE the keys from the entry's logical start position
(fp32), q.k^T as two half-dim NT matmuls (no lane concatenate), [re-weighted
meta: the entry's logit scale and bias, two more SMEM scalars], mask by length
and position, online-softmax update, p.V.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from spanjax.kernels.span_attention import tiling
from spanjax.kernels.span_attention.meta import SpanBatchMeta, check_inputs
from spanjax.kernels.span_attention.pallas_common import NEG, dot_nn, dot_nt, prepare


def _tpu_kernel(
    # scalar prefetch (SMEM)
    seq_ref,  # [nt]
    nblk_ref,  # [nt]
    maxpos_ref,  # [nt]
    bt_ref,  # [S * Mp] flat
    bp_ref,  # [S * Mp]
    bl_ref,  # [S * Mp]
    # (bs_ref, bb_ref [S * Mp] f32: block_logit_scale / block_logit_bias, when reweight), then the
    # blocks invf_ref [1, D/2], rpos_ref [R, 1], q_ref [Hkv, R, D], pp K pages [P, Hkv, D], pp V
    # pages, then outputs, then scratch
    *refs,
    pages_per_block: int,
    num_splits: int,
    blocks_per_split: int,
    entries_per_seq: int,
    sm_scale: float,
    precision,
    with_stats: bool,
    reweight: bool = False,
):
    bs_ref, bb_ref = refs[:2] if reweight else (None, None)
    invf_ref, rpos_ref, q_ref, *refs = refs[2:] if reweight else refs
    pp = pages_per_block
    k_refs, v_refs = refs[:pp], refs[pp : 2 * pp]
    rest = refs[2 * pp :]
    if with_stats:
        o_ref, mo_ref, lo_ref, m_sc, l_sc, acc_sc = rest
    else:
        o_ref, m_sc, l_sc, acc_sc = rest
    t, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    Hkv, R, D = q_ref.shape
    D2 = D // 2
    P = k_refs[0].shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    seq = seq_ref[t]
    nblk = nblk_ref[t]
    max_pos = maxpos_ref[t]
    per = (nblk + num_splits - 1) // num_splits
    blk = split * per + j
    in_range = (j < per) & (blk < nblk)
    base = seq * entries_per_seq + blk * pp

    visible = jnp.bool_(False)
    for i in range(pp):
        visible = visible | ((bl_ref[base + i] > 0) & (bp_ref[base + i] <= max_pos))

    @pl.when(in_range & visible)
    def _compute():
        inv_freq = invf_ref[...].astype(jnp.float32)  # [1, D2]
        rpos = rpos_ref[...]  # [R, 1]
        col = lax.broadcasted_iota(jnp.int32, (P, 1), 0)
        row = lax.broadcasted_iota(jnp.int32, (1, P), 1)
        for i in range(pp):
            start = bp_ref[base + i]
            length = bl_ref[base + i]
            ang = (start + col).astype(jnp.float32) * inv_freq  # [P, D2]
            cos, sin = jnp.cos(ang), jnp.sin(ang)
            seen = (row < length) & ((start + row) <= rpos)  # [R, P]
            if reweight:  # the entry's logit scale and bias (SMEM scalars)
                scale, bias = bs_ref[base + i], bb_ref[base + i]
            vmask = col < length  # [P, 1]
            for h in range(Hkv):
                q = q_ref[h]  # [R, D]
                cdt = q.dtype
                k = k_refs[i][:, h, :].astype(jnp.float32)  # [P, D]
                k1, k2 = k[:, :D2], k[:, D2:]
                k1r = (k1 * cos - k2 * sin).astype(cdt)
                k2r = (k2 * cos + k1 * sin).astype(cdt)
                s = (dot_nt(q[:, :D2], k1r, precision) + dot_nt(q[:, D2:], k2r, precision)) * sm_scale
                if reweight:
                    s = s * scale + bias
                s = jnp.where(seen, s, NEG)
                m_prev = m_sc[h]  # [R, 1]
                m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
                alpha = jnp.exp(m_prev - m_new)
                p = jnp.where(seen, jnp.exp(s - m_new), 0.0)
                l_sc[h] = l_sc[h] * alpha + jnp.sum(p, axis=1, keepdims=True)
                v = v_refs[i][:, h, :]
                v = jnp.where(vmask, v, jnp.zeros_like(v))
                acc_sc[h] = acc_sc[h] * alpha + dot_nn(p.astype(v.dtype), v, precision)
                m_sc[h] = m_new

    @pl.when(j == blocks_per_split - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)
        if with_stats:
            mo_ref[...] = m_sc[...]
            lo_ref[...] = l


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_q", "pages_per_block", "num_splits", "interpret"),
)
def span_attention_tpu(
    q,
    k_pages,
    v_pages,
    meta: SpanBatchMeta,
    q_pos,
    *,
    rope_inv_freq,
    sm_scale,
    block_q: int = 8,
    pages_per_block: int = 2,
    num_splits: int = 1,
    interpret: bool = False,
):
    """Same contract as `span_attention_reference` (meta.py); block sizes are static."""
    n = check_inputs(q, k_pages, v_pages, meta, q_pos, rope_inv_freq)
    P, Hkv, D = n.P, n.Hkv, n.D
    g_pad = n.G  # Mosaic has no power-of-two rule; R = block_q * G rows
    bq = max(1, int(block_q))
    R = bq * g_pad
    pp = max(1, int(pages_per_block))
    prep = prepare(q, k_pages, meta, q_pos, rope_inv_freq, block_q=bq, g_pad=g_pad, pages_per_block=pp)
    tb, nt, precision = prep.batch, prep.batch.num_tiles, prep.precision
    Mp = tb.tables.shape[1]
    blocks_per_split = tiling.cdiv(Mp // pp, num_splits)

    reweight = tb.weights is not None

    def page_map(i):
        def index_map(t, k, j, seq, nblk, maxpos, bt, *_):
            per = (nblk[t] + num_splits - 1) // num_splits
            last = jnp.maximum(jnp.minimum(nblk[t], (k + 1) * per) - 1, 0)
            blk = jnp.minimum(k * per + j, last)  # past the end: same block, no DMA
            return (bt[seq[t] * Mp + blk * pp + i], 0, 0, 0)

        return pl.BlockSpec((None, P, Hkv, D), index_map)

    kernel = functools.partial(
        _tpu_kernel,
        pages_per_block=pp,
        num_splits=num_splits,
        blocks_per_split=blocks_per_split,
        entries_per_seq=Mp,
        sm_scale=float(sm_scale),
        precision=precision,
        with_stats=num_splits > 1,
        reweight=reweight,
    )
    in_specs = [
        pl.BlockSpec((1, D // 2), lambda t, k, j, *_: (0, 0)),
        pl.BlockSpec((None, R, 1), lambda t, k, j, *_: (t, 0, 0)),
        pl.BlockSpec((None, Hkv, R, D), lambda t, k, j, *_: (t, 0, 0, 0)),
    ]
    in_specs += [page_map(i) for i in range(pp)] * 2
    split = num_splits > 1
    o_dtype = jnp.float32 if split else q.dtype
    out_shape = [jax.ShapeDtypeStruct((num_splits, nt, Hkv, R, D), o_dtype)]
    out_specs = [pl.BlockSpec((None, None, Hkv, R, D), lambda t, k, j, *_: (k, t, 0, 0, 0))]
    if split:
        for _ in range(2):
            out_shape.append(jax.ShapeDtypeStruct((num_splits, nt, Hkv, R, 1), jnp.float32))
            out_specs.append(pl.BlockSpec((None, None, Hkv, R, 1), lambda t, k, j, *_: (k, t, 0, 0, 0)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=8 if reweight else 6,
        grid=(nt, num_splits, blocks_per_split),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((Hkv, R, 1), jnp.float32),
            pltpu.VMEM((Hkv, R, 1), jnp.float32),
            pltpu.VMEM((Hkv, R, D), jnp.float32),
        ],
    )
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"span_attention_tpu_bq{bq}_g{g_pad}_pp{pp}_ks{num_splits}" + ("_rw" if reweight else ""),
    )(
        tb.tiles.seq,
        tb.tiles.num_blocks,
        tb.tiles.max_pos,
        tb.tables.reshape(-1),
        tb.pos.reshape(-1),
        tb.lens.reshape(-1),
        *(w.reshape(-1) for w in (tb.weights if reweight else ())),
        prep.inv_freq.reshape(1, D // 2),
        tb.row_pos[:, :, None],
        tb.q,
        *([k_pages] * pp),
        *([v_pages] * pp),
    )
    return tiling.untile(outs[0], tb, q.dtype, *outs[1:]) if split else tiling.untile(outs[0][0], tb, q.dtype)
