"""GGUF loading: dequantization per type, q/k un-permutation, errors, and the real SmolLM2 against transformers."""

from __future__ import annotations

import os

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from spanjax.engine.dense_generate import generate
from spanjax.engine.sampling import SamplingParams
from spanjax.kernels.quantized_matmul import BlockQuantized, dequantize
from spanjax.models.errors import WeightLoadError
from spanjax.models.gguf import dequantize_tensor, load_gguf, permute_qk, quantized_tensor, unpermute_qk
from spanjax.models.llama import compute_logits, forward_dense, init_dense_cache

# ----------------------------------------------------------------------------- helpers


def _reference_dequant(raw: np.ndarray, qtype: QT, shape) -> np.ndarray:
    """transformers' independent (torch) dequantizer, as the expected values for quantized types."""
    # torch and transformers (optional test dependencies, slow to import) load only in the tests that use them.
    import torch
    from transformers.integrations.gguf.dequant import dequantize

    flat = dequantize(torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).copy()), int(qtype))
    return flat.numpy().reshape(shape)


def _write_gguf(path, tensors: dict, arch="llama", metadata=None):
    """tensors: name -> (array, raw_dtype or None). Arrays are numpy order ([out, in])."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    for name, (array, raw_dtype) in tensors.items():
        if raw_dtype is None:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _read_one(path):
    return dequantize_tensor(gguf.GGUFReader(path).tensors[0], path)


def _random_k_blocks(rng, n_blocks, block_bytes, half_at):
    """Random K-quant blocks with finite fp16 scales at the given byte offsets."""
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in half_at:
        raw[:, off : off + 2] = (
            rng.uniform(0.001, 0.05, size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        )
    return raw


# ----------------------------------------------------------------------------- dequantization per type

ROWS, COLS = 4, 512  # COLS is a multiple of the K-quant super-block (256)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_kept_blocks_expand_to_the_dequantized_values(tmp_path, qtype):
    # quantized=True keeps these blocks as they are stored; expanded, they must be the values
    # transformers' independent dequantizer gives (Q4_0 becomes q4 with offset -8 d).
    x = np.random.default_rng(int(qtype)).standard_normal((ROWS, COLS)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    tensor = gguf.GGUFReader(_write_gguf(tmp_path / "t.gguf", {"w": (raw, qtype)})).tensors[0]
    kept = quantized_tensor(tensor)
    assert isinstance(kept, BlockQuantized) and kept.format == ("q8" if qtype == QT.Q8_0 else "q4")
    np.testing.assert_array_equal(np.asarray(dequantize(kept)), _reference_dequant(raw, qtype, (ROWS, COLS)))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_dequantize_quantizable_types(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype == QT.F32:
        expected, tensor, raw_dtype = x, x, None
    elif qtype == QT.F16:
        expected, tensor, raw_dtype = x.astype(np.float16).astype(np.float32), x.astype(np.float16), None
    else:
        tensor = gguf.quants.quantize(x, qtype)
        raw_dtype = qtype
        if qtype == QT.BF16:
            expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
        else:
            expected = _reference_dequant(tensor, qtype, (ROWS, COLS))
    got = _read_one(_write_gguf(tmp_path / "t.gguf", {"w": (tensor, raw_dtype)}))
    assert got.shape == (ROWS, COLS) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    # And the values are the original ones up to the type's rounding.
    tol = {QT.F32: 0, QT.F16: 2e-3, QT.BF16: 1e-2, QT.Q8_0: 0.02, QT.Q4_0: 0.5, QT.Q4_1: 0.4}[qtype]
    np.testing.assert_allclose(got, x, atol=tol * np.abs(x).max(), rtol=0)


@pytest.mark.parametrize("qtype,block_bytes,halves", [(QT.Q4_K, 144, (0, 2)), (QT.Q6_K, 210, (208,))])
def test_dequantize_k_quants(tmp_path, qtype, block_bytes, halves):
    # gguf-py cannot quantize K-quants, so write random blocks and compare with transformers' dequantizer.
    rng = np.random.default_rng(int(qtype))
    n_blocks = ROWS * COLS // 256
    raw = _random_k_blocks(rng, n_blocks, block_bytes, halves).reshape(ROWS, -1)
    got = _read_one(_write_gguf(tmp_path / "t.gguf", {"w": (raw, qtype)}))
    assert got.shape == (ROWS, COLS)
    expected = _reference_dequant(raw, qtype, (ROWS, COLS))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.isfinite(got).all() and np.abs(got).max() > 0


def test_unsupported_type_names_tensor_and_type(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=(2, 176), dtype=np.uint8)  # Q5_K: 176 bytes / 256 values
    path = _write_gguf(tmp_path / "t.gguf", {"blk.0.ffn_up.weight": (raw, QT.Q5_K)})
    with pytest.raises(WeightLoadError, match=r"'blk\.0\.ffn_up\.weight'.*Q5_K"):
        _read_one(path)


# ----------------------------------------------------------------------------- q/k permutation


def test_qk_permutation_round_trip():
    rng = np.random.default_rng(0)
    for n_head, head_dim, hidden in [(9, 64, 576), (3, 64, 576), (4, 8, 16)]:
        w = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
        p = permute_qk(w, n_head)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, n_head), w)


def _convert_permute(weights, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


TINY = dict(vocab=40, hidden=32, ffn=64, layers=2, heads=4, kv_heads=2)


def _tiny_llama_gguf(path, rng, arch="llama", tied=False, extra_tensor=None):
    """A tiny llama GGUF written as llama.cpp's converter would (q/k permuted, [out, in] arrays)."""
    H, F, L, nh, nkv, V = TINY["hidden"], TINY["ffn"], TINY["layers"], TINY["heads"], TINY["kv_heads"], TINY["vocab"]
    D = H // nh
    hf = {}  # HF-layout originals, to compare against
    tensors = {}

    def add(name, arr, gguf_arr=None):
        hf[name] = arr
        tensors[name] = (arr if gguf_arr is None else gguf_arr, None)

    add("token_embd.weight", rng.standard_normal((V, H)).astype(np.float32))
    add("output_norm.weight", rng.standard_normal(H).astype(np.float32))
    if not tied:
        add("output.weight", rng.standard_normal((V, H)).astype(np.float32))
    for i in range(L):
        q = rng.standard_normal((nh * D, H)).astype(np.float32)
        k = rng.standard_normal((nkv * D, H)).astype(np.float32)
        add(f"blk.{i}.attn_q.weight", q, _convert_permute(q, nh, nh))
        add(f"blk.{i}.attn_k.weight", k, _convert_permute(k, nh, nkv))
        add(f"blk.{i}.attn_v.weight", rng.standard_normal((nkv * D, H)).astype(np.float32))
        add(f"blk.{i}.attn_output.weight", rng.standard_normal((H, nh * D)).astype(np.float32))
        add(f"blk.{i}.ffn_gate.weight", rng.standard_normal((F, H)).astype(np.float32))
        add(f"blk.{i}.ffn_up.weight", rng.standard_normal((F, H)).astype(np.float32))
        add(f"blk.{i}.ffn_down.weight", rng.standard_normal((H, F)).astype(np.float32))
        add(f"blk.{i}.attn_norm.weight", rng.standard_normal(H).astype(np.float32))
        add(f"blk.{i}.ffn_norm.weight", rng.standard_normal(H).astype(np.float32))
    if extra_tensor:
        tensors.update(extra_tensor)
    tokens = ["<s>", "</s>", "<|im_end|>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(V - 3)]
    meta = {
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": H,
        f"{arch}.block_count": L,
        f"{arch}.feed_forward_length": F,
        f"{arch}.attention.head_count": nh,
        f"{arch}.attention.head_count_kv": nkv,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.freq_base": 5000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (V - 3),
        "tokenizer.ggml.merges": ["a a"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    return _write_gguf(path, tensors, arch=arch, metadata=meta), hf


@pytest.mark.parametrize("tied", [False, True])
def test_load_tiny_llama_restores_hf_layout(tmp_path, tied):
    path, hf = _tiny_llama_gguf(tmp_path / "tiny.gguf", np.random.default_rng(1), tied=tied)
    cfg, params, tok = load_gguf(path, jnp.float32)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (TINY["vocab"], TINY["hidden"], TINY["ffn"])
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 8)
    assert cfg.rope_theta == 5000.0 and cfg.max_position_embeddings == 128
    assert cfg.rms_norm_eps == pytest.approx(1e-6)
    assert cfg.tie_word_embeddings == tied and (params.lm_head is None) == tied
    assert cfg.bos_token_id == 0 and cfg.eos_token_ids == (1,)
    assert tok.pre == "smollm" and tok.tokens[2] == "<|im_end|>" and tok.merges == ("a a",)
    for i in range(2):
        # Stored [in, out]: the transpose of HF's [out, in], with q/k back in HF row order.
        np.testing.assert_array_equal(params.layers.wq[i], hf[f"blk.{i}.attn_q.weight"].T)
        np.testing.assert_array_equal(params.layers.wk[i], hf[f"blk.{i}.attn_k.weight"].T)
        np.testing.assert_array_equal(params.layers.wv[i], hf[f"blk.{i}.attn_v.weight"].T)
        np.testing.assert_array_equal(params.layers.wo[i], hf[f"blk.{i}.attn_output.weight"].T)
        np.testing.assert_array_equal(params.layers.w_down[i], hf[f"blk.{i}.ffn_down.weight"].T)
        np.testing.assert_array_equal(params.layers.attn_norm[i], hf[f"blk.{i}.attn_norm.weight"])
    np.testing.assert_array_equal(params.embed, hf["token_embd.weight"])
    if not tied:
        np.testing.assert_array_equal(params.lm_head, hf["output.weight"].T)
    # dtype is honoured
    _, p16, _ = load_gguf(path, jnp.bfloat16)
    assert p16.layers.wq.dtype == jnp.bfloat16


def test_unsupported_architecture(tmp_path):
    path, _ = _tiny_llama_gguf(tmp_path / "gpt2.gguf", np.random.default_rng(0), arch="gpt2")
    with pytest.raises(WeightLoadError, match=r"architecture 'gpt2' is not supported"):
        load_gguf(path)


def test_unsupported_tensor_type_in_model(tmp_path):
    raw = np.zeros((2, 176), np.uint8)
    path, _ = _tiny_llama_gguf(
        tmp_path / "q5k.gguf", np.random.default_rng(0), extra_tensor={"blk.0.ffn_up.weight": (raw, QT.Q5_K)}
    )
    with pytest.raises(WeightLoadError, match=r"blk\.0\.ffn_up\.weight.*Q5_K"):
        load_gguf(path)


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(WeightLoadError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(WeightLoadError, match="not a readable GGUF"):
        load_gguf(bad)


# ----------------------------------------------------------------------------- the real SmolLM2 vs transformers

# Raw-text and chat prompts of different lengths (one batch, so right padding is exercised too).
PROMPTS = [
    ("text", "The quick brown fox"),
    ("text", "def fibonacci(n):\n    "),
    ("text", "Once upon a time, in a land far away, there lived a"),
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about the ocean."),
]
N_NEW = 32
# Measured max |logits difference| against transformers (fp32 CPU) is ~1.4e-4 on logits of magnitude ~40
# (the dequantized weights are bit-identical; the rest is fp32 summation order). Asserted with headroom.
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    d, f = os.path.split(smollm2_gguf_path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def _prompt_ids(model, kind, text):
    tok = model.tokenizer
    if kind == "chat":
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
    return tok.encode(text)


def _hf_greedy(hf, ids, n):
    """Plain greedy decoding with transformers, no stopping (so any eos we stop at can be checked)."""
    import torch

    out = []
    with torch.no_grad():
        res = hf(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            res = hf(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def test_smollm2_config(smollm2):
    cfg = smollm2.cfg
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (49152, 576, 30, 9, 3)
    assert cfg.tie_word_embeddings and smollm2.params.lm_head is None
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert 2 in cfg.eos_token_ids


def test_smollm2_weights_match_transformers(smollm2, hf_smollm2):
    sd = hf_smollm2.state_dict()
    for i in (0, 17, 29):
        for ours, theirs in [
            (smollm2.params.layers.wq[i], f"model.layers.{i}.self_attn.q_proj.weight"),
            (smollm2.params.layers.wk[i], f"model.layers.{i}.self_attn.k_proj.weight"),
            (smollm2.params.layers.w_gate[i], f"model.layers.{i}.mlp.gate_proj.weight"),
        ]:
            np.testing.assert_array_equal(np.asarray(ours), sd[theirs].numpy().T)
    np.testing.assert_array_equal(np.asarray(smollm2.params.embed), sd["model.embed_tokens.weight"].numpy())


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    import torch

    # One right-padded batch (one compile); padding sits at position T_max, outside the cache, so it is dropped.
    prompts = [_prompt_ids(smollm2, kind, text) for kind, text in PROMPTS[:2] + PROMPTS[3:5]]
    T = max(map(len, prompts))
    tokens = np.zeros((len(prompts), T), np.int32)
    positions = np.full((len(prompts), T), T, np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
        positions[i, : len(ids)] = np.arange(len(ids))
    cache = init_dense_cache(smollm2.cfg, len(prompts), T)
    hidden, _ = forward_dense(smollm2.params, smollm2.cfg, jnp.asarray(tokens), jnp.asarray(positions), cache)
    logits = np.asarray(compute_logits(smollm2.params, smollm2.cfg, hidden))
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(logits[i, : len(ids)], ref, atol=LOGITS_ATOL, rtol=0)


def test_smollm2_kept_quantized_matches_transformers(smollm2_gguf_path, hf_smollm2):
    # The Q4_1 / Q8_0 blocks kept as stored: a prompt (more rows than the CPU kernel takes: the
    # expand-then-dot path) and then one decode token for each of 4 sequences (4 rows: the kernel),
    # against transformers' forward over prompt + token.
    import torch

    cfg, params, _ = load_gguf(smollm2_gguf_path, quantized=True)
    assert isinstance(params.layers.wq, BlockQuantized) and isinstance(params.embed, BlockQuantized)
    ids = [[1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2124][: 6 + i] for i in range(4)]
    T = max(map(len, ids))
    tokens = np.zeros((4, T), np.int32)
    positions = np.full((4, T), T + 1, np.int32)  # padding sits outside the cache
    for i, seq in enumerate(ids):
        tokens[i, : len(seq)], positions[i, : len(seq)] = seq, np.arange(len(seq))
    cache = init_dense_cache(cfg, 4, T + 1)
    _, cache = forward_dense(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), cache)
    nxt = np.array([[42], [7], [1999], [3]], np.int32)
    pos = np.array([[len(seq)] for seq in ids], np.int32)
    hidden, _ = forward_dense(params, cfg, jnp.asarray(nxt), jnp.asarray(pos), cache)
    logits = np.asarray(compute_logits(params, cfg, hidden[:, 0]))
    for i, seq in enumerate(ids):
        with torch.no_grad():
            ref = hf_smollm2(torch.tensor([seq + [int(nxt[i, 0])]])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[i], ref, atol=LOGITS_ATOL, rtol=0)


def test_smollm2_greedy_matches_transformers(smollm2, hf_smollm2):
    prompts = [_prompt_ids(smollm2, kind, text) for kind, text in PROMPTS]
    results = generate(smollm2, prompts, SamplingParams(max_tokens=N_NEW, temperature=0.0))
    eos = set(smollm2.cfg.eos_token_ids)
    full_length = 0
    for (kind, text), ids, res in zip(PROMPTS, prompts, results):
        ref = _hf_greedy(hf_smollm2, ids, N_NEW)
        n = len(res.token_ids)
        assert res.token_ids == ref[:n], (kind, text)
        if res.finish_reason == "eos":
            assert ref[n] in eos, (kind, text)
        else:
            assert res.finish_reason == "length" and n == N_NEW
            full_length += 1
        assert res.prompt_tokens == len(ids)
        assert res.text == smollm2.tokenizer.decode(res.token_ids)
    assert full_length >= 2  # most comparisons run the whole 32 tokens
