"""How much of a device a model takes, and how large a KV pool fits: from shapes alone.

`plan_memory` traces `init_params` with `jax.eval_shape` (no weight is allocated, so a 70B
plan runs on a laptop) and divides every leaf by the sharding the rules give it
(spanjax/models/sharding.py). Per device, with m = the `model` axis, T = max tokens per
step (of one data replica), S = max sequences per step, a = the activation (weight) dtype's
bytes, c = the cache dtype's bytes:

    parameters  = sum over leaves of size * itemsize / (product of the mesh axes it is split over)
    KV per page = 2 (k and v) * L * page_size * (Hkv / m) * D * c
    activations = a * T * 4 H                       residual x, its norm, a block's output and
                                                    its all-reduced sum (H is not split)
                + a * T * (Hq + 2 Hkv) * D / m      q, k, v of this device's heads
                + a * T * Hq * D / m                attention output
                + a * T * 3 I / m                   MLP gate, up and their product
                + 4 * T * 2 I / m                   fp32 gate and up before the cast (`linear`)
                + 4 * S * 2 V / m_vocab             fp32 logits of the S sampled rows, and softmax
                                                    (m_vocab = m, or 1 where V does not divide m)

One layer's activations are live at a time (inference keeps none for a backward pass); the
span-attention kernel's tiled scores and XLA's own scratch are not counted, which is part of
what the headroom is for. The pool gets what is left of `device_memory * (1 - headroom)`.
Optimizer state is not counted: with `rules="training"` the parameter line shows FSDP's split
of the weights, nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from spanjax.models import llama
from spanjax.models.config import ModelConfig
from spanjax.models.sharding import (
    MeshSpec,
    RulesArg,
    bytes_per_device,
    cache_partition_spec,
    get_rules,
    param_partition_specs,
    resolve_rules,
    shard_factor,
    uneven_replicated,
)

DEFAULT_HEADROOM = 0.10


def abstract_params(cfg: ModelConfig, dtype="bfloat16"):
    """Params of ShapeDtypeStructs: what `init_params` would build, without building it."""
    return jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0), jnp.dtype(dtype)))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh: str
    rules: str
    dtype: str
    cache_dtype: str
    page_size: int
    max_tokens_per_step: int
    max_seqs_per_step: int
    device_memory_bytes: int
    headroom: float
    param_count: int
    param_bytes_total: int
    param_bytes_per_device: int
    kv_bytes_per_token_per_device: int
    kv_bytes_per_page_per_device: int
    activation_bytes_per_device: int
    usable_bytes_per_device: int  # device memory less the headroom
    pool_bytes_per_device: int  # what is left for the KV pool (0 if nothing is)
    max_pages: int  # EngineConfig.num_pages (page 0 is reserved by the engine)
    max_tokens: int  # tokens those pages hold: (max_pages - 1) * page_size
    fits: bool
    notes: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def format(self) -> str:
        """A readable table (sizes in GiB / MiB; bytes in the JSON)."""
        rows = [
            ("mesh", f"{self.mesh} ({self.rules} rules)"),
            ("dtype / cache dtype", f"{self.dtype} / {self.cache_dtype}"),
            ("device memory", f"{self.device_memory_bytes / 1e9:.1f} GB = {_gib(self.device_memory_bytes)}"),
            ("usable", f"{_gib(self.usable_bytes_per_device)} (after {self.headroom:.0%} headroom)"),
            ("parameters", f"{self.param_count / 1e9:.2f} B = {_gib(self.param_bytes_total)} in all"),
            ("parameters / device", _gib(self.param_bytes_per_device)),
            (
                "activations / device",
                f"{_mib(self.activation_bytes_per_device)} "
                f"({self.max_tokens_per_step} tokens, {self.max_seqs_per_step} sampled rows per step)",
            ),  # fmt: skip
            ("KV / token / device", f"{self.kv_bytes_per_token_per_device / 1024:.1f} KiB"),
            ("KV / page / device", f"{self.kv_bytes_per_page_per_device / 1024:.0f} KiB ({self.page_size} tokens)"),
            ("KV pool / device", _gib(self.pool_bytes_per_device)),
            (
                "largest pool",
                f"{self.max_pages:,} pages = {self.max_tokens:,} tokens per replica" if self.fits else "does not fit",
            ),  # fmt: skip
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def activation_bytes(
    cfg: ModelConfig,
    mesh: MeshSpec,
    rules: RulesArg,
    dtype,
    max_tokens_per_step: int,
    max_seqs_per_step: int,
) -> int:
    """The module docstring's activation estimate for one engine step, per device."""
    resolved = resolve_rules(cfg, rules, mesh)
    m = mesh.axis_size(resolved["heads"])  # heads, kv_heads and mlp share the model axis
    a, T, S = jnp.dtype(dtype).itemsize, max_tokens_per_step, max_seqs_per_step
    H, D, Hq, Hkv, I = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    per_token = 4 * H + (Hq + 2 * Hkv) * D // m + Hq * D // m + 3 * I // m
    vocab_shard = cfg.vocab_size // mesh.axis_size(resolved["vocab"])
    return T * per_token * a + T * 2 * I // m * 4 + S * vocab_shard * 4 * 2


