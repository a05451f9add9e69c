"""MLP speculator heads ("Accelerating Production LLMs with Combined Token/Embedding
Speculators", IBM fms-extras `MLPSpeculator`).

Head i takes the previous state (the base model's final hidden state for
head 0, head i-1's state after that) and the previously sampled token:

    state = GELU(LN_i(proj_i(state) + (emb_weight / state_weight) * emb_i(token)))
    logits_i = head_i(state)

with state_weight = 0.5 ** (0.5 / n_predict) and
emb_weight = sqrt((1 - state_weight**2) * inner_dim / 2). LN is the
fms-extras/vLLM `MLPSpeculatorLayerNorm`: x * rsqrt(mean(x^2) + 1e-6) * w + b
(no centering). `scale_input` normalises the base state first (ln0, no
parameters) and divides it by sqrt(2). `tie_weights` shares emb, ln and head
over all heads and proj over heads 1.. (proj 0 maps emb_dim -> inner_dim and
stays separate).

Parameters are a `flax.struct` dataclass (a pytree); weights are stored [in, out]
(`x @ w`) like the base model. `export_hf` / `load_hf` read and write the
Hugging Face MLPSpeculator layout that vLLM's loader expects (config.json with
model_type "mlp_speculator"; weights emb.{i}.weight [V, D], proj.{i}.weight
[out, in], head.{i}.weight [V, D], ln.{i}.weight / ln.{i}.bias).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from spanjax.models.llama import greedy_tokens

LN_EPS = 1e-6
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class SpeculatorConfig:
    emb_dim: int  # the base model's hidden size
    vocab_size: int
    inner_dim: int = 0  # 0 = emb_dim
    n_predict: int = 3
    tie_weights: bool = False
    scale_input: bool = False
    top_k_tokens_per_head: tuple[int, ...] = ()  # () = (1,) * n_predict (drafts are top-1); recorded in config.json
    n_candidates: int = 1

    def __post_init__(self):
        if self.n_predict < 1:
            raise ValueError(f"n_predict must be >= 1, got {self.n_predict}")
        if self.tie_weights and self.n_predict < 2:
            raise ValueError("tie_weights needs n_predict >= 2 (there is nothing to tie)")
        if self.top_k_tokens_per_head and len(self.top_k_tokens_per_head) != self.n_predict:
            raise ValueError(f"top_k_tokens_per_head needs {self.n_predict} entries, got {self.top_k_tokens_per_head}")
        object.__setattr__(self, "top_k_tokens_per_head", tuple(self.top_k_tokens_per_head) or (1,) * self.n_predict)

    @property
    def dim(self) -> int:
        return self.inner_dim or self.emb_dim

    @property
    def state_weight(self) -> float:
        return 0.5 ** (0.5 / self.n_predict)

    @property
    def emb_weight(self) -> float:
        return math.sqrt((1 - self.state_weight**2) * (self.dim / 2))

    @property
    def num_stages(self) -> int:
        """Distinct emb / ln / head weight sets (1 when tied)."""
        return 1 if self.tie_weights else self.n_predict


@flax.struct.dataclass
class SpeculatorParams:
    # Stacked arrays (training, checkpoints, export) or tuples of per-stage arrays (`unstack`, inference).
    emb: jax.Array  # [E, V, D]; E = num_stages
    proj0: jax.Array  # [emb_dim, D]
    proj: jax.Array  # [P, D, D]; P = 1 if tied else n_predict - 1 (0 when n_predict == 1)
    ln_weight: jax.Array  # [E, D]
    ln_bias: jax.Array  # [E, D]
    head: jax.Array  # [E, D, V]


@dataclasses.dataclass
class Speculator:
    config: SpeculatorConfig
    params: SpeculatorParams


def unstack(params: SpeculatorParams) -> SpeculatorParams:
    """The same weights with each stacked field split into a tuple of per-stage arrays. Inference
    uses this form: XLA on CPU copies a slice `head[i]` of the stacked [E, D, V] array before the
    matmul (26 ms vs 2 ms for SmolLM2's vocabulary), a separate array it reads in place."""
    split = lambda x: tuple(x[i] for i in range(x.shape[0]))
    return SpeculatorParams(
        emb=split(params.emb),
        proj0=params.proj0,
        proj=split(params.proj),
        ln_weight=split(params.ln_weight),
        ln_bias=split(params.ln_bias),
        head=split(params.head),
    )


@flax.struct.dataclass
class DraftParams(SpeculatorParams):
    """Inference form (`draft_params`): per-stage arrays, and each head keeps only its distinct
    vocabulary columns; head_ids[e][c] is the full token id of column c (the lowest id among
    equal columns, which is the one a full-vocabulary argmax returns)."""

    head_ids: tuple = ()  # per stage [U_e] int32


def draft_params(params: SpeculatorParams) -> DraftParams:
    """`unstack`, then drop repeated head columns. A speculator trained over a reduced vocabulary
    (training/speculator.py `train_vocab`) is exported with every rare token sharing one column;
    proposing over the distinct columns (8,192 instead of 49,152 for the SmolLM2 preset) gives
    the same drafts for a sixth of the head's matmul, which on CPU is most of a proposal."""
    p = unstack(params)
    keeps = [np.sort(np.unique(np.asarray(h).T, axis=0, return_index=True)[1]).astype(np.int32) for h in p.head]
    return DraftParams(
        emb=p.emb,
        proj0=p.proj0,
        proj=p.proj,
        ln_weight=p.ln_weight,
        ln_bias=p.ln_bias,
        head=tuple(h[:, keep] for h, keep in zip(p.head, keeps)),
        head_ids=tuple(map(jnp.asarray, keeps)),
    )


def init_speculator(cfg: SpeculatorConfig, key, dtype=jnp.float32) -> SpeculatorParams:
    """fms-extras initialisation: emb, head ~ N(0, 1/sqrt(D)); proj ~ N(0, 1/sqrt(in)); ln = (1, 0)."""
    D, E, V, H = cfg.dim, cfg.num_stages, cfg.vocab_size, cfg.emb_dim
    P = 1 if cfg.tie_weights else cfg.n_predict - 1
    k = jax.random.split(key, 4)
    std = 1.0 / math.sqrt(D)
    return SpeculatorParams(
        emb=(std * jax.random.normal(k[0], (E, V, D))).astype(dtype),
        proj0=(jax.random.normal(k[1], (H, D)) / math.sqrt(H)).astype(dtype),
        proj=(jax.random.normal(k[2], (P, D, D)) / math.sqrt(D)).astype(dtype),
        ln_weight=jnp.ones((E, D), dtype),
        ln_bias=jnp.zeros((E, D), dtype),
        head=(std * jax.random.normal(k[3], (E, D, V))).astype(dtype),
    )


def _norm(x):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + LN_EPS)).astype(x.dtype)


