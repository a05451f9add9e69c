"""Interpret-mode tests of the Pallas span-attention kernels against the jnp reference."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.kernels import cpu_library
from spanjax.kernels.span_attention import (
    get_attention_impl,
    resolve_impl,
    span_attention,
    span_attention_reference,
    tuning,
)
from spanjax.kernels.span_attention.kernel import span_attention_gpu
from spanjax.kernels.span_attention.kernel_tpu import span_attention_tpu
from spanjax.kernels.span_attention.testing import args_kwargs, make_batch
from spanjax.kernels.span_attention.xla import prepare_meta, span_attention_xla

KERNELS = {"gpu": span_attention_gpu, "tpu": span_attention_tpu}
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

# A ragged mixed batch: chunked prefill after a prefix, a `parallel` plus with
# the question after it, a `sequential` plus, an empty sequence, decodes with
# long-ish and short contexts, and padding tokens past cu_q_lens[S].
MIXED = [
    dict(prefix=21, q_len=5, tail=9),
    dict(prefix=7, children=[12, 3, 20], parallel=True, q_len=4),
    dict(prefix=0, q_len=0),
    dict(prefix=40, children=[5, 9], parallel=False, q_len=1),
    dict(prefix=0, q_len=3),
    dict(prefix=33, q_len=1),
]


def _batch(seed, seqs, G, P, dtype=np.float32, Hkv=None, head_dim=32):
    Hkv = Hkv or (1 if G == 8 else 2)
    rng = np.random.default_rng(seed)
    return make_batch(
        rng,
        seqs,
        num_q_heads=G * Hkv,
        num_kv_heads=Hkv,
        head_dim=head_dim,
        page_size=P,
        dtype=dtype,
        extra_tokens=3,
        extra_entries=2,
    )


def _diff(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert np.isfinite(out).all()
    return float(np.max(np.abs(out - ref)))


def _run(variant, batch, **cfg):
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    out = KERNELS[variant](*args, **kw, interpret=True, **cfg)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return out, ref


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("G", [1, 3, 8])
@pytest.mark.parametrize("P", [16, 32])
def test_mixed_batch_fp32(variant, G, P):
    batch = _batch(G * 100 + P, MIXED, G, P)
    cfg = dict(block_q=4, pages_per_block=2) if variant == "gpu" else dict(block_q=2, pages_per_block=2)
    out, ref = _run(variant, batch, **cfg)
    d = _diff(out, ref)
    print(f"{variant} G={G} P={P} fp32 max|diff|={d:.2e}")
    assert d <= TOL["float32"]
    # padding tokens past cu_q_lens[S] give zeros
    T_real = int(batch["cu_q_lens"][-1])
    assert float(jnp.max(jnp.abs(out[T_real:]))) == 0.0


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("G", [3, 8])
def test_mixed_batch_bf16(variant, G):
    batch = _batch(7 + G, MIXED, G, 16, dtype=jnp.bfloat16)
    out, ref = _run(variant, batch, block_q=4, pages_per_block=1)
    d = _diff(out, ref)
    print(f"{variant} G={G} bf16 max|diff|={d:.2e}")
    assert d <= TOL["bfloat16"]


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("splits", [2, 4])
def test_split_kv_decode(variant, splits):
    seqs = [
        dict(prefix=150, q_len=1),
        dict(prefix=37, q_len=1),
        dict(prefix=0, q_len=0),
        dict(prefix=90, children=[30, 50], q_len=1),
    ]
    batch = _batch(splits, seqs, 3, 16)
    out, ref = _run(variant, batch, block_q=1, pages_per_block=2, num_splits=splits)
    d = _diff(out, ref)
    print(f"{variant} split={splits} fp32 max|diff|={d:.2e}")
    assert d <= TOL["float32"]


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_rows_that_see_nothing_are_zero(variant):
    batch = _batch(3, [dict(prefix=10, q_len=3), dict(prefix=20, q_len=2)], 3, 16)
    batch["block_lens"][1, :] = 0  # second sequence lists nothing
    batch["block_pos"][0, :] += 1000  # first sequence: every key is in its future
    out, ref = _run(variant, batch, block_q=2, pages_per_block=1)
    assert _diff(out, ref) <= TOL["float32"]
    assert float(jnp.max(jnp.abs(out))) == 0.0


def test_reference_masks_nonfinite_pad_slots():
    batch = _batch(5, [dict(prefix=10, q_len=3)], 1, 16)
    clean = span_attention_reference(*args_kwargs(batch)[0], **args_kwargs(batch)[1])
    for s in range(batch["block_tables"].shape[0]):
        for i in range(batch["block_tables"].shape[1]):
            n = batch["block_lens"][s, i]
            if n:
                batch["k_pages"][batch["block_tables"][s, i], n:] = np.nan
                batch["v_pages"][batch["block_tables"][s, i], n:] = np.inf
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    assert np.isfinite(np.asarray(ref)).all()
    assert _diff(ref, clean) == 0.0
    out = span_attention_gpu(*args, **kw, interpret=True, block_q=2, pages_per_block=1)
    assert _diff(out, ref) <= TOL["float32"]


@pytest.fixture
def jnp_paths(monkeypatch):
    """The XLA path without the C++ CPU kernels: its jnp tiled loop and decode pass."""
    monkeypatch.setattr("spanjax.kernels.span_attention.cpu.supports", lambda *a: False)


def _needs_cpu_kernels():
    if not cpu_library.available():
        pytest.skip(f"C++ CPU kernels unavailable: {cpu_library.unavailable_reason()}")


@pytest.mark.parametrize("G", [1, 3, 8])
@pytest.mark.parametrize("P", [16, 32])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_prefill_kernel(G, P, dtype):
    """Any batch not promised decode-only takes the C++ prefill kernel on CPU (cpu_attention.cc):
    the reference's result, padding tokens zero; a block-table bucket far wider than every
    sequence, junk page ids and NaN in pages nobody lists change nothing; a batch without query
    tokens gives zeros."""
    _needs_cpu_kernels()
    batch = _batch(G * 10 + P + 100, MIXED, G, P, dtype=getattr(jnp, dtype))
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    call = jax.jit(lambda *a: span_attention_xla(*a, **kw))
    assert "spanjax_prefill_attention" in call.lower(*args).as_text()
    out = call(*args)
    assert _diff(out, ref) <= TOL[dtype]
    T_real = int(batch["cu_q_lens"][-1])
    assert float(jnp.max(jnp.abs(out[T_real:].astype(jnp.float32)))) == 0.0
    if dtype == "float32" and G == 3:
        q, k_pages, v_pages, meta, q_pos = args
        wide = 8 * meta.block_tables.shape[1]
        pad = ((0, 0), (0, wide - meta.block_tables.shape[1]))
        lens = np.asarray(meta.block_lens)
        k_nan = np.asarray(k_pages).copy()
        k_nan[np.setdiff1d(np.arange(k_pages.shape[0]), np.asarray(meta.block_tables)[lens > 0])] = np.nan
        wide_meta = meta.replace(
            block_tables=np.pad(np.asarray(meta.block_tables), pad, constant_values=10**6),
            block_pos=np.pad(np.asarray(meta.block_pos), pad),
            block_lens=np.pad(lens, pad),
        )
        assert _diff(call(q, k_nan, v_pages, wide_meta, q_pos), ref) <= TOL[dtype]
        empty = meta.replace(cu_q_lens=np.zeros_like(np.asarray(meta.cu_q_lens)))
        assert float(jnp.max(jnp.abs(call(q, k_pages, v_pages, empty, q_pos)))) == 0.0


def test_cpu_prefill_kernel_long_tiles_and_key_blocks():
    """Chunks longer than one tile of query tokens over contexts of several key blocks (the
    kernel's tiles and online softmax), unsorted query positions within a sequence included."""
    _needs_cpu_kernels()
    seqs = [dict(prefix=150, q_len=70), dict(prefix=33, children=[40, 70], parallel=True, q_len=37)]
    batch = _batch(77, seqs, 3, 16)
    order = np.random.default_rng(0).permutation(70)  # the first sequence's tokens shuffled
    for name in ("q", "q_pos"):
        batch[name][:70] = batch[name][:70][order]
    args, kw = args_kwargs(batch)
    out = jax.jit(lambda *a: span_attention_xla(*a, **kw))(*args)
    assert _diff(out, span_attention_reference(*args, **kw)) <= TOL["float32"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_prefill_kernel_splits_few_tiles_over_long_contexts(dtype):
    """A few query tokens after a long span-structured context: one tile per sequence, fewer
    (tile, KV head) items than the threads want, so each tile's entries are split into chunks
    (here 38+ entries, at least 8 a chunk) whose partial softmaxes are merged; a short
    sequence beside it has chunks with nothing to see."""
    _needs_cpu_kernels()
    seqs = [dict(prefix=300, children=[120, 90, 100], parallel=True, q_len=6), dict(prefix=20, q_len=3)]
    batch = _batch(91, seqs, 3, 16, dtype=getattr(jnp, dtype))
    args, kw = args_kwargs(batch)
    out = jax.jit(lambda *a: span_attention_xla(*a, **kw))(*args)
    assert _diff(out, span_attention_reference(*args, **kw)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("G", [3, 8])
def test_cpu_prefill_kernel_vector_widths(dtype, G):
    """Head dim 64 (SmolLM2's): the prefill kernel's 16-wide path where AVX512 runs (a tile's
    rows in the vector lanes, every KV head in one work item) and its 8-wide one give the
    reference's result, over long tiles, tiles of one to six row vectors, split chunks (a few
    query tokens after a long context) and re-weighted logits."""
    _needs_cpu_kernels()
    seqs = [
        dict(prefix=150, q_len=70),
        dict(prefix=300, children=[120, 90], parallel=True, q_len=5),
        dict(prefix=20, q_len=3),
        dict(prefix=40, children=[30, 20], parallel=True, q_len=22),
        dict(prefix=9, q_len=20),
        dict(prefix=60, q_len=12),
    ]
    batch = _batch(5 + G, seqs, G, 16, dtype=getattr(jnp, dtype), head_dim=64)
    args, kw = args_kwargs(batch)
    rng = np.random.default_rng(1)
    weights = {f: rng.uniform(lo, hi, args[3].block_tables.shape).astype(np.float32) for f, lo, hi in WEIGHTS}
    call = jax.jit(lambda *a: span_attention_xla(*a, **kw))
    for meta in (args[3], args[3].replace(**weights)):
        ref = span_attention_reference(*args[:3], meta, args[4], **kw)
        for wide in cpu_library.vector_widths():
            with cpu_library.avx512(wide):
                assert _diff(call(*args[:3], meta, args[4]), ref) <= TOL[dtype], f"avx512={wide}"


WEIGHTS = (("block_logit_scale", 0.3, 2.5), ("block_logit_bias", -2.0, 2.0))


@pytest.mark.parametrize("G", [1, 3, 8])
@pytest.mark.parametrize("P", [16, 32])
@pytest.mark.parametrize("block_q", [1, 4, 64])
def test_xla_tiled_path_fp32(G, P, block_q, jnp_paths):
    """The tiled jnp path (the CPU default) equals the per-token reference."""
    batch = _batch(G * 10 + P + block_q, MIXED, G, P)
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    out = span_attention_xla(*args, **kw, block_q=block_q, pages_per_step=2)
    assert _diff(out, ref) <= TOL["float32"]
    T_real = int(batch["cu_q_lens"][-1])
    assert float(jnp.max(jnp.abs(out[T_real:]))) == 0.0


def test_xla_tiled_path_walks_only_needed_page_groups(jnp_paths):
    """The tiled path stops after the last page group any tile needs: a block-table bucket
    far wider than every sequence (junk page ids and NaN in the pages it never lists)
    changes nothing, and a batch with no query tokens walks no group and gives zeros."""
    batch = _batch(7, MIXED, 3, 16)
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    q, k_pages, v_pages, meta, q_pos = args
    tables, pos, lens = meta.block_tables, meta.block_pos, meta.block_lens
    wide = 8 * tables.shape[1]
    pad = ((0, 0), (0, wide - tables.shape[1]))
    junk_tables = np.pad(np.asarray(tables), pad, constant_values=10**6)
    listed = np.unique(np.asarray(tables)[np.asarray(lens) > 0])
    nan_pages = np.setdiff1d(np.arange(k_pages.shape[0]), listed)
    k_nan = np.asarray(k_pages).copy()
    k_nan[nan_pages] = np.nan
    wide_meta = meta.replace(
        block_tables=junk_tables, block_pos=np.pad(np.asarray(pos), pad), block_lens=np.pad(np.asarray(lens), pad)
    )
    wide_args = (q, k_nan, v_pages, wide_meta, q_pos)
    out = jax.jit(lambda *a: span_attention_xla(*a, **kw, pages_per_step=2))(*wide_args)
    assert _diff(out, ref) <= TOL["float32"]

    no_queries = (q, k_pages, v_pages, meta.replace(cu_q_lens=np.zeros_like(np.asarray(meta.cu_q_lens))), q_pos)
    out = span_attention_xla(*no_queries, **kw)
    assert not np.isnan(np.asarray(out)).any() and float(jnp.max(jnp.abs(out))) == 0.0


def test_xla_tiled_path_merges_several_groups_of_one_tile_per_iteration(jnp_paths):
    """The work list packs a long-context tile's page groups into the iterations that the
    short tiles beside it leave free, several of one tile in one iteration (merged by
    scatter-max and scatter-add): still the reference's result."""
    seqs = [dict(prefix=300, q_len=1), dict(prefix=200, q_len=3)] + [dict(prefix=2, q_len=5)] * 5
    batch = _batch(11, seqs, 3, 16)
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    out = span_attention_xla(*args, **kw, block_q=4, pages_per_step=1)
    assert _diff(out, ref) <= TOL["float32"]


# Decode-only: at most one query token per sequence (an empty sequence and padding tokens included).
DECODE = [
    dict(prefix=21, q_len=1, tail=9),
    dict(prefix=7, children=[12, 3, 20], parallel=True, q_len=1),
    dict(prefix=0, q_len=0),
    dict(prefix=40, children=[5, 9], parallel=False, q_len=1),
    dict(prefix=33, q_len=1),
]


# The decode paths: the C++ kernel (cpu_attention.cc) and the jnp one-pass path with its
# keys-major and queries-major scores.
DECODE_PATHS = {"cpu_kernel": None, "keys_major": 2, "queries_major": 10**6}


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("path", list(DECODE_PATHS))
def test_xla_decode_path(G, dtype, path, monkeypatch):
    """A batch promising one query token per sequence (meta.max_q_len == 1) takes the decode
    path (the C++ kernel on CPU, else one jnp pass); it equals the reference, junk pages and
    padding tokens included."""
    if path == "cpu_kernel":
        _needs_cpu_kernels()
    if path != "cpu_kernel":
        monkeypatch.setattr("spanjax.kernels.span_attention.cpu.supports", lambda *a: False)
        monkeypatch.setattr("spanjax.kernels.span_attention.xla.KEYS_MAJOR_MIN_SEQS", DECODE_PATHS[path])
    batch = _batch(G + 40, DECODE, G, 16, dtype=getattr(jnp, dtype))
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    args[3] = args[3].replace(max_q_len=1)
    call = jax.jit(lambda *a: span_attention_xla(*a, **kw))
    assert ("spanjax_decode_attention" in call.lower(*args).as_text()) == (path == "cpu_kernel")
    for wide in cpu_library.vector_widths() if path == "cpu_kernel" else [False]:
        with cpu_library.avx512(wide):  # the kernel's AVX2 and AVX512 paths
            out = call(*args)
        assert _diff(out, ref) <= TOL[dtype], f"avx512={wide}"
    T_real = int(batch["cu_q_lens"][-1])
    assert float(jnp.max(jnp.abs(out[T_real:].astype(jnp.float32)))) == 0.0
    # The keys' RoPE tables computed once per step (what forward_paged does before its layers)
    # give the same result as tables computed inside the call.
    prepared = prepare_meta(args[3], args[1].shape[1], kw["rope_inv_freq"])
    assert prepared.key_rope is not None
    args[3] = prepared
    assert _diff(jax.jit(lambda *a: span_attention_xla(*a, **kw))(*args), out) == 0.0


@pytest.mark.parametrize("P, head_dim", [(32, 64), (16, 128)])
def test_cpu_decode_kernel_pages_past_one_block_and_wider_heads(P, head_dim):
    """The decode kernel scores keys in blocks of 16 tokens with a rotated key in registers
    (one instantiation per head dim): pages of 32 tokens (two blocks, the second partly
    visible) and heads of 64 and 128 dimensions equal the reference."""
    _needs_cpu_kernels()
    batch = _batch(11, DECODE, 3, P, head_dim=head_dim)
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    args[3] = args[3].replace(max_q_len=1)
    call = jax.jit(lambda *a: span_attention_xla(*a, **kw))
    assert "spanjax_decode_attention" in call.lower(*args).as_text()
    for wide in cpu_library.vector_widths():
        with cpu_library.avx512(wide):
            assert _diff(call(*args), ref) <= TOL["float32"], f"avx512={wide}"


@pytest.mark.parametrize("decode", [True, False])
def test_cpu_kernels_rotate_keys_past_their_position_tables(decode):
    """The kernels index RoPE tables of positions 0 .. M * P - 1; every position shifted past
    them (3,000 on), they rotate each key themselves: still the reference's result."""
    _needs_cpu_kernels()
    batch = _batch(7, DECODE if decode else MIXED, 3, 16)
    args, kw = args_kwargs(batch)
    T_real = int(batch["cu_q_lens"][-1])
    shift = 3000
    assert shift >= args[3].block_tables.shape[1] * 16  # past the tables: M * P rows
    args[3] = args[3].replace(block_pos=args[3].block_pos + shift, max_q_len=1 if decode else None)
    args[4] = args[4].at[:T_real].add(shift)
    call = jax.jit(lambda *a: span_attention_xla(*a, **kw))
    kind = "decode" if decode else "prefill"
    assert f"spanjax_{kind}_attention" in call.lower(*args).as_text()
    for wide in cpu_library.vector_widths():
        with cpu_library.avx512(wide):
            assert _diff(call(*args), span_attention_reference(*args, **kw)) <= TOL["float32"], f"avx512={wide}"


def test_xla_tiled_path_bf16(jnp_paths):
    batch = _batch(5, MIXED, 3, 16, dtype=jnp.bfloat16)
    args, kw = args_kwargs(batch)
    assert _diff(span_attention_xla(*args, **kw), span_attention_reference(*args, **kw)) <= TOL["bfloat16"]


def test_dispatcher(monkeypatch):
    assert resolve_impl(None, backend="cpu") == "xla"
    assert resolve_impl(None, backend="gpu") == "pallas_gpu"
    assert resolve_impl(None, backend="tpu") == "pallas_tpu"
    assert resolve_impl("pallas", backend="cpu") == "pallas_gpu"
    monkeypatch.setenv("SPANJAX_ATTENTION_IMPL", "pallas_tpu")
    assert resolve_impl(None, backend="gpu") == "pallas_tpu"
    monkeypatch.delenv("SPANJAX_ATTENTION_IMPL")
    with pytest.raises(ValueError):
        resolve_impl("triton")
    assert get_attention_impl("reference") is span_attention_reference
    batch = _batch(11, MIXED[:2], 3, 16)
    args, kw = args_kwargs(batch)
    ref = span_attention_reference(*args, **kw)
    for impl in ("xla", "pallas_gpu", "pallas_tpu"):
        fn = get_attention_impl(impl, interpret=True)
        out = jax.jit(fn, static_argnames=("sm_scale",))(*args, **kw)
        assert _diff(out, ref) <= TOL["float32"]
    out = span_attention(*args, **kw, impl="pallas", config=dict(block_q=2, pages_per_block=1))
    assert _diff(out, ref) <= TOL["float32"]


def test_tuned_table_lookup(tmp_path):
    key = tuning.bucket_key("gpu", 40, 6, 8, 16, 6, 2, 32, np.float32)
    assert key == "gpu/d32/g3/p16/float32/t64/s8/c128"
    heur = tuning.get_config("gpu", 40, 6, 8, 16, 6, 2, 32, np.float32, table={"entries": {}})
    assert heur == tuning.heuristic("gpu", 40, 6, 8, 16, 6, 2, 32)
    table = {
        "format": tuning.TABLE_FORMAT,
        "entries": {tuning.device_kind(): {key: {"block_q": 2, "pages_per_block": 1, "num_splits": 1, "us": 1.0}}},
    }
    cfg = tuning.get_config("gpu", 40, 6, 8, 16, 6, 2, 32, np.float32, table=table)
    assert cfg["block_q"] == 2 and cfg["pages_per_block"] == 1
    path = tmp_path / "t.json"
    tuning.save_table(table, path)
    assert json.loads(path.read_text())["entries"] == table["entries"]
    assert tuning.load_table(path)["entries"] == table["entries"]
    # the shipped table parses and has the current format
    assert tuning.load_table(tuning.TABLE_PATH)["format"] == tuning.TABLE_FORMAT
    # long-context small-batch decode gets split-KV from the heuristic
    assert tuning.heuristic("gpu", 2, 2, 512, 16, 32, 8, 128)["num_splits"] > 1
    assert tuning.heuristic("gpu", 512, 4, 64, 16, 32, 8, 128)["num_splits"] == 1
