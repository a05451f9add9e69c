"""fp32 products on packed panels: the C++ CPU kernel against numpy's product of the matrix."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.kernels import cpu_library
from spanjax.kernels.packed_matmul import PANEL, PackedMatrix, pack, packed_matmuls, unpack

needs_kernel = pytest.mark.skipif(not cpu_library.available(), reason="CPU kernel library unavailable")


def test_pack_and_unpack_round_trip_with_a_partial_last_panel():
    w = np.random.default_rng(0).standard_normal((2, 64, 100)).astype(np.float32)  # 100 = 2 panels + 4
    p = pack(w)
    assert p.panels.shape == (2, 3, 64, PANEL) and p.out_features == 100
    np.testing.assert_array_equal(np.asarray(p.panels[1, 2, :, 4:]), 0.0)  # the missing columns
    np.testing.assert_array_equal(np.asarray(unpack(p)), w)
    np.testing.assert_array_equal(np.asarray(unpack(p.at_layer(1))), w[1])
    with pytest.raises(ValueError, match="fp32"):
        pack(w.astype(np.float16))


@needs_kernel
@pytest.mark.parametrize("wide", cpu_library.vector_widths())
@pytest.mark.parametrize("rows,valid", [(1, 1), (13, 13), (32, 25), (8, 0)])
def test_cpu_kernel_equals_the_product_and_zeroes_padding_rows(wide, rows, valid):
    # 200 and 40 outputs: a partial last panel and a single partial one; 13 rows: an 8-row tile
    # and a 5-row rest (AVX2: 4-row tiles); a stacked layer read in place; a call of two products.
    rng = np.random.default_rng(rows)
    stack = rng.standard_normal((3, 96, 200)).astype(np.float32)
    small = rng.standard_normal((3, 96, 40)).astype(np.float32)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    ws = (pack(stack).at_layer(2), pack(small).at_layer(2))
    call = jax.jit(lambda x, ws, n: packed_matmuls(x, ws, n, impl="cpu"))
    with cpu_library.avx512(wide):
        ys = [np.asarray(y) for y in call(jnp.asarray(x), ws, valid)]
    for y, w in zip(ys, (stack[2], small[2]), strict=True):
        np.testing.assert_allclose(y[:valid], x[:valid].astype(np.float64) @ w, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(y[valid:], 0.0)


@needs_kernel
def test_cpu_kernel_rejects_mismatched_panels():
    x = jnp.ones((4, 64), jnp.float32)
    bad = pack(np.ones((64, 96), np.float32)).replace(out_features=200)  # 2 panels, not 5
    with pytest.raises(Exception, match="panel shapes"):
        jax.block_until_ready(packed_matmuls(x, (bad,), impl="cpu"))


def _two_layer_config(vocab_size, tied):
    from spanjax.models.config import ModelConfig

    return ModelConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, eos_token_ids=(2,), tie_word_embeddings=tied,
    )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("tied", [True, False])
def test_packed_model_gives_the_dense_logits(tied):
    # The engine's layout (`unstack_layers(pack_matrices=True)`): every layer matrix packed and
    # read in place, the LM head packed too (a tied one as its own copy of embed.T), padding
    # rows past `rows` skipped; the real rows' logits match the stacked dense model's.
    from spanjax.models import llama

    cfg = _two_layer_config(vocab_size=100, tied=tied)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), scale=0.1)
    packed = llama.unstack_layers(params, pack_matrices=True)
    assert isinstance(packed.layers, llama.UnrolledLayers)
    assert isinstance(packed.layers.stack.wq, PackedMatrix) and isinstance(packed.lm_head, PackedMatrix)
    tokens = jnp.array([[3, 14, 15, 9, 26, 5, 0, 0]])
    positions = jnp.arange(8)[None]

    def logits(p, rows):
        cache = llama.init_dense_cache(cfg, 1, 8)
        attention = functools.partial(llama._dense_attention, cfg, jnp.asarray(cfg.rope_inv_freq()))
        hidden, _ = llama.decoder(p, cfg, tokens, positions, (cache.k, cache.v), attention, rows=rows)
        return np.asarray(llama.compute_logits(p, cfg, hidden))[0, :6]

    np.testing.assert_allclose(logits(packed, 6), logits(params, None), rtol=1e-4, atol=1e-4)


def test_packing_leaves_a_block_quantized_tied_table_alone():
    # A GGUF model loaded quantized has a block-quantized embedding table: packing its fp32
    # layer matrices must keep the head tied to it (no packed copy of a table it cannot read).
    from spanjax.kernels.quantized_matmul import BlockQuantized
    from spanjax.models import llama

    cfg = _two_layer_config(vocab_size=96, tied=True)
    rng = np.random.default_rng(0)
    codes = jnp.asarray(rng.integers(-128, 128, (96, 2, 32), dtype=np.int8))
    embed = BlockQuantized(codes, jnp.full((96, 2), 0.01, jnp.float16), None, "q8")
    params = llama.init_params(cfg, jax.random.PRNGKey(0)).replace(embed=embed)
    packed = llama.unstack_layers(params, pack_matrices=True)
    assert packed.lm_head is None and packed.embed is embed
    assert isinstance(packed.layers.stack.w_up, PackedMatrix)
