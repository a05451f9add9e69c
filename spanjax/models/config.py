"""Static model configuration (hashable, so it can be a jit static argument)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Granite 3.x multipliers; the Llama defaults make them no-ops.
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None  # None -> 1 / sqrt(head_dim)
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by this
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def sm_scale(self) -> float:
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        return 1.0 / math.sqrt(self.head_dim)

    def rope_inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2], with Llama-3 scaling applied."""
        # float32 throughout, as Hugging Face computes it, so positions far out agree.
        exponents = np.arange(0, self.head_dim, 2).astype(np.float32) / np.float32(self.head_dim)
        inv = (np.float32(1.0) / (np.float32(self.rope_theta) ** exponents)).astype(np.float32)
        sc = self.rope_scaling
        if sc is not None:
            low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
            high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
            wavelen = 2 * math.pi / inv
            smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
                sc.high_freq_factor - sc.low_freq_factor
            )
            scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
            mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
            scaled = np.where(mid, (1 - smooth) * inv / sc.factor + smooth * inv, scaled)
            inv = scaled.astype(np.float32)
        return inv
