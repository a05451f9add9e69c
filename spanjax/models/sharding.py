"""Device meshes and the Llama family's sharding rules, stated once.

Every weight and KV-pool dimension gets a *logical* axis name (`PARAM_AXES`, `CACHE_AXES`);
a rules table (`INFERENCE_RULES`, `TRAINING_RULES`) maps logical names to the mesh axes
`data` and `model`. Partition specs follow from the two, so a new model family states its
names and a new parallelism strategy states its table, and neither touches the other (the
scheme of flax's logical-axis helpers and jax-llm-examples' sharding rules).

    spec = parse_mesh("data=2,model=4")
    mesh = make_mesh(spec)                       # jax.sharding.Mesh over jax.devices()
    params = shard_params(params, cfg, mesh, "inference")

Heads, kv heads, the MLP width and the vocabulary go over `model` (Megatron-style tensor
parallelism: q/k/v/gate/up split by output, o/down by input); batch goes over `data`;
training adds FSDP, every weight matrix's hidden (`embed`) dimension over `data`. The q/k/v
projections store heads * head_dim on one axis: contiguous blocks of it keep whole heads on
one device exactly when the head count divides the `model` axis, which is checked, with an
error naming the config field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from spanjax.models.config import ModelConfig
from spanjax.models.llama import PagedKVCache

MESH_AXES = ("data", "model")


# ----------------------------------------------------------------------------
# The mesh setting


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the mesh axes: `data` (replicas / batch) x `model` (tensor parallelism)."""

    data: int = 1
    model: int = 1

    def __post_init__(self):
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"mesh axis {axis} must be a positive integer, got {size!r}")

    @property
    def num_devices(self) -> int:
        return self.data * self.model

    def axis_size(self, axis: str | None) -> int:
        return 1 if axis is None else getattr(self, axis)

    def __str__(self) -> str:
        return f"data={self.data},model={self.model}"


def parse_mesh(text: str) -> MeshSpec:
    """'data=2,model=4' (either axis may be left out: it is 1) -> MeshSpec."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = (s.strip() for s in part.partition("="))
        if not eq:
            raise ValueError(f"mesh {text!r}: expected AXIS=SIZE, got {part!r} (e.g. data=2,model=4)")
        if name not in MESH_AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in sizes:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh {text!r}: size of {name!r} must be an integer, got {value!r}") from None
        if size < 1:
            raise ValueError(f"mesh {text!r}: size of {name!r} must be positive, got {size}")
        sizes[name] = size
    if not sizes:
        raise ValueError(f"mesh {text!r}: empty (e.g. data=2,model=4)")
    return MeshSpec(**sizes)


def make_mesh(spec: MeshSpec, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") Mesh over `devices` (default: all of `jax.devices()`).

    `jax.make_mesh` orders devices by the physical topology (rings on TPU); the axes are
    Auto, so jit places collectives itself from the shardings of its inputs."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != spec.num_devices:
        raise ValueError(
            f"mesh {spec} needs data*model = {spec.num_devices} devices, {len(devices)} given "
            f"(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices)"
        )
    return jax.make_mesh((spec.data, spec.model), MESH_AXES, (AxisType.Auto, AxisType.Auto), devices=devices)


def mesh_spec_of(mesh: Mesh | MeshSpec | str) -> MeshSpec:
    """A MeshSpec from a MeshSpec, a Mesh or a string like 'data=2,model=4'."""
    if isinstance(mesh, MeshSpec):
        return mesh
    if isinstance(mesh, str):
        return parse_mesh(mesh)
    return MeshSpec(**{axis: int(mesh.shape[axis]) for axis in MESH_AXES})


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """The (1, model) sub-mesh of every `data` index: one engine replica each.

    Rows of the mesh's device array, so a replica's `model` devices are the ones
    `jax.make_mesh` put next to each other (a ring on TPU)."""
    axis_types = (AxisType.Auto, AxisType.Auto)
    return [Mesh(mesh.devices[i : i + 1], MESH_AXES, axis_types=axis_types) for i in range(mesh.shape["data"])]


# ----------------------------------------------------------------------------
# Logical axes of the Llama family (spanjax/models/llama.py); stacked layers lead with "layers".

PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),  # [V, H]
    "final_norm": ("norm",),  # [H]
    "lm_head": ("embed", "vocab"),  # [H, V]
    "layers.attn_norm": ("layers", "norm"),  # [L, H]
    "layers.wq": ("layers", "embed", "heads"),  # [L, H, Hq * D]
    "layers.wk": ("layers", "embed", "kv_heads"),  # [L, H, Hkv * D]
    "layers.wv": ("layers", "embed", "kv_heads"),
    "layers.wo": ("layers", "heads", "embed"),  # [L, Hq * D, H]
    "layers.mlp_norm": ("layers", "norm"),
    "layers.w_gate": ("layers", "embed", "mlp"),  # [L, H, I]
    "layers.w_up": ("layers", "embed", "mlp"),
    "layers.w_down": ("layers", "mlp", "embed"),  # [L, I, H]
}
# PagedKVCache.k / .v: [L * num_pages, page_size, Hkv, D] (every layer's pages in one array)
CACHE_AXES: tuple[str, ...] = ("pages", "page", "kv_heads", "head_dim")

# Logical axis -> the ModelConfig field whose size it splits (checked for divisibility).
SIZE_FIELDS = {
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "mlp": "intermediate_size",
    "vocab": "vocab_size",
    "embed": "hidden_size",
    "norm": "hidden_size",
    "layers": "num_layers",
    "head_dim": "head_dim",
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis ("data", "model") or None (replicated).

    `replicate_if_uneven`: logical axes that fall back to replication when the config's size
    does not divide the mesh axis, instead of raising. Only the vocabulary: Granite 3.x has
    49159 tokens (odd: 11 x 41 x 109), and replicating its embedding costs little next to the layers."""

    name: str
    axes: tuple[tuple[str, str | None], ...]
    replicate_if_uneven: frozenset[str] = frozenset({"vocab"})

    def mesh_axis(self, logical: str) -> str | None:
        return dict(self.axes).get(logical)


