"""LoRA and activated LoRA (aLoRA) as a parameter pytree separate from the base model.

An adapted projection computes

    y = x W + [token is adapted] * (x A B) * scale,      scale = alpha / r

per token. For LoRA every token is adapted; for aLoRA only tokens from the
start of the LAST occurrence of the invocation token sequence onward (the
invocation included), so every earlier token's hidden states, and hence its
KV, are exactly the base model's and can be shared with base-model cache
entries (PEFT's semantics: `peft.tuners.lora.variants.calculate_alora_offsets`).

Layouts follow spanjax.models.llama: weights are [in, out], layers stacked on a
leading [L] axis so the adapter rides through the decoder's layer scan.

- `Adapter` = `AdapterConfig` (static) + `AdapterWeights` (one adapter: per
  target module `LoraModule(a [L, in, r], b [L, r, out])`, None elsewhere).
- `AdapterBank` = N adapters stacked on an axis after L (a [L, N, in, r]), a
  per-adapter scale [N], and optional training dropout. The model takes a bank
  plus a per-token adapter index (-1 = base weights), so one forward serves a
  batch mixing base tokens and several adapters. Ranks differ? The bank pads
  with zero rows/columns, which adds exact zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# PEFT module name -> spanjax.models.llama.LayerParams field.
MODULES = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w_gate",
    "up_proj": "w_up",
    "down_proj": "w_down",
}
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_SHORT = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


def canonical_module(name: str) -> str:
    """'q' / 'q_proj' / 'wq' -> 'q_proj' (PEFT's names are the canonical ones)."""
    inv = {v: k for k, v in MODULES.items()}
    out = _SHORT.get(name) or (name if name in MODULES else inv.get(name))
    if out is None:
        raise ValueError(
            f"unknown LoRA target module {name!r}; expected one of {sorted(MODULES)} (or q/k/v/o/gate/up/down)"
        )
    return out


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    kind: Literal["lora", "alora"] = "alora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, training only (as PEFT's lora_dropout)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    invocation_tokens: tuple[int, ...] | None = None  # aLoRA only

    def __post_init__(self):
        if self.kind not in ("lora", "alora"):
            raise ValueError(f"adapter kind must be 'lora' or 'alora', got {self.kind!r}")
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        # Canonical names in layer order, so configs compare equal however they were spelled.
        wanted = {canonical_module(m) for m in self.target_modules}
        object.__setattr__(self, "target_modules", tuple(m for m in MODULES if m in wanted))
        if self.kind == "alora":
            if not self.invocation_tokens:
                raise ValueError("an aLoRA adapter needs invocation_tokens (the tokenized invocation sequence)")
            object.__setattr__(self, "invocation_tokens", tuple(int(t) for t in self.invocation_tokens))
        elif self.invocation_tokens is not None:
            raise ValueError("invocation_tokens is for kind='alora' only")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.r)


@flax.struct.dataclass
class LoraModule:
    a: jax.Array  # [L, in, r]  (bank: [L, N, in, r])
    b: jax.Array  # [L, r, out] (bank: [L, N, r, out])


@flax.struct.dataclass
class AdapterWeights:
    """Per target module a LoraModule; None for modules the adapter leaves alone."""

    q_proj: LoraModule | None = None
    k_proj: LoraModule | None = None
    v_proj: LoraModule | None = None
    o_proj: LoraModule | None = None
    gate_proj: LoraModule | None = None
    up_proj: LoraModule | None = None
    down_proj: LoraModule | None = None

    def modules(self) -> dict[str, LoraModule]:
        return {m: getattr(self, m) for m in MODULES if getattr(self, m) is not None}


@dataclasses.dataclass(frozen=True)
class Adapter:
    config: AdapterConfig
    weights: AdapterWeights


def module_dims(model_cfg, module: str) -> tuple[int, int]:
    H, I = model_cfg.hidden_size, model_cfg.intermediate_size
    qd, kvd = model_cfg.num_heads * model_cfg.head_dim, model_cfg.num_kv_heads * model_cfg.head_dim
    return {
        "q_proj": (H, qd),
        "k_proj": (H, kvd),
        "v_proj": (H, kvd),
        "o_proj": (qd, H),
        "gate_proj": (H, I),
        "up_proj": (H, I),
        "down_proj": (I, H),
    }[module]


def init_adapter(config: AdapterConfig, model_cfg, key, dtype=jnp.float32, b_scale: float = 0.0) -> Adapter:
    """PEFT's default init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0,
    so a fresh adapter is the identity. `b_scale` > 0 draws B ~ N(0, b_scale) instead (tests)."""
    L = model_cfg.num_layers
    mods = {}
    for i, m in enumerate(config.target_modules):
        d_in, d_out = module_dims(model_cfg, m)
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(ka, (L, d_in, config.r), dtype, -bound, bound)
        b = (
            b_scale * jax.random.normal(kb, (L, config.r, d_out), dtype)
            if b_scale
            else jnp.zeros((L, config.r, d_out), dtype)
        )
        mods[m] = LoraModule(a=a, b=b)
    return Adapter(config, AdapterWeights(**mods))


