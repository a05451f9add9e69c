"""Hugging Face PEFT adapter format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's for a Llama-family CausalLM:
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]   (torch layout)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]
(mlp.gate_proj / up_proj / down_proj under `mlp.`). aLoRA is PEFT's LoRA with
`alora_invocation_tokens` set (peft >= 0.17), so an exported aLoRA loads with
`PeftModel.from_pretrained` and a PEFT-trained one loads here.
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from spanjax.adapters.lora import (
    MODULES,
    Adapter,
    AdapterConfig,
    AdapterWeights,
    LoraModule,
    canonical_module,
    module_dims,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


class AdapterFormatError(ValueError):
    """An adapter directory this loader cannot read (the message says what and why)."""


def peft_key(layer: int, module: str, ab: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}.lora_{ab}.weight"


def export_peft(adapter: Adapter, path: str, base_model_name_or_path: str | None = None) -> None:
    """Write `adapter` as a PEFT adapter directory."""
    cfg = adapter.config
    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "alora_invocation_tokens": None if cfg.invocation_tokens is None else list(cfg.invocation_tokens),
    }
    tensors = {}
    for m, mod in adapter.weights.modules().items():
        a, b = np.asarray(mod.a, np.float32), np.asarray(mod.b, np.float32)
        for i in range(a.shape[0]):
            tensors[peft_key(i, m, "A")] = np.ascontiguousarray(a[i].T)  # [r, in]
            tensors[peft_key(i, m, "B")] = np.ascontiguousarray(b[i].T)  # [out, r]
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})


def load_peft(path: str, model_cfg, dtype=jnp.float32) -> Adapter:
    """Read a PEFT LoRA / aLoRA directory into an Adapter for `model_cfg`."""
    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    with open(cfg_path) as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if raw.get(flag):
            raise AdapterFormatError(f"{cfg_path}: {flag}=true is not supported")
    for field in ("rank_pattern", "alpha_pattern"):
        if raw.get(field):
            raise AdapterFormatError(f"{cfg_path}: per-module {field} is not supported")
    if raw.get("layers_to_transform") is not None:
        raise AdapterFormatError(f"{cfg_path}: layers_to_transform is not supported (all layers must be adapted)")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT allows a regex; resolve it against the module names
        targets = [m for m in MODULES if re.fullmatch(targets, m) or re.search(rf"\b{m}$", targets)]
    inv = raw.get("alora_invocation_tokens")
    try:
        config = AdapterConfig(
            kind="alora" if inv else "lora",
            r=int(raw["r"]),
            alpha=float(raw.get("lora_alpha", 8)),
            dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=tuple(canonical_module(m) for m in targets),
            invocation_tokens=tuple(inv) if inv else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFormatError(f"{cfg_path}: {e}") from e

    tensors = load_file(w_path)
    L, r = model_cfg.num_layers, config.r
    found: dict[str, dict[tuple[int, str], np.ndarray]] = {m: {} for m in config.target_modules}
    for key, val in tensors.items():
        mt = _KEY.match(key)
        if mt is None:
            raise AdapterFormatError(f"{w_path}: unexpected tensor {key!r}")
        layer, _, module, ab = int(mt.group(1)), mt.group(2), mt.group(3), mt.group(4)
        if module not in found:
            raise AdapterFormatError(f"{w_path}: tensor {key!r} for a module not in target_modules")
        found[module][(layer, ab)] = val
    mods = {}
    for m, got in found.items():
        d_in, d_out = module_dims(model_cfg, m)
        a = np.zeros((L, d_in, r), np.float32)
        b = np.zeros((L, r, d_out), np.float32)
        for i in range(L):
            if (i, "A") not in got or (i, "B") not in got:
                raise AdapterFormatError(f"{w_path}: missing lora_A/lora_B of layer {i} {m}")
            ta, tb = got[(i, "A")], got[(i, "B")]
            if ta.shape != (r, d_in) or tb.shape != (d_out, r):
                raise AdapterFormatError(
                    f"{w_path}: layer {i} {m}: lora_A {ta.shape} / lora_B {tb.shape}, "
                    f"expected {(r, d_in)} / {(d_out, r)} (is this adapter for this base model?)"
                )
            a[i], b[i] = ta.T, tb.T
        mods[m] = LoraModule(a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype))
    return Adapter(config, AdapterWeights(**mods))