def input_state(params: SpeculatorParams, cfg: SpeculatorConfig, hidden):
    """The base model's final hidden state, scaled when `scale_input` (ln0 / sqrt 2)."""
    return _norm(hidden) / math.sqrt(2.0) if cfg.scale_input else hidden


def stage(params: SpeculatorParams, cfg: SpeculatorConfig, i: int, state, tokens):
    """Head i's new state from the previous state [..., H or D] and the previous token ids [...]."""
    e = min(i, cfg.num_stages - 1)
    w = params.proj0 if i == 0 else params.proj[min(i - 1, len(params.proj) - 1)]
    s = state @ w + (cfg.emb_weight / cfg.state_weight) * params.emb[e][tokens]
    s = _norm(s) * params.ln_weight[e] + params.ln_bias[e]
    return jax.nn.gelu(s, approximate=False)


def head_logits(params: SpeculatorParams, cfg: SpeculatorConfig, i: int, state):
    return (state @ params.head[min(i, cfg.num_stages - 1)]).astype(jnp.float32)


def teacher_forced_logits(params: SpeculatorParams, cfg: SpeculatorConfig, hidden, tokens):
    """Training forward. hidden [..., L, H]: hidden[j] is the base state that chose tokens[j];
    tokens [..., L + n_predict]. Returns n_predict logits [..., L, V]: head i at j reads
    tokens[j + i] and predicts tokens[j + i + 1]."""
    L = hidden.shape[-2]
    state = input_state(params, cfg, hidden)
    out = []
    for i in range(cfg.n_predict):
        state = stage(params, cfg, i, state, tokens[..., i : i + L])
        out.append(head_logits(params, cfg, i, state))
    return out


def propose(params: SpeculatorParams, cfg: SpeculatorConfig, hidden, token, n: int | None = None, candidates: int = 1):
    """Draft tree: hidden [S, H] (the state that chose `token`), token [S] -> draft ids
    [S, candidates, n], n <= n_predict. Candidate c starts with head 0's c-th most likely token
    and continues greedily (top-1 per later head); candidate 0 is the greedy draft."""
    n = cfg.n_predict if n is None else n
    state = input_state(params, cfg, hidden)[:, None]  # [S, 1, D] -> [S, C, D] after head 0
    tok, out = token[:, None], []
    for i in range(n):
        state = stage(params, cfg, i, state, tok)
        logits = head_logits(params, cfg, i, state)
        if i == 0:
            tok = jax.lax.top_k(logits[:, 0], candidates)[1].astype(jnp.int32)  # [S, C]
            state = jnp.broadcast_to(state, (state.shape[0], candidates, state.shape[-1]))
        else:
            tok = greedy_tokens(logits)
        if isinstance(params, DraftParams):
            tok = params.head_ids[min(i, cfg.num_stages - 1)][tok]
        out.append(tok)
    return jnp.stack(out, axis=-1)


