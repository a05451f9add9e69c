"""The span-attention contract: SpanBatchMeta is one pytree every implementation takes, and a
malformed call fails with a ValueError naming the bad field (in every implementation)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.kernels.span_attention import SpanBatchMeta, span_attention, span_attention_reference
from spanjax.kernels.span_attention.kernel import span_attention_gpu
from spanjax.kernels.span_attention.kernel_tpu import span_attention_tpu
from spanjax.kernels.span_attention.testing import args_kwargs, make_batch
from spanjax.kernels.span_attention.xla import span_attention_xla
from spanjax.models import config, llama

IMPLS = {
    "reference": span_attention_reference,
    "xla": span_attention_xla,
    "gpu": functools.partial(span_attention_gpu, interpret=True),
    "tpu": functools.partial(span_attention_tpu, interpret=True),
    "dispatch": functools.partial(span_attention, impl="xla"),
}


def _args():
    batch = make_batch(
        np.random.default_rng(0),
        [dict(prefix=20, q_len=3), dict(prefix=5, q_len=1)],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=32,
        page_size=16,
    )
    return args_kwargs(batch)


def _bad(field):
    """(args, kwargs) with one field broken."""
    (q, k, v, meta, q_pos), kw = _args()
    if field == "q":
        q = q.astype(jnp.int32)
    elif field == "k_pages":
        k = k[..., :16]
    elif field == "v_pages":
        v = v[:, :8]
    elif field == "block_tables":
        meta = meta.replace(block_tables=meta.block_tables[0])
    elif field == "block_pos":
        meta = meta.replace(block_pos=meta.block_pos.astype(jnp.float32))
    elif field == "block_lens":
        meta = meta.replace(block_lens=meta.block_lens[:, :-1])
    elif field == "cu_q_lens":
        meta = meta.replace(cu_q_lens=meta.cu_q_lens[:-1])
    elif field == "q_pos":
        q_pos = q_pos[:-1]
    elif field == "slot_mapping":
        meta = meta.replace(slot_mapping=jnp.zeros(q.shape[0] + 1, jnp.int32))
    elif field == "key_rope":  # one table row short
        S, M = meta.block_tables.shape
        bad = jnp.zeros((S, M * k.shape[1] - 1, 1, q.shape[-1] // 2), jnp.float32)
        meta = meta.replace(key_rope=(bad, bad))
    elif field == "rope_inv_freq":
        kw["rope_inv_freq"] = kw["rope_inv_freq"][:-1]
    elif field == "meta":
        meta = (meta.block_tables, meta.block_pos, meta.block_lens, meta.cu_q_lens)
    return (q, k, v, meta, q_pos), kw


FIELDS = [
    "q",
    "k_pages",
    "v_pages",
    "block_tables",
    "block_pos",
    "block_lens",
    "cu_q_lens",
    "q_pos",
    "slot_mapping",
    "key_rope",
    "rope_inv_freq",
    "meta",
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("field", FIELDS)
def test_bad_input_names_the_field(impl, field):
    args, kw = _bad(field)
    with pytest.raises(ValueError, match=rf"span attention: {field}\b"):
        IMPLS[impl](*args, **kw)


def test_meta_is_one_pytree_for_every_implementation():
    (q, k, v, meta, q_pos), kw = _args()
    assert len(jax.tree_util.tree_leaves(meta)) == 4  # slot_mapping None: not a leaf
    with_slots = meta.replace(slot_mapping=jnp.arange(q.shape[0], dtype=jnp.int32))
    assert len(jax.tree_util.tree_leaves(with_slots)) == 5
    ref = span_attention_reference(q, k, v, meta, q_pos, **kw)
    for name, fn in IMPLS.items():
        out = jax.jit(lambda m, fn=fn: fn(q, k, v, m, q_pos, **kw))(with_slots)
        assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5, name


def test_forward_paged_checks_meta_before_writing():
    cfg = config.ModelConfig(
        vocab_size=50, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16
    )
    params = llama.init_params(cfg, jax.random.key(0))
    cache = llama.init_paged_cache(cfg, num_pages=2, page_size=16)
    toks, pos = jnp.zeros(3, jnp.int32), jnp.arange(3, dtype=jnp.int32)
    meta = SpanBatchMeta(
        slot_mapping=jnp.arange(3, dtype=jnp.int32),
        block_tables=jnp.zeros((1, 1), jnp.int32),
        block_pos=jnp.zeros((1, 1), jnp.int32),
        block_lens=jnp.full((1, 1), 3, jnp.int32),
        cu_q_lens=jnp.asarray([0, 3], jnp.int32),
    )
    llama.forward_paged(params, cfg, toks, pos, cache, meta)  # well formed
    with pytest.raises(ValueError, match="slot_mapping"):
        llama.forward_paged(params, cfg, toks, pos, cache, meta.replace(slot_mapping=jnp.arange(2, dtype=jnp.int32)))
    with pytest.raises(ValueError, match="slot_mapping"):
        llama.forward_paged(params, cfg, toks, pos, cache, meta.replace(slot_mapping=None))
    with pytest.raises(ValueError, match="block_lens"):
        llama.forward_paged(params, cfg, toks, pos, cache, meta.replace(block_lens=jnp.zeros((1, 2), jnp.int32)))


def test_tile_bound_holds_every_split_and_is_tight_for_one_sequence():
    """`max_num_tiles` must cover any split of T tokens into S sequences (tiles beyond it would
    be dropped), and a single sequence gets exactly ceil(T / block_q) tiles (no empty tile)."""
    from spanjax.kernels.span_attention.tiling import max_num_tiles

    rng = np.random.default_rng(0)
    for _ in range(300):
        S, block_q = int(rng.integers(1, 9)), int(2 ** rng.integers(0, 7))
        lens = rng.integers(0, 80, S)
        T = max(1, int(lens.sum()))
        need = int(sum(-(-n // block_q) for n in lens))
        assert need <= max_num_tiles(T, S, block_q)
    assert max_num_tiles(32, 1, 32) == 1 and max_num_tiles(512, 1, 64) == 8 and max_num_tiles(20, 1, 32) == 1
