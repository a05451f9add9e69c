"""LoRA / aLoRA: exact base parity before the invocation, cache-reuse equivalence,
multi-adapter banks, and the PEFT format against transformers + peft."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.adapters import (
    AdapterConfig,
    adapter_mask,
    bank_from_weights,
    export_peft,
    init_adapter,
    invocation_start,
    load_peft,
    make_bank,
)
from spanjax.adapters.peft_format import AdapterFormatError
from spanjax.models import llama
from spanjax.models.config import ModelConfig
from spanjax.models.hf import load_hf_directory

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)
INV = (7, 8, 9)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _params():
    return llama.init_params(CFG, jax.random.PRNGKey(0), scale=0.2)


def _logits(params, tokens, adapter=None, mask=None, cache=None, start=0):
    tokens = jnp.asarray(tokens)[None]
    T = tokens.shape[1]
    positions = jnp.arange(start, start + T)[None]
    cache = llama.init_dense_cache(CFG, 1, 64) if cache is None else cache
    m = None if mask is None else jnp.asarray(mask)[None]
    h, cache = llama.forward_dense(params, CFG, tokens, positions, cache, adapter, m)
    return np.asarray(llama.compute_logits(params, CFG, h)[0]), cache


def test_invocation_start_is_the_last_occurrence():
    assert invocation_start([1, 7, 8, 9, 3, 7, 8, 9, 4], INV) == 5
    assert invocation_start([1, 7, 8, 3], INV) is None
    assert invocation_start([7, 8, 9], INV) == 0
    cfg = AdapterConfig(kind="alora", invocation_tokens=INV)
    assert adapter_mask(cfg, [1, 7, 8, 9, 4]).tolist() == [False, True, True, True, True]
    assert adapter_mask(AdapterConfig(kind="lora"), [1, 2]).tolist() == [True, True]


def test_config_errors():
    with pytest.raises(ValueError, match="invocation_tokens"):
        AdapterConfig(kind="alora")
    with pytest.raises(ValueError, match="unknown LoRA target module"):
        AdapterConfig(kind="lora", target_modules=("qq",))
    assert AdapterConfig(kind="lora", target_modules=("q", "wv", "down_proj")).target_modules == (
        "q_proj",
        "v_proj",
        "down_proj",
    )


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj"), ALL])
def test_alora_equals_base_before_invocation_and_lora_over_base_cache_after(targets):
    params = _params()
    cfg = AdapterConfig(kind="alora", r=4, alpha=8, target_modules=targets, invocation_tokens=INV)
    ad = init_adapter(cfg, CFG, jax.random.PRNGKey(1), b_scale=0.3)
    bank = make_bank([ad], CFG)
    tokens = [1, 5, 7, 8, 9, 11, 12, 13, 14, 7, 8, 9, 20, 21, 22]
    mask = adapter_mask(cfg, tokens)
    s = invocation_start(tokens, INV)
    base, _ = _logits(params, tokens)
    alora, _ = _logits(params, tokens, bank, mask)
    # Exactly the base model before the invocation (so the KV cache is shareable) ...
    np.testing.assert_array_equal(alora[:s], base[:s])
    assert np.abs(alora[s:] - base[s:]).max() > 1e-3  # ... and adapted from it on.
    # From the invocation on: a LoRA forward over the base model's cached prefix.
    _, cache = _logits(params, tokens[:s])
    lora_suffix, _ = _logits(params, tokens[s:], bank, None, cache=cache, start=s)
    np.testing.assert_allclose(alora[s:], lora_suffix, atol=1e-5, rtol=1e-5)
    # A plain LoRA (mask everywhere) differs before the invocation.
    lora, _ = _logits(params, tokens, bank, np.ones(len(tokens), bool))
    assert np.abs(lora[:s] - base[:s]).max() > 1e-3


def test_bank_mixes_adapters_per_token():
    params = _params()
    a1 = init_adapter(AdapterConfig(kind="lora", r=2, alpha=4), CFG, jax.random.PRNGKey(1), b_scale=0.3)
    a2 = init_adapter(
        AdapterConfig(kind="lora", r=6, alpha=3, target_modules=("v_proj", "up_proj")),
        CFG,
        jax.random.PRNGKey(2),
        b_scale=0.3,
    )
    bank = make_bank([a1, a2], CFG)
    tokens = [1, 2, 3, 4, 5, 6]
    for idx, ad in ((0, a1), (1, a2)):
        ids = np.where(np.arange(6) >= 2, idx, -1)
        got, _ = _logits(params, tokens, bank, ids.astype(np.int32))
        want, _ = _logits(params, tokens, make_bank([ad], CFG), ids >= 0)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_dropout_only_with_rng():
    params = _params()
    ad = init_adapter(AdapterConfig(kind="lora", r=4, dropout=0.5), CFG, jax.random.PRNGKey(1), b_scale=0.3)
    tokens = [1, 2, 3, 4]
    plain, _ = _logits(params, tokens, bank_from_weights(ad.weights, ad.config.scale, 0.5, None))
    ref, _ = _logits(params, tokens, make_bank([ad], CFG))
    np.testing.assert_allclose(plain, ref, atol=1e-6)
    dropped, _ = _logits(params, tokens, bank_from_weights(ad.weights, ad.config.scale, 0.5, jax.random.PRNGKey(3)))
    assert np.abs(dropped - ref).max() > 1e-4


def test_export_import_round_trip(tmp_path):
    cfg = AdapterConfig(kind="alora", r=3, alpha=5, target_modules=("q_proj", "down_proj"), invocation_tokens=INV)
    ad = init_adapter(cfg, CFG, jax.random.PRNGKey(4), b_scale=0.1)
    export_peft(ad, str(tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 3 and raw["alora_invocation_tokens"] == list(INV)
    back = load_peft(str(tmp_path), CFG)
    assert back.config == cfg
    for m, mod in ad.weights.modules().items():
        np.testing.assert_array_equal(np.asarray(getattr(back.weights, m).a), np.asarray(mod.a))
        np.testing.assert_array_equal(np.asarray(getattr(back.weights, m).b), np.asarray(mod.b))
    with pytest.raises(AdapterFormatError, match="expected"):
        load_peft(str(tmp_path), ModelConfig(**{**CFG.__dict__, "hidden_size": 16, "head_dim": 4}))
    with pytest.raises(FileNotFoundError):
        load_peft(str(tmp_path / "nope"), CFG)


@pytest.mark.parametrize("kind,targets", [("alora", ("q_proj", "k_proj", "v_proj")), ("lora", ALL), ("alora", ALL)])
def test_exported_adapter_matches_transformers_peft(tmp_path, tiny_hf_model, kind, targets):
    """Export from spanjax, load with PeftModel.from_pretrained: same logits (fp32, < 1e-4)."""
    import torch  # optional test dependencies (slow imports), loaded only by the parity tests
    from peft import PeftModel

    path, torch_model = tiny_hf_model("llama3")
    mcfg, params = load_hf_directory(path)
    inv = (40, 41, 42)
    cfg = AdapterConfig(
        kind=kind, r=4, alpha=8, target_modules=targets, invocation_tokens=inv if kind == "alora" else None
    )
    ad = init_adapter(cfg, mcfg, jax.random.PRNGKey(5), b_scale=0.5)
    out = tmp_path / "adapter"
    export_peft(ad, str(out))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(torch_model), str(out)).eval()
    tokens = [1, 5, 9, 40, 41, 42, 17, 3, 40, 41, 42, 60, 61, 62, 63]
    with torch.no_grad():
        want = peft_model(torch.tensor([tokens])).logits[0].float().numpy()
    T = len(tokens)
    mask = adapter_mask(cfg, tokens)
    h, _ = llama.forward_dense(
        params,
        mcfg,
        jnp.asarray([tokens]),
        jnp.arange(T)[None],
        llama.init_dense_cache(mcfg, 1, T),
        make_bank([ad], mcfg),
        jnp.asarray(mask)[None],
    )
    got = np.asarray(llama.compute_logits(params, mcfg, h)[0])
    assert np.abs(got - want).max() < 1e-4
    with torch.no_grad():
        base = torch_model(torch.tensor([tokens])).logits[0].float().numpy()
    assert np.abs(want - base).max() > 1e-2  # the adapter did something
    # And back: what PEFT saves loads here unchanged.
    peft_model.save_pretrained(str(tmp_path / "resaved"))
    back = load_peft(str(tmp_path / "resaved"), mcfg)
    assert back.config.invocation_tokens == cfg.invocation_tokens and back.config.target_modules == cfg.target_modules
    for m, mod in ad.weights.modules().items():
        np.testing.assert_allclose(np.asarray(getattr(back.weights, m).b), np.asarray(mod.b), atol=0)
