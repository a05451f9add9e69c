"""fp32 products on packed panels: the C++ CPU kernel against numpy's product of the matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.kernels import cpu_library
from spanjax.kernels.packed_matmul import PANEL, pack, packed_matmuls, unpack

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
