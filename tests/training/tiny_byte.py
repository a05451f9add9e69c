"""A tiny random Llama over the byte tokenizer (end of turn = eos), shared by the
block-adapter tests (tests/training/test_block_*.py, tests/eval/test_locality_adapters.py)."""

from __future__ import annotations

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


class Tokenizer(ByteTokenizer):
    eos_token_ids = (SPECIAL["end"],)


def tiny_model(seed: int = 11) -> LoadedModel:
    return LoadedModel("tiny", CFG, llama.init_params(CFG, jax.random.key(seed), scale=0.2), Tokenizer())
