"""Load a Hugging Face model directory (config.json + safetensors) into spanjax.

Supported: LlamaForCausalLM, MistralForCausalLM and GraniteForCausalLM with
SiLU MLPs, no projection biases, default or Llama-3 RoPE. Weights come from a
single `model.safetensors` or from shards listed in
`model.safetensors.index.json`. Torch linears are stored [out, in]; spanjax
keeps [in, out] (projections are `x @ w`), so every projection is transposed,
and the per-layer tensors are stacked on a leading [L] axis.

Every failure raises `WeightLoadError` naming the file and field or tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from spanjax.models.config import ModelConfig, RopeScaling
from spanjax.models.errors import WeightLoadError
from spanjax.models.llama import LayerParams, Params

# architectures[0] in config.json -> spanjax architecture name
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "GraniteForCausalLM": "granite",
}
# model_type, used when "architectures" is absent (a bare saved config)
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "granite": "granite"}

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# LayerParams field -> (HF tensor name suffix inside model.layers.{i}., is a linear)
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


# ----------------------------------------------------------------------------
# config.json


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WeightLoadError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise WeightLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_ids(value, field: str, source: str) -> tuple[int, ...]:
    """eos_token_id may be an int, a list of ints, or null."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise WeightLoadError(f"{source}: field {field!r} must be an int or a list of ints, got {value!r}")


