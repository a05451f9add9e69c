"""Per-entry logit re-weighting (SpanBatchMeta.block_logit_scale / block_logit_bias, APE-style):
every implementation equals a dense masked attention with the same per-key scale and bias, built
here from the block tables alone; identity arrays equal the plain (None) path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.kernels.span_attention import span_attention_reference
from spanjax.kernels.span_attention.kernel import span_attention_gpu
from spanjax.kernels.span_attention.kernel_tpu import span_attention_tpu
from spanjax.kernels.span_attention.sharded import shard_heads
from spanjax.kernels.span_attention.testing import args_kwargs, make_batch
from spanjax.kernels.span_attention.xla import span_attention_xla

# Prefill chunks after a prefix, a parallel plus with its question, a sequential plus, an empty
# sequence, a decode; then a decode-only batch (the XLA path's one-pass decode).
MIXED = [
    dict(prefix=21, q_len=5, tail=9),
    dict(prefix=7, children=[12, 3, 20], parallel=True, q_len=4),
    dict(prefix=0, q_len=0),
    dict(prefix=40, children=[5, 9], parallel=False, q_len=1),
]
DECODE = [dict(prefix=21, q_len=1, tail=9), dict(prefix=7, children=[12, 3, 20], q_len=1), dict(prefix=0, q_len=0)]

IMPLS = {
    "reference": span_attention_reference,
    "xla": functools.partial(span_attention_xla, block_q=2, pages_per_step=2),  # the C++ kernels where built
    "xla-jnp": functools.partial(span_attention_xla, block_q=2, pages_per_step=2),  # its jnp paths
    "gpu": functools.partial(span_attention_gpu, interpret=True, block_q=4, pages_per_block=2),
    "gpu-split": functools.partial(span_attention_gpu, interpret=True, block_q=1, pages_per_block=1, num_splits=2),
    "tpu": functools.partial(span_attention_tpu, interpret=True, block_q=2, pages_per_block=2),
    "tpu-split": functools.partial(span_attention_tpu, interpret=True, block_q=1, pages_per_block=1, num_splits=2),
}


def _batch(seed, seqs):
    rng = np.random.default_rng(seed)
    b = make_batch(rng, seqs, num_q_heads=6, num_kv_heads=2, head_dim=32, page_size=16, extra_tokens=2, extra_entries=1)
    shape = b["block_tables"].shape
    scale = rng.uniform(0.3, 2.5, shape).astype(np.float32)
    bias = rng.uniform(-2.0, 2.0, shape).astype(np.float32)
    scale[b["block_lens"] == 0] = np.nan  # unused entries' values are never read
    bias[b["block_lens"] == 0] = np.inf
    return b, scale, bias


def _rope(k, pos, inv_freq):
    """Rotate-half RoPE of k [K, H, D] at positions [K] (kernels/rope.py's convention), in numpy."""
    ang = (pos.astype(np.float64)[:, None] * inv_freq)[:, None, :]
    half = k.shape[-1] // 2
    k1, k2 = k[..., :half], k[..., half:]
    return np.concatenate([k1 * np.cos(ang) - k2 * np.sin(ang), k2 * np.cos(ang) + k1 * np.sin(ang)], axis=-1)


def dense_reweighted(b, scale, bias):
    """Per query token: every key its sequence lists and its position allows, logit
    scale * (q . k * sm_scale) + bias of the key's entry, then a plain softmax."""
    T, Hq, D = b["q"].shape
    Hkv = b["k_pages"].shape[2]
    G = Hq // Hkv
    cu = b["cu_q_lens"]
    out = np.zeros((T, Hq, D), np.float32)
    for s in range(len(cu) - 1):
        for t in range(cu[s], cu[s + 1]):
            p = b["q_pos"][t]
            keys, vals, kpos, w_s, w_b = [], [], [], [], []
            for i in range(b["block_tables"].shape[1]):
                page, start = b["block_tables"][s, i], b["block_pos"][s, i]
                for j in range(b["block_lens"][s, i]):
                    if start + j <= p:
                        keys.append(b["k_pages"][page, j])
                        vals.append(b["v_pages"][page, j])
                        kpos.append(start + j)
                        w_s.append(scale[s, i])
                        w_b.append(bias[s, i])
            if not keys:
                continue
            k = _rope(np.stack(keys), np.asarray(kpos), b["rope_inv_freq"])
            q = b["q"][t].reshape(Hkv, G, D)
            logits = np.einsum("hgd,khd->hgk", q, k) * b["sm_scale"]
            logits = logits * np.asarray(w_s) + np.asarray(w_b)
            prob = np.exp(logits - logits.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            out[t] = np.einsum("hgk,khd->hgd", prob, np.stack(vals)).reshape(Hq, D)
    return out


def _call(fn, b, scale, bias, **meta_fields):
    args, kw = args_kwargs(b)
    args[3] = args[3].replace(block_logit_scale=scale, block_logit_bias=bias, **meta_fields)
    return np.asarray(jax.jit(lambda *a: fn(*a, **kw))(*args))


def _jnp_paths_if(impl, monkeypatch):
    if impl == "xla-jnp":
        monkeypatch.setattr("spanjax.kernels.span_attention.cpu.supports", lambda *a: False)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_every_variant_equals_dense_reweighted_attention(impl, monkeypatch):
    _jnp_paths_if(impl, monkeypatch)
    b, scale, bias = _batch(1, MIXED)
    ref = dense_reweighted(b, scale, bias)
    out = _call(IMPLS[impl], b, jnp.asarray(scale), jnp.asarray(bias))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=2e-5)
    plain = dense_reweighted(b, np.ones_like(scale), np.zeros_like(bias))
    assert np.abs(plain - ref).max() > 1e-2  # the re-weighting changes the result


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_xla_decode_path_equals_dense_reweighted_attention(cpu_kernel, monkeypatch):
    """Both decode paths: the C++ kernel (where built) and the jnp pass."""
    if not cpu_kernel:
        monkeypatch.setattr("spanjax.kernels.span_attention.cpu.supports", lambda *a: False)
    b, scale, bias = _batch(2, DECODE)
    ref = dense_reweighted(b, scale, bias)
    out = _call(span_attention_xla, b, jnp.asarray(scale), jnp.asarray(bias), max_q_len=1)
    np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("impl", ["reference", "xla", "xla-jnp", "gpu", "tpu"])
def test_identity_weights_equal_the_plain_path(impl, monkeypatch):
    _jnp_paths_if(impl, monkeypatch)
    b, _, _ = _batch(3, MIXED[:2])
    args, kw = args_kwargs(b)
    plain = np.asarray(IMPLS[impl](*args, **kw))
    ones = jnp.ones(b["block_tables"].shape, jnp.float32)
    np.testing.assert_allclose(_call(IMPLS[impl], b, ones, jnp.zeros_like(ones)), plain, atol=1e-6)
    # one of the two alone: the other is the identity
    scale_only = np.asarray(b["block_lens"] > 0, np.float32) * 0.5 + 1.0
    ref = dense_reweighted(b, scale_only, np.zeros_like(scale_only))
    np.testing.assert_allclose(_call(IMPLS[impl], b, jnp.asarray(scale_only), None), ref, atol=2e-5)


def test_sharded_passes_the_weights_replicated():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    b, scale, bias = _batch(4, MIXED[:2])
    out = _call(shard_heads(span_attention_xla, mesh), b, jnp.asarray(scale), jnp.asarray(bias))
    np.testing.assert_allclose(out, dense_reweighted(b, scale, bias), atol=2e-5)


def test_bad_weights_name_the_field():
    b, scale, _ = _batch(5, MIXED[:2])
    args, kw = args_kwargs(b)
    with pytest.raises(ValueError, match="block_logit_scale"):
        span_attention_reference(
            *args[:3], args[3].replace(block_logit_scale=jnp.asarray(scale[:, :-1])), *args[4:], **kw
        )
    with pytest.raises(ValueError, match="block_logit_bias"):
        span_attention_xla(
            *args[:3], args[3].replace(block_logit_bias=jnp.zeros(scale.shape, jnp.int32)), *args[4:], **kw
        )
