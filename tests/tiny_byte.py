"""A tiny random Llama over the byte tokenizer (end of turn = eos): the model the engine,
adapter, training and evaluation tests run on. `tiny_config(**overrides)` varies it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spanjax.kernels.quantized_matmul import BlockQuantized
from spanjax.models import llama
from spanjax.models.config import ModelConfig
from spanjax.models.loading import LoadedModel
from spanjax.query.fake import SPECIAL, ByteTokenizer

CFG = ModelConfig(
    vocab_size=260,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=4096,
    rope_theta=500.0,
)


def tiny_config(**overrides) -> ModelConfig:
    return dataclasses.replace(CFG, **overrides)


class Tokenizer(ByteTokenizer):
    eos_token_ids = (SPECIAL["end"],)


def tiny_model(seed: int = 11, cfg: ModelConfig = CFG) -> LoadedModel:
    return LoadedModel("tiny", cfg, llama.init_params(cfg, jax.random.key(seed), scale=0.2), Tokenizer())


def quantized_layers(model: LoadedModel) -> LoadedModel:
    """`model` with every layer matrix as GGUF Q8_0 blocks (per block of 32 inputs, scale
    amax / 127): a quantized model as small as the tiny one, for the engine's block paths."""

    def q8(w):  # [L, in, out] -> blocks [L, out, in / 32, 32]
        blocks = jnp.swapaxes(w, -1, -2).reshape(*w.shape[:-2], w.shape[-1], -1, 32)
        d = (jnp.maximum(jnp.abs(blocks).max(-1), 1e-6) / 127).astype(jnp.float16)
        q = jnp.round(blocks / d.astype(jnp.float32)[..., None]).astype(jnp.int8)
        return BlockQuantized(q, d, None, "q8")

    layers = model.params.layers
    layers = layers.replace(**{f: q8(getattr(layers, f)) for f in llama.LAYER_MATRICES})
    return dataclasses.replace(model, params=model.params.replace(layers=layers))
