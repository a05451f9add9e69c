"""Training on a mesh (docs/scaling.md, "Training on a mesh"): where the train state, the
frozen inputs and the batches of the training core (core.py) live.

- The mesh is the run config's `mesh` setting ("data=2,model=4", spanjax/models/sharding.py);
  one device, the default, gives None and the core runs unsharded, exactly as before.
- frozen (the base model): the recipe's `frozen_specs`, for the Llama family the "training"
  rules (FSDP: every weight matrix's hidden dimension over `data`; heads, kv heads, MLP and
  vocabulary over `model`); a recipe without specs gets its frozen inputs replicated.
- the trained pytree: the recipe's `param_specs` (default replicated: LoRA weights are
  small); the optimizer state follows it, each of its parameter-shaped trees (AdamW's mu and
  nu) sharded like the parameters, its scalars replicated.
- batches: the leading (batch) axis over `data`.

The jitted update then gets these as explicit in/out shardings and XLA (GSPMD) places the
collectives: the same computation as on one device, up to the order of float sums.

Multi-host (spanjax/distributed.py): every process computes the same global batch and holds
the same frozen weights; `place` cuts each local device's block out of that host copy, so
no data travels between hosts to build the inputs. `to_host` gathers a result back.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spanjax.models.sharding import make_mesh, parse_mesh, put_global

BATCH_AXIS = "data"


def mesh_from_setting(text: str | None) -> Mesh | None:
    """The mesh of a `mesh` setting ("data=2,model=4") over all of jax.devices(), or None for
    a one-device mesh of a single process (the unsharded path)."""
    if text is None:
        return None
    spec = parse_mesh(text)
    if spec.num_devices == 1 and jax.process_count() == 1:
        return None
    return make_mesh(spec)


def named(mesh: Mesh, specs):
    """PartitionSpec pytree (None = replicated everywhere) -> NamedSharding pytree."""
    if specs is None:
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def broadcast(sharding, tree):
    """`sharding` as a full pytree for `tree` (a single NamedSharding applies to every leaf)."""
    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda _: sharding, tree)
    return sharding


def place(tree, shardings):
    """`tree` (host arrays, or arrays on one device; the same values in every process) on the
    mesh. A sharding that spans other processes' devices is built from this host's copy
    (`jax.make_array_from_callback`), every process contributing its own devices' blocks
    (`spanjax.models.sharding.put_global`, which the engine uses too)."""
    return put_global(tree, broadcast(shardings, tree))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def place_batch(batch, mesh: Mesh):
    """A step's batch with its leading axis split over `data` (checked: it must divide)."""
    n = mesh.shape[BATCH_AXIS]
    for leaf in jax.tree.leaves(batch):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
            raise ValueError(
                f"a batch leaf of shape {tuple(np.shape(leaf))} cannot split its leading (batch) axis over the "
                f"data axis ({n}): batch_size must be a multiple of the mesh's data size"
            )
    return place(batch, batch_sharding(mesh))


def state_shardings(state, param_specs, optimizer, mesh: Mesh):
    """NamedShardings of a TrainState (arrays or `jax.eval_shape` abstractions): params by
    `param_specs` (None = replicated), every parameter-shaped tree of the optimizer state
    likewise, everything else (step, optimizer counters) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = broadcast(named(mesh, param_specs), state.params)
    opt_state = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        state.opt_state,
        params,
        transform_non_params=lambda leaf: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return state.replace(step=replicated, params=params, opt_state=opt_state)


def to_host(tree):
    """numpy copies of `tree`, in every process (a collective when arrays span processes:
    every process must call it)."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