def plan_memory(
    cfg: ModelConfig,
    mesh_spec: MeshSpec,
    device_memory_bytes: int,
    *,
    dtype="bfloat16",
    cache_dtype=None,
    page_size: int = 16,
    max_tokens_per_step: int = 512,
    max_seqs_per_step: int = 32,
    headroom: float = DEFAULT_HEADROOM,
    rules: RulesArg = "inference",
) -> MemoryPlan:
    """Per-device bytes of parameters, KV pool and activations, and the largest pool that fits.

    `cache_dtype` defaults to `dtype`. Raises ValueError when the model does not divide the
    mesh (the field is named)."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if page_size < 1 or max_tokens_per_step < 1 or max_seqs_per_step < 1:
        raise ValueError("page_size, max_tokens_per_step and max_seqs_per_step must be positive")
    rules_obj = get_rules(rules)
    dtype = jnp.dtype(dtype)
    cache_dtype = dtype if cache_dtype is None else jnp.dtype(cache_dtype)

    params = abstract_params(cfg, dtype)
    specs = param_partition_specs(cfg, params, rules_obj, mesh_spec)
    leaves = jax.tree.leaves(params)
    param_count = sum(math.prod(x.shape) for x in leaves)
    param_total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    param_device = sum(jax.tree.leaves(jax.tree.map(lambda x, s: bytes_per_device(x, s, mesh_spec), params, specs)))

    kv_split = shard_factor(cache_partition_spec(cfg, rules_obj, mesh_spec), mesh_spec)
    kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache_dtype.itemsize // kv_split
    kv_page = kv_token * page_size
    act = activation_bytes(cfg, mesh_spec, rules_obj, dtype, max_tokens_per_step, max_seqs_per_step)

    usable = int(device_memory_bytes * (1 - headroom))
    left = usable - param_device - act
    pages = max(left // kv_page, 0)
    fits = pages >= 2  # page 0 is reserved: one usable page at least
    notes = list(uneven_replicated(cfg, rules_obj, mesh_spec))
    if not fits:
        notes.append(
            f"parameters and activations need {_gib(param_device + act)} per device, "
            f"more than the {_gib(usable)} usable: add devices to the model axis"
        )
    return MemoryPlan(
        mesh=str(mesh_spec),
        rules=rules_obj.name,
        dtype=dtype.name,
        cache_dtype=cache_dtype.name,
        page_size=page_size,
        max_tokens_per_step=max_tokens_per_step,
        max_seqs_per_step=max_seqs_per_step,
        device_memory_bytes=int(device_memory_bytes),
        headroom=headroom,
        param_count=param_count,
        param_bytes_total=param_total,
        param_bytes_per_device=param_device,
        kv_bytes_per_token_per_device=kv_token,
        kv_bytes_per_page_per_device=kv_page,
        activation_bytes_per_device=act,
        usable_bytes_per_device=usable,
        pool_bytes_per_device=pages * kv_page if fits else 0,
        max_pages=pages if fits else 0,
        max_tokens=(pages - 1) * page_size if fits else 0,
        fits=fits,
        notes=tuple(notes),
    )