_TENSOR_PARALLEL = (
    ("batch", "data"),
    ("layers", None),
    ("norm", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("pages", None),  # a data replica owns its whole pool (engine data parallelism = replicas)
    ("page", None),
    ("head_dim", None),
)
INFERENCE_RULES = ShardingRules("inference", (*_TENSOR_PARALLEL, ("embed", None)))
# FSDP: weights are also split over `data` along the hidden dimension, gathered per layer.
TRAINING_RULES = ShardingRules("training", (*_TENSOR_PARALLEL, ("embed", "data")))
RULES = {"inference": INFERENCE_RULES, "training": TRAINING_RULES}

RulesArg = ShardingRules | Literal["inference", "training"]


def get_rules(rules: RulesArg) -> ShardingRules:
    if isinstance(rules, ShardingRules):
        return rules
    if rules not in RULES:
        raise ValueError(f"unknown sharding rules {rules!r} (known: {', '.join(RULES)})")
    return RULES[rules]


def resolve_rules(cfg: ModelConfig, rules: RulesArg, mesh: Mesh | MeshSpec) -> dict[str, str | None]:
    """The rules for this model on this mesh: logical axis -> mesh axis, checked.

    A logical axis on a mesh axis of size n > 1 needs its config size divisible by n, else a
    ValueError names the field ("num_kv_heads=3 is not divisible by the model axis (4)");
    axes in `replicate_if_uneven` are replicated instead. Axes of size 1 map to None."""
    rules, spec = get_rules(rules), mesh_spec_of(mesh)
    out: dict[str, str | None] = {}
    for logical, axis in rules.axes:
        n = spec.axis_size(axis)
        if n == 1:
            out[logical] = None
            continue
        field = SIZE_FIELDS.get(logical)
        size = None if field is None else getattr(cfg, field)
        if size is not None and size % n:
            if logical in rules.replicate_if_uneven:
                out[logical] = None
                continue
            raise ValueError(f"{field}={size} is not divisible by the {axis} axis ({n}) ({rules.name} sharding)")
        out[logical] = axis
    return out


def uneven_replicated(cfg: ModelConfig, rules: RulesArg, mesh: Mesh | MeshSpec) -> list[str]:
    """Config fields replicated because they do not divide their mesh axis (for reports)."""
    rules, spec = get_rules(rules), mesh_spec_of(mesh)
    resolved = resolve_rules(cfg, rules, spec)
    return [
        f"{SIZE_FIELDS[name]}={getattr(cfg, SIZE_FIELDS[name])} replicated (not divisible by the {axis} axis "
        f"({spec.axis_size(axis)}))"
        for name, axis in rules.axes
        if spec.axis_size(axis) > 1 and resolved[name] is None
    ]


def _spec(logical: Sequence[str], resolved: dict[str, str | None]) -> PartitionSpec:
    axes = [resolved.get(name) for name in logical]
    while axes and axes[-1] is None:  # P("model", None) == P("model"); the short form reads better
        axes.pop()
    return PartitionSpec(*axes)


def _field_path(path) -> str:
    return ".".join(k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey))