def _rope(raw: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    field = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    params = raw.get(field) or {}
    if not isinstance(params, dict):
        raise WeightLoadError(f"{source}: field {field!r} must be an object, got {params!r}")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise WeightLoadError(f"{source}: unsupported {field}.rope_type {rope_type!r} (supported: 'default', 'llama3')")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise WeightLoadError(f"{source}: llama3 {field} lacks field {e.args[0]!r}") from None
    return theta, scaling


def config_from_hf(raw: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """Translate a Hugging Face config dict into a ModelConfig; `source` names the file in errors."""
    archs = raw.get("architectures")
    if archs:
        arch_name = archs[0]
        if arch_name not in ARCHITECTURES:
            raise WeightLoadError(
                f"{source}: unsupported field 'architectures' value {arch_name!r} "
                f"(supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        arch = ARCHITECTURES[arch_name]
    else:
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise WeightLoadError(
                f"{source}: unsupported field 'model_type' value {model_type!r} "
                f"(supported: {', '.join(sorted(MODEL_TYPES))})"
            )
        arch = MODEL_TYPES[model_type]

    def need(field):
        if raw.get(field) is None:
            raise WeightLoadError(f"{source}: missing required field {field!r}")
        return raw[field]

    # Features the decoder does not implement are refused rather than silently ignored.
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise WeightLoadError(f"{source}: unsupported field 'hidden_act' value {act!r} (supported: 'silu')")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field):
            raise WeightLoadError(
                f"{source}: unsupported field {field!r} value {raw[field]!r} (biases are not supported)"
            )

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise WeightLoadError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    head_dim = raw.get("head_dim") or hidden // heads
    theta, scaling = _rope(raw, source)

    max_pos = int(raw.get("max_position_embeddings", 2048))
    window = raw.get("sliding_window")
    if arch == "mistral" and window is not None and int(window) < max_pos:
        # No sliding-window attention here; within the window it is plain causal
        # attention, so capping the context keeps results exact.
        max_pos = int(window)

    kwargs = {}
    if arch == "granite":
        kwargs = dict(
            embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
            attention_multiplier=float(raw.get("attention_multiplier", 1.0 / np.sqrt(head_dim))),
            residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
            logits_scaling=float(raw.get("logits_scaling", 1.0)),
        )
    bos = raw.get("bos_token_id")
    if isinstance(bos, list):  # rare, but seen in the wild
        bos = bos[0] if bos else None
    return ModelConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        architecture=arch,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=_token_ids(raw.get("eos_token_id"), "eos_token_id", source),
        **kwargs,
    )


def load_hf_config(path: str) -> ModelConfig:
    """ModelConfig of a Hugging Face directory; eos ids also from generation_config.json."""
    if not os.path.isdir(path):
        raise WeightLoadError(f"not a model directory: {path}")
    cfg_path = os.path.join(path, CONFIG_FILE)
    cfg = config_from_hf(_read_json(cfg_path, CONFIG_FILE), cfg_path)
    gen_path = os.path.join(path, GENERATION_CONFIG_FILE)
    if os.path.exists(gen_path):
        # Instruct models often list their end-of-turn ids only here.
        extra = _token_ids(_read_json(gen_path, GENERATION_CONFIG_FILE).get("eos_token_id"), "eos_token_id", gen_path)
        merged = cfg.eos_token_ids + tuple(i for i in extra if i not in cfg.eos_token_ids)
        if merged != cfg.eos_token_ids:
            cfg = dataclasses.replace(cfg, eos_token_ids=merged)
    return cfg


# ----------------------------------------------------------------------------
# safetensors


class _SafetensorsFile:
    """One .safetensors file: names and numpy tensors, header validated on open."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise WeightLoadError(f"weights file not found: {path}")
        try:
            self._handle = safe_open(path, framework="np")
            self.names = set(self._handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightLoadError(f"{path}: corrupt safetensors header ({e})") from None
        self._header = None

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handle.get_tensor(name)
        except TypeError:
            # numpy has no bfloat16; read the raw bytes and view them with ml_dtypes.
            return self._get_raw(name)

    def _get_raw(self, name: str) -> np.ndarray:
        dtypes = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
        with open(self.path, "rb") as f:
            if self._header is None:
                (n,) = struct.unpack("<Q", f.read(8))
                self._header = (8 + n, json.loads(f.read(n)))
            base, header = self._header
            entry = header[name]
            if entry["dtype"] not in dtypes:
                raise WeightLoadError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            start, end = entry["data_offsets"]
            f.seek(base + start)
            buf = f.read(end - start)
        return np.frombuffer(buf, dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])


class _WeightSource:
    """Tensor name -> numpy array across a single file or an index of shards."""

    def __init__(self, path: str):
        single = os.path.join(path, SINGLE_WEIGHTS_FILE)
        index = os.path.join(path, INDEX_FILE)
        self._files: dict[str, _SafetensorsFile] = {}
        if os.path.exists(index):
            weight_map = _read_json(index, INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightLoadError(f"{index}: missing field 'weight_map'")
            self.where = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
            self.describe = index
            for shard in sorted(set(self.where.values())):
                if not os.path.exists(shard):
                    raise WeightLoadError(f"weights file not found: {shard} (listed in {index})")
        elif os.path.exists(single):
            f = self._open(single)
            self.where = {name: single for name in f.names}
            self.describe = single
        else:
            others = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin", ".pt")))
            hint = f"; found {others}" if others else ""
            raise WeightLoadError(
                f"weights file not found: neither {SINGLE_WEIGHTS_FILE} nor {INDEX_FILE} in {path}{hint}"
            )

    def _open(self, file: str) -> _SafetensorsFile:
        if file not in self._files:
            self._files[file] = _SafetensorsFile(file)
        return self._files[file]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor in torch layout, checked against `shape`."""
        if name not in self.where:
            raise WeightLoadError(f"{self.describe}: missing tensor {name!r}")
        f = self._open(self.where[name])
        if name not in f.names:
            raise WeightLoadError(f"{f.path}: missing tensor {name!r} (listed in {self.describe})")
        arr = f.get(name)
        if tuple(arr.shape) != tuple(shape):
            raise WeightLoadError(
                f"{f.path}: tensor {name!r} has shape {tuple(arr.shape)}, config.json implies {tuple(shape)}"
            )
        return arr


def load_hf_directory(path: str, dtype=jnp.float32) -> tuple[ModelConfig, Params]:
    """Read a Hugging Face model directory into (ModelConfig, Params) with weights cast to `dtype`."""
    path = os.fspath(path)
    cfg = load_hf_config(path)
    src = _WeightSource(path)
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    torch_shapes = {  # [out, in] as stored by torch
        "attn_norm": (H,),
        "wq": (qd, H),
        "wk": (kvd, H),
        "wv": (kvd, H),
        "wo": (H, qd),
        "mlp_norm": (H,),
        "w_gate": (I, H),
        "w_up": (I, H),
        "w_down": (H, I),
    }

    def to_jax(arr):
        return jnp.asarray(np.asarray(arr, dtype=np.float32) if arr.dtype.itemsize < 4 else arr, dtype=dtype)

    layers = {}
    for field, (suffix, linear) in _LAYER_TENSORS.items():
        per_layer = []
        for i in range(L):
            arr = src.get(f"model.layers.{i}.{suffix}", torch_shapes[field])
            per_layer.append(arr.T if linear else arr)
        layers[field] = to_jax(np.stack(per_layer))
        del per_layer

    embed = to_jax(src.get("model.embed_tokens.weight", (V, H)))
    lm_head = None
    if not cfg.tie_word_embeddings:  # tied checkpoints may still carry a copy; it is ignored
        lm_head = to_jax(src.get("lm_head.weight", (V, H)).T)
    params = Params(
        embed=embed,
        layers=LayerParams(**layers),
        final_norm=to_jax(src.get("model.norm.weight", (H,))),
        lm_head=lm_head,
    )
    return cfg, params
