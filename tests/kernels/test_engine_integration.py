"""The engine's paged forward gives the same hidden states with the Pallas kernels (interpret)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.kernels.span_attention import SpanBatchMeta, get_attention_impl
from spanjax.models import config, llama


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_forward_paged_matches_reference(impl):
    cfg = config.ModelConfig(
        vocab_size=50, hidden_size=96, intermediate_size=128, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32
    )
    params = llama.init_params(cfg, jax.random.key(0), scale=0.2)
    P = 16
    cache = llama.init_paged_cache(cfg, num_pages=6, page_size=P)
    # seq 0: 20-token prefill on pages 3, 1; seq 1: 5-token prefill on page 4; 3 padding tokens
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=28), jnp.int32)
    pos = jnp.asarray(list(range(20)) + list(range(5)) + [0, 0, 0], jnp.int32)
    slots = [3 * P + i for i in range(16)] + [1 * P + i for i in range(4)] + [4 * P + i for i in range(5)] + [-1] * 3
    meta = SpanBatchMeta(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        block_tables=jnp.asarray([[3, 1], [4, 0]], jnp.int32),
        block_pos=jnp.asarray([[0, 16], [0, 0]], jnp.int32),
        block_lens=jnp.asarray([[16, 4], [5, 0]], jnp.int32),
        cu_q_lens=jnp.asarray([0, 20, 25], jnp.int32),
    )
    fwd = jax.jit(llama.forward_paged, static_argnames=("cfg", "attention_impl"))
    ref, _ = fwd(params, cfg, toks, pos, cache, meta)
    out, _ = fwd(params, cfg, toks, pos, cache, meta, attention_impl=get_attention_impl(impl, interpret=True))
    assert float(jnp.max(jnp.abs(out[:25] - ref[:25]))) <= 1e-4


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_draft_tree_batch_matches_reference(impl):
    """A speculative draft tree's step (spanjax/engine/speculative.py): the greedy branch writes
    its 4 tokens after 21 written ones (page 2 holds 5 of them), another branch writes the same
    positions to scratch page 5 and lists page 2 as partly valid *before* its scratch page,
    whose first position (21) is not page aligned."""
    cfg = config.ModelConfig(
        vocab_size=50, hidden_size=96, intermediate_size=128, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32
    )
    params = llama.init_params(cfg, jax.random.key(1), scale=0.2)
    P = 16
    rng = np.random.default_rng(1)
    cache = llama.init_paged_cache(cfg, num_pages=7, page_size=P)
    cache = cache.replace(
        k=jnp.asarray(rng.normal(size=cache.k.shape), cache.k.dtype),
        v=jnp.asarray(rng.normal(size=cache.v.shape), cache.v.dtype),
    )
    toks = rng.integers(0, 50, size=8)
    toks[4] = toks[0]  # both branches start with the pending token, then their own drafts
    toks = jnp.asarray(toks, jnp.int32)
    pos = jnp.asarray(list(range(21, 25)) * 2, jnp.int32)
    slots = [2 * P + 5 + i for i in range(4)] + [5 * P + i for i in range(4)]
    meta = SpanBatchMeta(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        block_tables=jnp.asarray([[3, 2, 0], [3, 2, 5]], jnp.int32),
        block_pos=jnp.asarray([[0, 16, 0], [0, 16, 21]], jnp.int32),
        block_lens=jnp.asarray([[16, 9, 0], [16, 5, 4]], jnp.int32),
        cu_q_lens=jnp.asarray([0, 4, 8], jnp.int32),
    )
    fwd = jax.jit(llama.forward_paged, static_argnames=("cfg", "attention_impl"))
    ref, _ = fwd(params, cfg, toks, pos, cache, meta)
    out, _ = fwd(params, cfg, toks, pos, cache, meta, attention_impl=get_attention_impl(impl, interpret=True))
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-4
    # The pending token sees the same context in both branches (and nothing of the other branch).
    assert float(jnp.max(jnp.abs(ref[0] - ref[4]))) <= 1e-4 and float(jnp.max(jnp.abs(ref[1] - ref[5]))) > 1e-3


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_gpu", "pallas_tpu"])
def test_bf16_pool_is_stored_as_bits_and_read_as_bf16(impl):
    """A bf16 pool is held as uint16 bit patterns (XLA CPU has no bf16 gather or scatter): the
    first layer's written bits are the bf16 rounding of what an fp32 pool holds, every implementation reads
    them as bf16 (same hidden states as an fp32 pool within bf16 rounding), and the XLA step
    never materializes the pool in fp32."""
    cfg = config.ModelConfig(
        vocab_size=50, hidden_size=96, intermediate_size=128, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32
    )
    params = llama.init_params(cfg, jax.random.key(2), scale=0.2)
    P, N = 16, 7
    toks = jnp.asarray(np.random.default_rng(2).integers(0, 50, size=21), jnp.int32)
    pos = jnp.asarray(list(range(20)) + [0], jnp.int32)
    meta = SpanBatchMeta(
        slot_mapping=jnp.asarray([3 * P + i for i in range(16)] + [1 * P + i for i in range(4)] + [-1], jnp.int32),
        block_tables=jnp.asarray([[3, 1]], jnp.int32),
        block_pos=jnp.asarray([[0, 16]], jnp.int32),
        block_lens=jnp.asarray([[16, 4]], jnp.int32),
        cu_q_lens=jnp.asarray([0, 20], jnp.int32),
    )
    attention = get_attention_impl(impl, interpret=True)
    fwd = jax.jit(llama.forward_paged, static_argnames=("cfg", "attention_impl"))
    ref, cache32 = fwd(params, cfg, toks, pos, llama.init_paged_cache(cfg, N, P), meta, attention)
    pool16 = llama.init_paged_cache(cfg, N, P, dtype=jnp.bfloat16)
    assert pool16.k.dtype == jnp.uint16 and pool16.dtype == jnp.bfloat16
    out, cache16 = fwd(params, cfg, toks, pos, pool16, meta, attention)
    as_bf16 = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.bfloat16)).astype(np.float32)
    for got, want in ((cache16.k, cache32.k), (cache16.v, cache32.v)):  # layer 0 (later ones read bf16)
        got, want = cache16.by_layer(got)[0], cache32.by_layer(want)[0]
        np.testing.assert_array_equal(as_bf16(got), np.asarray(want.astype(jnp.bfloat16)).astype(np.float32))
    assert 0 < float(jnp.max(jnp.abs(out[:20] - ref[:20]))) <= 5e-2
    if impl == "xla":  # one decode token over those 20: no fp32 copy of the pool, per layer or whole
        decode = SpanBatchMeta(
            slot_mapping=jnp.asarray([1 * P + 4], jnp.int32),
            block_tables=jnp.asarray([[3, 1]], jnp.int32),
            block_pos=jnp.asarray([[0, 16]], jnp.int32),
            block_lens=jnp.asarray([[16, 5]], jnp.int32),
            cu_q_lens=jnp.asarray([0, 1], jnp.int32),
        )
        args = (params, cfg, toks[:1], jnp.asarray([20], jnp.int32), cache16, decode, attention)
        hlo = fwd.lower(*args).compile().as_text()
        L, Hkv, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        for shape in (f"f32[{L * N},{P},{Hkv},{D}]", f"bf16[{L * N},{P},{Hkv},{D}]"):
            assert shape not in hlo, shape
        # With the pool donated (as the engine's step does), nothing copies it, bf16 or fp32:
        # XLA CPU once duplicated each layer's cache write, whole-pool copies around it, when a
        # reshape stood between the write and the C++ decode kernel reading it.
        donating = jax.jit(llama.forward_paged, static_argnames=("cfg", "attention_impl"), donate_argnums=(4,))
        for pool, kind in ((cache16, "u16"), (cache32, "f32")):
            hlo = donating.lower(*args[:4], pool, *args[5:]).compile().as_text()
            copies = [line for line in hlo.splitlines() if " copy(" in line and f"{kind}[{L * N},{P}," in line]
            assert not copies, copies