# ---------------------------------------------------------------------------- invocation masks


def invocation_start(tokens: Sequence[int], invocation: Sequence[int]) -> int | None:
    """Index where the LAST occurrence of `invocation` starts in `tokens`, or None."""
    toks = np.asarray(tokens)
    inv = np.asarray(invocation)
    n = len(inv)
    if n == 0 or len(toks) < n:
        return None
    cand = np.nonzero(toks[: len(toks) - n + 1] == inv[0])[0]
    for i in cand[::-1]:
        if np.array_equal(toks[i : i + n], inv):
            return int(i)
    return None


def adapter_mask(config: AdapterConfig, tokens: Sequence[int]) -> np.ndarray:
    """[T] bool: which tokens the adapter applies to. LoRA: all. aLoRA: from the last
    invocation on; none when the invocation is absent (as PEFT: the base model)."""
    T = len(tokens)
    if config.kind == "lora":
        return np.ones(T, bool)
    start = invocation_start(tokens, config.invocation_tokens)
    mask = np.zeros(T, bool)
    if start is not None:
        mask[start:] = True
    return mask


# ---------------------------------------------------------------------------- the bank the model applies


@flax.struct.dataclass
class AdapterBank:
    """N adapters stacked for one forward (see module docstring)."""

    layers: AdapterWeights  # LoraModule leaves [L, N, in, r] / [L, N, r, out]
    scale: jax.Array  # [N]
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)  # static: part of the jit cache key
    rng: jax.Array | None = None  # dropout key (training); None = no dropout

    def token_ids(self, mask, shape) -> jax.Array:
        """Per-token adapter index (-1 = base). A bool mask selects adapter 0."""
        if mask is None:
            return jnp.zeros(shape, jnp.int32)
        mask = jnp.asarray(mask)
        if mask.dtype == jnp.bool_:
            return jnp.where(mask, 0, -1).astype(jnp.int32)
        return mask.astype(jnp.int32)

    def apply(self, module: str, layer: AdapterWeights, layer_index, h, y, ids):
        """y = h W (already computed) plus the adapter delta on adapted tokens.

        Tokens with index -1 get `y` itself (jnp.where, not + 0), so base tokens
        are bitwise the base model's."""
        mod = getattr(layer, module)
        if mod is None:
            return y
        x = h
        if self.rng is not None and self.dropout > 0.0:
            key = jax.random.fold_in(jax.random.fold_in(self.rng, layer_index), list(MODULES).index(module))
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
        N = mod.a.shape[0]
        w = jnp.where(ids[..., None] == jnp.arange(N), self.scale.astype(jnp.float32), 0.0)  # [..., T, N]
        u = jnp.einsum("...i,nir->...nr", x.astype(mod.a.dtype), mod.a) * w[..., None].astype(mod.a.dtype)
        delta = jnp.einsum("...nr,nro->...o", u, mod.b)
        return jnp.where((ids >= 0)[..., None], y + delta.astype(y.dtype), y)


def bank_from_weights(weights: AdapterWeights, scale: float, dropout: float = 0.0, rng=None) -> AdapterBank:
    """A one-adapter bank over (possibly traced) weights: the training path."""
    layers = jax.tree_util.tree_map(lambda x: x[:, None], weights)
    return AdapterBank(layers=layers, scale=jnp.asarray([scale], jnp.float32), dropout=dropout, rng=rng)


def make_bank(adapters: Sequence[Adapter], model_cfg, dtype=jnp.float32) -> AdapterBank:
    """Stack several adapters (inference): missing modules and smaller ranks are zero-padded."""
    if not adapters:
        raise ValueError("make_bank needs at least one adapter")
    L = model_cfg.num_layers
    r_max = max(a.config.r for a in adapters)
    used = [m for m in MODULES if any(m in a.config.target_modules for a in adapters)]
    mods = {}
    for m in used:
        d_in, d_out = module_dims(model_cfg, m)
        A = np.zeros((L, len(adapters), d_in, r_max), np.float32)
        B = np.zeros((L, len(adapters), r_max, d_out), np.float32)
        for n, ad in enumerate(adapters):
            mod = getattr(ad.weights, m)
            if mod is not None:
                r = ad.config.r
                A[:, n, :, :r] = np.asarray(mod.a, np.float32)
                B[:, n, :r, :] = np.asarray(mod.b, np.float32)
        mods[m] = LoraModule(a=jnp.asarray(A, dtype), b=jnp.asarray(B, dtype))
    scale = jnp.asarray([a.config.scale for a in adapters], jnp.float32)
    return AdapterBank(layers=AdapterWeights(**mods), scale=scale)
