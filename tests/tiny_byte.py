"""A tiny random Llama over the byte tokenizer (end of turn = eos): the model the engine,
adapter, training and evaluation tests run on. `tiny_config(**overrides)` varies it."""

from __future__ import annotations

import dataclasses

import jax

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
