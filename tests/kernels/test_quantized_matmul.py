"""Block-quantized products: the C++ CPU kernel against the jnp reference (expand, then dot)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.kernels import cpu_library
from spanjax.kernels.quantized_matmul import (
    KERNEL_MAX_ROWS,
    BlockQuantized,
    check,
    cpu,
    dequantize,
    int8_matmul_reference,
    pack_lanes,
    quantized_matmul,
    quantized_matmul_reference,
    quantized_matmuls,
    take_rows,
    with_lanes,
)
from spanjax.kernels.quantized_matmul.lanes import quantize_activations


def random_blocks(rng, fmt, out_features, in_features, lead=()):
    shape = (*lead, out_features, in_features // 32)
    scale = jnp.asarray(rng.uniform(0.001, 0.05, shape).astype(np.float16))
    if fmt == "q4":
        q = rng.integers(0, 256, (*shape, 16), dtype=np.uint8)
        offset = jnp.asarray(rng.uniform(-0.4, 0.0, shape).astype(np.float16))
    else:
        q = rng.integers(-128, 128, (*shape, 32), dtype=np.int8)
        offset = None
    return BlockQuantized(jnp.asarray(q), scale, offset, fmt)


def test_dequantize_lays_out_nibbles_and_scales():
    # One q4 block: byte j holds element j (low nibble) and element j + 16 (high nibble).
    q = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    half, minus_one = jnp.full((1, 1), 0.5, jnp.float16), jnp.full((1, 1), -1, jnp.float16)
    w = BlockQuantized(jnp.asarray(q[None, None]), half, minus_one, "q4")
    want = np.concatenate([np.arange(16), np.arange(16)[::-1]]) * 0.5 - 1
    np.testing.assert_array_equal(np.asarray(dequantize(w))[0], want)
    codes = jnp.arange(-16, 16, dtype=jnp.int8)[None, None]
    q8 = BlockQuantized(codes, jnp.full((1, 1), 0.25, jnp.float16), None, "q8")
    np.testing.assert_array_equal(np.asarray(dequantize(q8))[0], np.arange(-16, 16) * 0.25)


@pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel unavailable: {cpu.unavailable_reason()}")
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 16])
def test_cpu_kernel_equals_reference(fmt, rows):
    # 200 outputs: column chunks that do not divide evenly; 13 rows: an 8-row tile and a 5-row rest.
    rng = np.random.default_rng(rows)
    w = random_blocks(rng, fmt, 200, 576)
    x = jnp.asarray(rng.standard_normal((rows, 576)).astype(np.float32))
    call = jax.jit(lambda x, w: quantized_matmul(x, w, impl="cpu"))
    want = quantized_matmul_reference(x, w)
    for wide in cpu_library.vector_widths():  # the AVX2 kernel, and the AVX512 one where it runs
        with cpu_library.avx512(wide):
            got = call(x, w)
        assert got.shape == (rows, 200) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=0, err_msg=f"avx512={wide}")


def assert_one_call_each_its_reference(x, ws, target, reference, rel_tol, **kw):
    """`quantized_matmuls(x, ws)` traces to one call of `target`, each result within
    rel_tol * its largest value of `reference(x, w)`."""
    call = jax.jit(lambda x, ws: quantized_matmuls(x, ws, **kw))
    assert call.lower(x, ws).as_text().count(target) == 1
    for got, w in zip(call(x, ws), ws, strict=True):
        want = reference(x, w)
        np.testing.assert_allclose(got, want, atol=rel_tol * float(jnp.abs(want).max()), rtol=0)


@pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel unavailable: {cpu.unavailable_reason()}")
def test_several_products_in_one_kernel_call():
    """q, k, v-like products of one x (q4 and q8 mixed, column counts that split unevenly into
    chunks) in one call: one kernel call in the program, each result its own reference's."""
    rng = np.random.default_rng(7)
    ws = (random_blocks(rng, "q4", 200, 576), random_blocks(rng, "q8", 72, 576), random_blocks(rng, "q4", 17, 576))
    x = jnp.asarray(rng.standard_normal((5, 576)).astype(np.float32))
    assert_one_call_each_its_reference(x, ws, cpu.TARGET, quantized_matmul_reference, 2e-5, impl="cpu")


