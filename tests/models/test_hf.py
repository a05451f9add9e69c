"""Hugging Face directory loading: logit parity with transformers and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_model
from safetensors.numpy import load_file, save_file

from spanjax.kernels.span_attention import SpanBatchMeta
from spanjax.models.errors import WeightLoadError
from spanjax.models.hf import load_hf_config, load_hf_directory
from spanjax.models.llama import (
    compute_logits,
    forward_dense,
    forward_paged,
    init_dense_cache,
    init_paged_cache,
)

PROMPT_LENS = (5, 13, 9)
PARITY_TOL = 1e-4


def _prompts(vocab, lens=PROMPT_LENS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lens]


def _hf_logits(model, prompts):
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float().numpy() for p in prompts]


def _dense_logits(cfg, params, prompts):
    """Right-padded batch through forward_dense; returns per-prompt [len, V] logits."""
    T = max(map(len, prompts))
    tokens = np.zeros((len(prompts), T), np.int32)
    positions = np.tile(np.arange(T, dtype=np.int32), (len(prompts), 1))
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    cache = init_dense_cache(cfg, len(prompts), 32)
    hidden, _ = forward_dense(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), cache)
    logits = np.asarray(compute_logits(params, cfg, hidden))
    return [logits[i, : len(p)] for i, p in enumerate(prompts)]


def _paged_logits(cfg, params, prompts, page_size=4):
    """Flat ragged batch through forward_paged; each sequence owns consecutive pages."""
    pages_per_seq = [-(-len(p) // page_size) for p in prompts]
    M = max(pages_per_seq)
    S = len(prompts)
    tables = np.zeros((S, M), np.int32)
    block_pos = np.zeros((S, M), np.int32)
    block_lens = np.zeros((S, M), np.int32)
    slots, tokens, positions = [], [], []
    next_page = 0
    for s, p in enumerate(prompts):
        for j in range(pages_per_seq[s]):
            tables[s, j] = next_page + j
            block_pos[s, j] = j * page_size
            block_lens[s, j] = min(page_size, len(p) - j * page_size)
        slots += [(next_page + t // page_size) * page_size + t % page_size for t in range(len(p))]
        tokens += p
        positions += list(range(len(p)))
        next_page += pages_per_seq[s]
    pad = 3  # trailing padding tokens must be ignored
    tokens += [0] * pad
    positions += [0] * pad
    slots += [-1] * pad
    cu = np.concatenate([[0], np.cumsum([len(p) for p in prompts])]).astype(np.int32)
    meta = SpanBatchMeta(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        block_tables=jnp.asarray(tables),
        block_pos=jnp.asarray(block_pos),
        block_lens=jnp.asarray(block_lens),
        cu_q_lens=jnp.asarray(cu),
    )
    cache = init_paged_cache(cfg, next_page + 1, page_size)
    hidden, _ = forward_paged(
        params, cfg, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), cache, meta
    )
    logits = np.asarray(compute_logits(params, cfg, hidden))
    return [logits[cu[i] : cu[i + 1]] for i in range(S)]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["llama3", "llama_tied", "llama_sharded", "mistral_head_dim", "granite"])
def test_dense_logits_match_transformers(tiny_hf_model, name):
    path, hf = tiny_hf_model(name)
    cfg, params = load_hf_directory(path)
    prompts = _prompts(cfg.vocab_size)
    ref = _hf_logits(hf, prompts)
    assert np.std(ref[1]) > 0.5  # logits are informative, not near-flat
    assert _max_diff(_dense_logits(cfg, params, prompts), ref) < PARITY_TOL


@pytest.mark.parametrize("name", ["llama3", "granite"])
def test_paged_logits_match_transformers(tiny_hf_model, name):
    path, hf = tiny_hf_model(name)
    cfg, params = load_hf_directory(path)
    prompts = _prompts(cfg.vocab_size, seed=1)
    assert _max_diff(_paged_logits(cfg, params, prompts), _hf_logits(hf, prompts)) < PARITY_TOL


def test_config_fields(tiny_hf_model):
    cfg = load_hf_config(tiny_hf_model("llama3")[0])
    assert cfg.architecture == "llama" and cfg.num_kv_heads == 2 and cfg.head_dim == 16
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0 and cfg.rope_theta == 500000.0
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,) and not cfg.tie_word_embeddings

    tied = load_hf_config(tiny_hf_model("llama_tied")[0])
    assert tied.tie_word_embeddings and tied.eos_token_ids == (2, 3) and tied.rope_scaling is None

    assert load_hf_config(tiny_hf_model("mistral_head_dim")[0]).head_dim == 24

    g = load_hf_config(tiny_hf_model("granite")[0])
    assert (
        g.architecture,
        g.embedding_multiplier,
        g.attention_multiplier,
        g.residual_multiplier,
        g.logits_scaling,
    ) == (
        "granite",
        12.0,
        0.03,
        0.22,
        8.0,
    )
    _, params = load_hf_directory(tiny_hf_model("granite")[0])
    assert params.lm_head is None and params.layers.wq.shape == (2, 64, 64)


def test_sharded_checkpoint_has_index(tiny_hf_model):
    path, _ = tiny_hf_model("llama_sharded")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1


def test_bf16_weights_load(tmp_path):
    hf = build_hf_model(tmp_path, "llama3", dtype=torch.bfloat16)
    _, params = load_hf_directory(str(tmp_path))
    want = hf.model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(np.asarray(params.layers.wq[1]), want)
    _, params16 = load_hf_directory(str(tmp_path), dtype=jnp.bfloat16)
    assert params16.embed.dtype == jnp.bfloat16


def test_generation_config_eos_ids_are_merged(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7]}, f)
    assert load_hf_config(path).eos_token_ids == (2, 7)


# ----------------------------------------------------------------------------
# Bad input: every case raises WeightLoadError naming the file and field.


def _copy(src, tmp_path):
    dst = os.path.join(tmp_path, "model")
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    raw = json.load(open(cfg_path))
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    json.dump(raw, open(cfg_path, "w"))


def test_missing_config(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(WeightLoadError, match=r"config\.json not found"):
        load_hf_directory(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(WeightLoadError, match="not a model directory"):
        load_hf_directory(str(tmp_path / "nope"))


def test_missing_weights_file(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"weights file not found.*model\.safetensors"):
        load_hf_directory(path)


def test_missing_shard(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama_sharded")[0], tmp_path)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(WeightLoadError, match=rf"weights file not found: .*{shard}.*index\.json"):
        load_hf_directory(path)


def test_missing_tensor(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(
        WeightLoadError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        load_hf_directory(path)


def test_untied_config_without_lm_head(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama_tied")[0], tmp_path)
    _edit_config(path, tie_word_embeddings=False)
    with pytest.raises(WeightLoadError, match="missing tensor 'lm_head.weight'"):
        load_hf_directory(path)


def test_unsupported_architecture(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        WeightLoadError, match=r"config\.json: unsupported field 'architectures' value 'GPT2LMHeadModel'"
    ):
        load_hf_directory(path)


def test_unsupported_model_type_without_architectures(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    _edit_config(path, architectures=None, model_type="gemma")
    with pytest.raises(WeightLoadError, match=r"config\.json: unsupported field 'model_type' value 'gemma'"):
        load_hf_config(path)


def test_unknown_rope_type(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    _edit_config(path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(WeightLoadError, match=r"config\.json: unsupported rope_parameters\.rope_type 'yarn'"):
        load_hf_config(path)


def test_legacy_rope_scaling_field(tiny_hf_model, tmp_path):
    """transformers 4.x configs: rope_theta at top level and rope_scaling with 'type'."""
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    legacy = dict(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    _edit_config(path, rope_parameters=None, rope_theta=500000.0, rope_scaling=legacy)
    cfg = load_hf_config(path)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.original_max_position_embeddings == 64
    _edit_config(path, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(WeightLoadError, match=r"rope_scaling\.rope_type 'dynamic'"):
        load_hf_config(path)


def test_unsupported_features(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    _edit_config(path, attention_bias=True)
    with pytest.raises(WeightLoadError, match="'attention_bias'"):
        load_hf_config(path)
    _edit_config(path, attention_bias=False, hidden_act="gelu")
    with pytest.raises(WeightLoadError, match="'hidden_act' value 'gelu'"):
        load_hf_config(path)


def test_missing_required_field(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    _edit_config(path, hidden_size=None)
    with pytest.raises(WeightLoadError, match=r"config\.json: missing required field 'hidden_size'"):
        load_hf_config(path)


def test_bad_eos_field(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    _edit_config(path, eos_token_id="</s>")
    with pytest.raises(WeightLoadError, match="'eos_token_id'"):
        load_hf_config(path)


def test_corrupt_config_json(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    open(os.path.join(path, "config.json"), "w").write("{not json")
    with pytest.raises(WeightLoadError, match=r"config\.json: not valid JSON"):
        load_hf_config(path)


@pytest.mark.parametrize("garbage", [b"\xff" * 16, b"\x10\x00\x00\x00\x00\x00\x00\x00{bad header json}"])
def test_corrupt_safetensors_header(tiny_hf_model, tmp_path, garbage):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    file = os.path.join(path, "model.safetensors")
    open(file, "wb").write(garbage)
    with pytest.raises(WeightLoadError, match=r"model\.safetensors: corrupt safetensors header"):
        load_hf_directory(path)


def test_shape_mismatch(tiny_hf_model, tmp_path):
    path = _copy(tiny_hf_model("llama3")[0], tmp_path)
    _edit_config(path, intermediate_size=96)
    with pytest.raises(WeightLoadError, match=r"model\.safetensors: tensor 'model\.layers\.0\..*' has shape .*implies"):
        load_hf_directory(path)


def test_bf16_logits_match_transformers_bf16(tmp_path):
    """bf16 weights (fp32 accumulation, bf16 activations, as transformers' bf16 computes) against
    transformers run in bf16 on the same weights: the dense path, and the engine's paged path with
    unstacked layers (the unrolled loop the engine uses for bf16)."""
    from spanjax.models.llama import unstack_layers

    hf = build_hf_model(tmp_path, "llama3", dtype=torch.bfloat16)
    cfg, params = load_hf_directory(str(tmp_path), dtype=jnp.bfloat16)
    prompts = _prompts(cfg.vocab_size, seed=2)
    ref = _hf_logits(hf.to(torch.bfloat16), prompts)
    scale = max(float(np.std(r)) for r in ref)
    for ours in (_dense_logits(cfg, params, prompts), _paged_logits(cfg, unstack_layers(params), prompts)):
        # bf16 keeps 8 bits of mantissa: a few roundings of O(1) activations, relative to the logits' spread
        assert _max_diff(ours, ref) < 0.05 * scale
