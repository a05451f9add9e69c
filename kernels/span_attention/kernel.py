"""Ragged paged span attention: the GPU Pallas kernel (Triton lowering).

Grid: (query tile, kv head, kv split). One program owns `block_q` tokens of one
sequence times the `G` query heads of one KV head (rows = block_q * Gp, Gp = G
padded to a power of two, >= 16 rows in all as Triton's dot requires) and walks
that sequence's block-table entries `pages_per_block` at a time:

  gather pages -> RoPE the keys from block_pos (fp32) -> q.k^T as two half-dim
  dots (rotate-half never needs a register concatenate) -> [re-weighted meta: the
  entries' logit scale and bias, loaded with their page ids] -> mask by block_lens
  and positions -> fp32 online softmax -> p.V.

Page groups whose every entry is empty or starts after the tile's last query
position are skipped. With `num_splits > 1` (split-KV, for long-context decode
with few programs) each split walks a contiguous share of the page groups and
writes normalized partials plus (m, l); `tiling.combine_splits` merges them.

Only jax.experimental.pallas core APIs plus `triton.CompilerParams` are used, so
the kernel body is backend-neutral; porting to Mosaic GPU means swapping the
BlockSpecs/compiler params in `span_attention_gpu` (the page gather would become a
TMA/async copy).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from spanjax.kernels.span_attention import tiling
from spanjax.kernels.span_attention.meta import SpanBatchMeta, check_inputs
from spanjax.kernels.span_attention.pallas_common import NEG, dot_nn, dot_nt, prepare

try:  # the Triton lowering's compiler params; some jax builds lack them (interpret mode needs none)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


def _triton_params(num_warps, num_stages):
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    try:
        return cls(num_warps=num_warps, num_stages=num_stages)
    except Exception:  # pragma: no cover - absent or renamed in some jax builds
        return None


def _span_kernel(
    seq_ref,  # [nt] int32 (whole array)
    nblk_ref,  # [nt]
    maxpos_ref,  # [nt]
    bt_ref,  # [S, Mp]
    bp_ref,  # [S, Mp]
    bl_ref,  # [S, Mp]
    *refs,  # (bs_ref, bb_ref [S, Mp] f32 when reweight,) invf_ref, rpos_ref, q_ref, k_ref, v_ref, o_ref, stats
    pages_per_block: int,
    num_splits: int,
    sm_scale: float,
    precision,
    reweight: bool = False,
):
    # invf_ref [D/2] f32; rpos_ref [R] row positions of this tile; q_ref [R, D]; k_ref, v_ref
    # [N, P, D] (this kv head); o_ref [R, D]; then (m_ref [R], l_ref [R]) when split.
    # bs_ref / bb_ref: block_logit_scale / block_logit_bias, only in the re-weighted program.
    bs_ref, bb_ref = refs[:2] if reweight else (None, None)
    invf_ref, rpos_ref, q_ref, k_ref, v_ref, o_ref, *stat_refs = refs[2:] if reweight else refs
    t = pl.program_id(0)
    split = pl.program_id(2)
    R, D = q_ref.shape
    D2 = D // 2
    P = k_ref.shape[1]
    pp = pages_per_block
    K = pp * P

    seq = seq_ref[t]
    nblk = nblk_ref[t]
    max_pos = maxpos_ref[t]
    per = (nblk + num_splits - 1) // num_splits
    lo = split * per
    hi = jnp.minimum(nblk, lo + per)

    q1 = q_ref[:, pl.ds(0, D2)]
    q2 = q_ref[:, pl.ds(D2, D2)]
    cdt = q1.dtype
    rpos = rpos_ref[...]
    inv_freq = invf_ref[...].astype(jnp.float32)
    slot = lax.broadcasted_iota(jnp.int32, (pp, P), 1)

    def compute(j, carry):
        m, l, acc = carry
        ents = pl.ds(j * pp, pp)
        pages = bt_ref[seq, ents]  # [pp]
        starts = bp_ref[seq, ents]
        lens = bl_ref[seq, ents]
        kpos = (starts[:, None] + slot).reshape(K)
        kval = (slot < lens[:, None]).reshape(K)
        k1 = k_ref[pages, :, pl.ds(0, D2)].reshape(K, D2).astype(jnp.float32)
        k2 = k_ref[pages, :, pl.ds(D2, D2)].reshape(K, D2).astype(jnp.float32)
        ang = kpos.astype(jnp.float32)[:, None] * inv_freq[None, :]
        cos, sin = jnp.cos(ang), jnp.sin(ang)
        k1r = (k1 * cos - k2 * sin).astype(cdt)
        k2r = (k2 * cos + k1 * sin).astype(cdt)
        s = (dot_nt(q1, k1r, precision) + dot_nt(q2, k2r, precision)) * sm_scale  # [R, K]
        if reweight:  # the entry's logit scale and bias, repeated over its P slots
            scale = jnp.broadcast_to(bs_ref[seq, ents][:, None], (pp, P)).reshape(K)
            bias = jnp.broadcast_to(bb_ref[seq, ents][:, None], (pp, P)).reshape(K)
            s = s * scale[None, :] + bias[None, :]
        seen = kval[None, :] & (kpos[None, :] <= rpos[:, None])
        s = jnp.where(seen, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        vv = v_ref[pages].reshape(K, D)
        vv = jnp.where(kval[:, None], vv, jnp.zeros_like(vv))  # masked slots may hold anything
        acc = acc * alpha[:, None] + dot_nn(p.astype(vv.dtype), vv, precision)
        return m_new, l, acc

    def body(j, carry):
        lens = bl_ref[seq, pl.ds(j * pp, pp)]
        starts = bp_ref[seq, pl.ds(j * pp, pp)]
        visible = jnp.max(jnp.where((lens > 0) & (starts <= max_pos), 1, 0)) > 0
        return lax.cond(visible, lambda c: compute(j, c), lambda c: c, carry)

    init = (
        jnp.full((R,), NEG, jnp.float32),
        jnp.zeros((R,), jnp.float32),
        jnp.zeros((R, D), jnp.float32),
    )
    m, l, acc = lax.fori_loop(lo, hi, body, init)
    out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)
    if stat_refs:
        m_ref, l_ref = stat_refs
        m_ref[...] = m
        l_ref[...] = l


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_q", "pages_per_block", "num_splits", "num_warps", "num_stages", "interpret"),
)
def span_attention_gpu(
    q,
    k_pages,
    v_pages,
    meta: SpanBatchMeta,
    q_pos,
    *,
    rope_inv_freq,
    sm_scale,
    block_q: int = 8,
    pages_per_block: int = 4,
    num_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Same contract as `span_attention_reference` (meta.py); block sizes are static."""
    n = check_inputs(q, k_pages, v_pages, meta, q_pos, rope_inv_freq)
    N, P, Hkv, D = n.N, n.P, n.Hkv, n.D
    g_pad = tiling.next_pow2(n.G)
    bq = max(1, int(block_q))
    if bq * g_pad < 16:  # Triton dots need >= 16 rows
        bq = tiling.cdiv(16, g_pad)
    bq = tiling.next_pow2(bq)
    R = bq * g_pad
    pp = tiling.next_pow2(pages_per_block)
    prep = prepare(q, k_pages, meta, q_pos, rope_inv_freq, block_q=bq, g_pad=g_pad, pages_per_block=pp)
    tb, nt, S, precision = prep.batch, prep.batch.num_tiles, n.S, prep.precision

    reweight = tb.weights is not None
    kernel = functools.partial(
        _span_kernel,
        pages_per_block=pp,
        num_splits=num_splits,
        sm_scale=float(sm_scale),
        precision=precision,
        reweight=reweight,
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda t, h, k: (0,) * len(shape))  # noqa: E731
    Mp = tb.tables.shape[1]
    in_specs = [
        whole((nt,)),
        whole((nt,)),
        whole((nt,)),
        whole((S, Mp)),
        whole((S, Mp)),
        whole((S, Mp)),
        *([whole((S, Mp))] * 2 if reweight else []),
        whole((D // 2,)),
        pl.BlockSpec((None, R), lambda t, h, k: (t, 0)),
        pl.BlockSpec((None, None, R, D), lambda t, h, k: (t, h, 0, 0)),
        pl.BlockSpec((N, P, None, D), lambda t, h, k: (0, 0, h, 0)),
        pl.BlockSpec((N, P, None, D), lambda t, h, k: (0, 0, h, 0)),
    ]
    split = num_splits > 1
    o_dtype = jnp.float32 if split else q.dtype
    out_shape = [jax.ShapeDtypeStruct((num_splits, nt, Hkv, R, D), o_dtype)]
    out_specs = [pl.BlockSpec((None, None, None, R, D), lambda t, h, k: (k, t, h, 0, 0))]
    if split:
        for _ in range(2):
            out_shape.append(jax.ShapeDtypeStruct((num_splits, nt, Hkv, R), jnp.float32))
            out_specs.append(pl.BlockSpec((None, None, None, R), lambda t, h, k: (k, t, h, 0)))
    outs = pl.pallas_call(
        kernel,
        grid=(nt, Hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if interpret else _triton_params(num_warps, num_stages),
        interpret=interpret,
        name=f"span_attention_gpu_bq{bq}_g{g_pad}_pp{pp}_ks{num_splits}" + ("_rw" if reweight else ""),
    )(
        tb.tiles.seq,
        tb.tiles.num_blocks,
        tb.tiles.max_pos,
        tb.tables,
        tb.pos,
        tb.lens,
        *(tb.weights if reweight else ()),
        prep.inv_freq,
        tb.row_pos,
        tb.q,
        k_pages,
        v_pages,
    )
    return tiling.untile(outs[0], tb, q.dtype, *outs[1:]) if split else tiling.untile(outs[0][0], tb, q.dtype)
