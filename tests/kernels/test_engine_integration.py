"""The engine's paged forward gives the same hidden states with the Pallas kernels (interpret)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.span_attention import get_attention_impl

llama = pytest.importorskip("spanjax.models.llama")
config = pytest.importorskip("spanjax.models.config")


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_forward_paged_matches_reference(impl):
    cfg = config.ModelConfig(vocab_size=50, hidden_size=96, intermediate_size=128, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32)
    params = llama.init_params(cfg, jax.random.key(0), scale=0.2)
    P = 16
    cache = llama.init_paged_cache(cfg, num_pages=6, page_size=P)
    # seq 0: 20-token prefill on pages 3, 1; seq 1: 5-token prefill on page 4; 3 padding tokens
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=28), jnp.int32)
    pos = jnp.asarray(list(range(20)) + list(range(5)) + [0, 0, 0], jnp.int32)
    slots = [3 * P + i for i in range(16)] + [1 * P + i for i in range(4)] + [4 * P + i for i in range(5)] + [-1] * 3
    meta = llama.PagedAttentionMeta(
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