def _leaf_axes(path, leaf) -> tuple[str, ...]:
    name = _field_path(path)
    if name not in PARAM_AXES:
        raise ValueError(f"no logical axes for parameter {name!r} (add it to PARAM_AXES)")
    logical = PARAM_AXES[name]
    if logical[0] == "layers" and leaf.ndim == len(logical) - 1:  # unstacked: one layer per leaf
        logical = logical[1:]
    if leaf.ndim != len(logical):
        raise ValueError(f"parameter {name!r} has shape {tuple(leaf.shape)}, expected axes {logical}")
    return logical


def param_logical_axes(params):
    """The logical axis names of every leaf of a Params pytree (stacked or unstacked layers)."""
    return jax.tree_util.tree_map_with_path(_leaf_axes, params)


def param_partition_specs(cfg: ModelConfig, params, rules: RulesArg, mesh: Mesh | MeshSpec):
    """PartitionSpec pytree for `params` (arrays or `jax.eval_shape` abstractions)."""
    resolved = resolve_rules(cfg, rules, mesh)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _spec(_leaf_axes(path, leaf), resolved), params)


def cache_partition_spec(cfg: ModelConfig, rules: RulesArg, mesh: Mesh | MeshSpec) -> PartitionSpec:
    """PartitionSpec of each of PagedKVCache.k / .v: kv heads over `model`, pages whole."""
    return _spec(CACHE_AXES, resolve_rules(cfg, rules, mesh))


def cache_partition_specs(cfg: ModelConfig, rules: RulesArg, mesh: Mesh | MeshSpec):
    """The PagedKVCache pytree of specs (what `jax.jit`'s in/out shardings take)."""
    spec = cache_partition_spec(cfg, rules, mesh)
    return PagedKVCache(k=spec, v=spec, num_layers=cfg.num_layers)


def named_shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params, cfg: ModelConfig, mesh: Mesh, rules: RulesArg = "inference"):
    """`params` placed on `mesh` by the rules (`put_global` with NamedShardings)."""
    return put_global(params, named_shardings(param_partition_specs(cfg, params, rules, mesh), mesh))


def spans_processes(mesh: Mesh) -> bool:
    """Whether `mesh` holds devices of other processes (a multi-host mesh)."""
    return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def put_global(tree, shardings):
    """`tree` (host arrays, or arrays on one device; the same values in every process) placed by
    `shardings` (a pytree of them, or one sharding for every leaf). A sharding of this process's
    devices only is `jax.device_put`; one spanning other processes' devices is built from this
    process's copy (`jax.make_array_from_callback`), each process contributing its own devices'
    blocks, so nothing travels between hosts. Every process must call it with the same values
    (None leaves, empty subtrees to jax.tree, stay None)."""

    def one(x, sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def shard_factor(spec: PartitionSpec, mesh: Mesh | MeshSpec) -> int:
    """Into how many pieces `spec` splits an array (its bytes per device = total / this)."""
    sizes = mesh_spec_of(mesh)
    factor = 1
    for entry in spec:
        for axis in entry if isinstance(entry, tuple) else (entry,):
            factor *= sizes.axis_size(axis)
    return factor


def bytes_per_device(leaf, spec: PartitionSpec, mesh: Mesh | MeshSpec) -> int:
    """Bytes of one shard of `leaf` (an array or ShapeDtypeStruct) under `spec`."""
    return math.prod(leaf.shape) * leaf.dtype.itemsize // shard_factor(spec, mesh)
