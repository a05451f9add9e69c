"""Cross-platform lowering without hardware: Pallas -> Triton IR (cuda) and -> Mosaic (tpu).

This checks every lowering rule the kernels use (what jax itself does before the
GPU/TPU compiler runs); it does not run Triton's or Mosaic's backend compilers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from spanjax.kernels.span_attention.kernel import span_attention_gpu
from spanjax.kernels.span_attention.kernel_tpu import span_attention_tpu
from spanjax.kernels.span_attention.testing import args_kwargs, make_batch

SEQS = [dict(prefix=40, q_len=5), dict(prefix=100, q_len=1), dict(prefix=0, q_len=0)]
DISABLED = [
    export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
    export.DisabledSafetyCheck.custom_call("tpu_custom_call"),
]


@pytest.fixture
def fake_tpu(monkeypatch):
    try:
        from jax._src.pallas.mosaic import tpu_info
    except ImportError:
        pytest.skip("no mosaic tpu_info in this jax")
    if not hasattr(tpu_info, "get_device_kind") or not hasattr(tpu_info, "get_num_device_cores"):
        pytest.skip("tpu_info internals changed")
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cfg", [dict(), dict(num_splits=4, block_q=1)])
def test_gpu_lowers_to_triton(dtype, cfg):
    b = make_batch(
        np.random.default_rng(0), SEQS, num_q_heads=6, num_kv_heads=2, head_dim=64, page_size=16, dtype=jnp.dtype(dtype)
    )
    args, kw = args_kwargs(b)
    exp = export.export(
        jax.jit(functools.partial(span_attention_gpu, **kw, **cfg)), platforms=["cuda"], disabled_checks=DISABLED
    )(*args)
    assert "triton" in exp.mlir_module()


def tpu_batch(dtype):
    """A batch in the TPU kernel's layout: one kv head of 128 dims, 16-token pages."""
    return make_batch(
        np.random.default_rng(0),
        SEQS,
        num_q_heads=8,
        num_kv_heads=1,
        head_dim=128,
        page_size=16,
        dtype=jnp.dtype(dtype),
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cfg", [dict(block_q=8, pages_per_block=4), dict(num_splits=2, block_q=1)])
def test_tpu_lowers_to_mosaic(fake_tpu, dtype, cfg):
    b = tpu_batch(dtype)
    args, kw = args_kwargs(b)
    exp = export.export(
        jax.jit(functools.partial(span_attention_tpu, **kw, **cfg)), platforms=["tpu"], disabled_checks=DISABLED
    )(*args)
    assert "tpu_custom_call" in exp.mlir_module()


def _reweighted(args):
    meta = args[3]
    shape = meta.block_tables.shape
    args[3] = meta.replace(
        block_logit_scale=jnp.full(shape, 0.9, jnp.float32), block_logit_bias=jnp.full(shape, 0.2, jnp.float32)
    )
    return args


@pytest.mark.parametrize("cfg", [dict(), dict(num_splits=4, block_q=1)])
def test_reweighted_gpu_lowers_to_triton(cfg):
    b = make_batch(np.random.default_rng(0), SEQS, num_q_heads=6, num_kv_heads=2, head_dim=64, page_size=16)
    args, kw = args_kwargs(b)
    fn = jax.jit(functools.partial(span_attention_gpu, **kw, **cfg))
    exp = export.export(fn, platforms=["cuda"], disabled_checks=DISABLED)(*_reweighted(args))
    assert "triton" in exp.mlir_module()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reweighted_tpu_lowers_to_mosaic(fake_tpu, dtype):
    """The entries' scale and bias are two more scalar-prefetched (SMEM) f32 arrays."""
    b = tpu_batch(dtype)
    args, kw = args_kwargs(b)
    fn = jax.jit(functools.partial(span_attention_tpu, **kw, block_q=8, pages_per_block=4))
    exp = export.export(fn, platforms=["tpu"], disabled_checks=DISABLED)(*_reweighted(args))
    assert "tpu_custom_call" in exp.mlir_module()