def test_auto_dispatch_keeps_leading_axes_and_large_row_counts_use_the_reference():
    rng = np.random.default_rng(0)
    w = random_blocks(rng, "q4", 64, 96)
    for lead in [(2, 3), (KERNEL_MAX_ROWS + 5,)]:
        x = jnp.asarray(rng.standard_normal((*lead, 96)).astype(np.float32))
        got = jax.jit(quantized_matmul)(x, w)
        assert got.shape == (*lead, 64)
        np.testing.assert_allclose(got, quantized_matmul_reference(x, w), atol=1e-4, rtol=0)


def test_take_rows_expands_only_the_rows_asked_for():
    w = random_blocks(np.random.default_rng(1), "q8", 50, 64)
    ids = jnp.asarray([[3, 7], [49, 0]])
    np.testing.assert_array_equal(take_rows(w, ids), np.asarray(dequantize(w))[np.asarray(ids)])


def test_bad_shapes_and_formats_are_refused():
    w = random_blocks(np.random.default_rng(2), "q4", 8, 64)
    with pytest.raises(ValueError, match="against a quantized matrix"):
        quantized_matmul(jnp.ones((2, 65)), w)
    with pytest.raises(ValueError, match="q4 needs an offset"):
        check(w.replace(offset=None))
    with pytest.raises(ValueError, match="unknown block-quantized format"):
        check(w.replace(format="q3"))
    with pytest.raises(ValueError, match="codes must be"):
        check(w.replace(q=w.q[..., :8]))


def test_int8_reference_quantizes_activations_per_block():
    """The int8 scheme itself, against numpy: per block of 32, scale amax / 127, codes rounded to
    nearest; the product is within x's rounding of the fp32 one, and not equal to it."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[1, :32] = 0  # an all-zero block: scale 0, codes 0
    codes, scales = quantize_activations(jnp.asarray(x))
    amax = np.abs(x.reshape(3, 2, 32)).max(-1)
    np.testing.assert_allclose(scales, amax / 127, rtol=1e-7)
    assert np.abs(np.asarray(codes)).max() == 127 and not np.asarray(codes)[1, 0].any()
    np.testing.assert_allclose(
        np.asarray(codes) * np.asarray(scales)[..., None], x.reshape(3, 2, 32), atol=amax.max() / 254
    )
    for fmt in ("q4", "q8"):
        w = random_blocks(rng, fmt, 48, 64)
        got, exact = int8_matmul_reference(jnp.asarray(x), w), quantized_matmul_reference(jnp.asarray(x), w)
        assert not np.array_equal(got, exact)
        np.testing.assert_allclose(got, exact, atol=0.02 * float(jnp.abs(exact).max()), rtol=0)


@pytest.mark.skipif(not cpu_library.vnni_supported(), reason="the int8 kernel needs AVX512-VNNI")
@pytest.mark.parametrize("rows", [1, 2, 8, 13])
def test_int8_kernel_equals_its_reference(rows):
    """The VNNI kernel reads the lane copy: q4 and q8 in one call (48 and 32 outputs: groups
    that split unevenly over the threads), each result its jnp reference's on the blocks."""
    rng = np.random.default_rng(rows)
    ws = with_lanes((random_blocks(rng, "q4", 48, 576), random_blocks(rng, "q8", 32, 576)))
    x = jnp.asarray(rng.standard_normal((rows, 576)).astype(np.float32))
    assert_one_call_each_its_reference(x, ws, cpu.TARGET_INT8, int8_matmul_reference, 2e-6)


@pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel unavailable: {cpu.unavailable_reason()}")
@pytest.mark.parametrize("rows", [1, 2, 8, 13])
def test_fp32_lane_kernel_equals_the_blocks_reference(rows):
    """The fp32 lane copy: from two rows up one call of the lane kernel (q4 and q8, 48 and 208
    outputs: groups that split unevenly over the threads; 13 rows: an 8-row tile and a 5-row
    rest), each result the dequantized product's up to the order of the sums, at both vector
    widths. One row reads the blocks."""
    rng = np.random.default_rng(rows)
    ws = with_lanes((random_blocks(rng, "q4", 48, 576), random_blocks(rng, "q8", 208, 576)), int8_activations=False)
    x = jnp.asarray(rng.standard_normal((rows, 576)).astype(np.float32))
    target = cpu.TARGET if rows == 1 else cpu.TARGET_LANES
    for wide in cpu_library.vector_widths():
        with cpu_library.avx512(wide):
            assert_one_call_each_its_reference(x, ws, target, quantized_matmul_reference, 2e-5)


@pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel unavailable: {cpu.unavailable_reason()}")
@pytest.mark.parametrize("rows", [1, 5])
def test_layer_views_read_their_layer_of_the_stack_in_place(rows):
    """`at_layer(i)` of stacked matrices: every kernel (blocks, fp32 lanes, int8 lanes) reads
    layer i of the stacks, not a slice copy: the program passes the stacks whole, and each result
    is layer i's own product. The jnp paths slice; a bad layer index is refused."""
    rng = np.random.default_rng(10 + rows)
    stacks = (random_blocks(rng, "q4", 48, 576, lead=(3,)), random_blocks(rng, "q8", 32, 576, lead=(3,)))
    x = jnp.asarray(rng.standard_normal((rows, 576)).astype(np.float32))
    kinds = [(stacks, cpu.TARGET, quantized_matmul_reference)]
    if rows > 1:
        kinds.append((with_lanes(stacks, int8_activations=False), cpu.TARGET_LANES, quantized_matmul_reference))
    if cpu_library.vnni_supported():
        kinds.append((with_lanes(stacks), cpu.TARGET_INT8, int8_matmul_reference))
    for ws, target, reference in kinds:
        for layer in (0, 2):
            views = tuple(w.at_layer(layer) for w in ws)
            call = jax.jit(lambda x, ws: quantized_matmuls(x, ws))
            program = call.lower(x, views).as_text()
            assert program.count(target) == 1 and "slice" not in program
            for got, w in zip(call(x, views), views, strict=True):
                want = reference(x, jax.tree.map(lambda a, layer=layer: a[layer], w).replace(layer=None))
                np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=0)
    sliced = quantized_matmul_reference(x, stacks[0].at_layer(1))
    np.testing.assert_array_equal(sliced, quantized_matmul_reference(x, jax.tree.map(lambda a: a[1], stacks[0])))
    with pytest.raises(ValueError, match="at_layer"):
        stacks[0].at_layer(3)


def test_lane_copy_is_opt_in_and_needs_groups_of_16():
    rng = np.random.default_rng(4)
    w = random_blocks(rng, "q8", 24, 64, lead=(2,))
    assert with_lanes(w).lanes is None  # 24 outputs: not packed, the default kernel stays
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_lanes(w)
    packed = pack_lanes(random_blocks(rng, "q4", 32, 64, lead=(2,)))
    assert packed.lanes.q.shape == (2, 2, 2, 4, 16, 4) and packed.lanes.offset.shape == (2, 2, 2, 16)
    check(packed)
    with pytest.raises(ValueError, match="lane copy does not match"):
        check(packed.replace(lanes=packed.lanes.replace(q=packed.lanes.q[..., :2])))
    x = jnp.asarray(rng.standard_normal((KERNEL_MAX_ROWS + 1, 64)).astype(np.float32))
    layer = jax.tree.map(lambda a: a[1], packed)  # prefill-sized: the fp32 product of the blocks
    np.testing.assert_allclose(quantized_matmul(x, layer), quantized_matmul_reference(x, layer), atol=1e-4, rtol=0)