# ---------------------------------------------------------------------------- HF MLPSpeculator format


def hf_config(cfg: SpeculatorConfig, **extra) -> dict:
    return {
        "architectures": ["MLPSpeculatorPreTrainedModel"],
        "model_type": "mlp_speculator",
        "emb_dim": cfg.emb_dim,
        "inner_dim": cfg.inner_dim,
        "vocab_size": cfg.vocab_size,
        "n_predict": cfg.n_predict,
        "top_k_tokens_per_head": list(cfg.top_k_tokens_per_head),
        "n_candidates": cfg.n_candidates,
        "tie_weights": cfg.tie_weights,
        "scale_input": cfg.scale_input,
        "torch_dtype": "float32",
        **extra,
    }


def hf_state_dict(spec: Speculator) -> dict[str, np.ndarray]:
    """Torch-layout tensors. Tied weights are written under every index (as a torch
    state_dict of the tied module lists holds them); vLLM reads the first."""
    cfg, p = spec.config, jax.tree_util.tree_map(np.asarray, spec.params)
    out = {}
    for i in range(cfg.n_predict):
        e = min(i, cfg.num_stages - 1)
        out[f"emb.{i}.weight"] = p.emb[e]
        w = p.proj0 if i == 0 else p.proj[min(i - 1, p.proj.shape[0] - 1)]
        out[f"proj.{i}.weight"] = w.T
        out[f"head.{i}.weight"] = p.head[e].T
        out[f"ln.{i}.weight"] = p.ln_weight[e]
        out[f"ln.{i}.bias"] = p.ln_bias[e]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def export_hf(spec: Speculator, directory: str, **extra_config) -> None:
    """Write `config.json` + `model.safetensors` (what vLLM's MLPSpeculator loads)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(hf_config(spec.config, **extra_config), f, indent=2)
    save_file(hf_state_dict(spec), os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})


def config_from_hf(data: dict) -> SpeculatorConfig:
    if data.get("model_type") != "mlp_speculator":
        raise ValueError(f"not an MLPSpeculator config (model_type {data.get('model_type')!r})")
    return SpeculatorConfig(
        emb_dim=int(data["emb_dim"]),
        vocab_size=int(data["vocab_size"]),
        inner_dim=int(data.get("inner_dim", 0)),
        n_predict=int(data.get("n_predict", 3)),
        tie_weights=bool(data.get("tie_weights", False)),
        scale_input=bool(data.get("scale_input", False)),
        top_k_tokens_per_head=tuple(data.get("top_k_tokens_per_head") or ()),
        n_candidates=int(data.get("n_candidates", 1)),
    )


def load_hf(directory: str, dtype=jnp.float32) -> Speculator:
    """Read a Hugging Face MLPSpeculator directory (config.json + *.safetensors); a leading
    `speculator.` in weight names is dropped, as vLLM does."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        cfg = config_from_hf(json.load(f))
    files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors file")
    w = {}
    for name in files:
        w.update({k.removeprefix("speculator."): v for k, v in load_file(os.path.join(directory, name)).items()})

    def get(name, shape):
        if name not in w:
            raise ValueError(f"{directory}: missing weight {name!r}")
        if tuple(w[name].shape) != shape:
            raise ValueError(f"{directory}: {name} has shape {tuple(w[name].shape)}, expected {shape}")
        return np.asarray(w[name], np.float32)

    D, V, H, E = cfg.dim, cfg.vocab_size, cfg.emb_dim, cfg.num_stages
    P = 1 if cfg.tie_weights else cfg.n_predict - 1
    params = SpeculatorParams(
        emb=np.stack([get(f"emb.{e}.weight", (V, D)) for e in range(E)]),
        proj0=get("proj.0.weight", (D, H)).T,
        proj=np.stack([get(f"proj.{1 + q}.weight", (D, D)).T for q in range(P)])
        if P
        else np.zeros((0, D, D), np.float32),
        ln_weight=np.stack([get(f"ln.{e}.weight", (D,)) for e in range(E)]),
        ln_bias=np.stack([get(f"ln.{e}.bias", (D,)) for e in range(E)]),
        head=np.stack([get(f"head.{e}.weight", (V, D)).T for e in range(E)]),
    )
    return Speculator(cfg, jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params))
