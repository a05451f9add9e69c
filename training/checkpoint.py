"""Orbax checkpoints of the train state (trained pytree, optimizer state, step): saved sharded
as the arrays lie (every process of a multi-host run writes its shards), restored onto target
shardings (training/mesh.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp

# Field names of checkpoints written before the shared training core: adapter runs stored
# the trained pytree as `weights` (now TrainState.params).
LEGACY_FIELDS = {"params": "weights"}


def target(x) -> jax.ShapeDtypeStruct:
    """What a leaf restores as: itself if abstract, else its shape, dtype and sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


class Checkpointer:
    def __init__(self, directory: str | Path, every: int, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            Path(directory).resolve(),
            options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, force: bool = False) -> bool:
        saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
        # Block until written: a kill right after must not lose this checkpoint.
        self.manager.wait_until_finished()
        return saved

    def restore(self, step: int, like):
        """The state saved at `step`, with the structure of `like` (a dataclass pytree) and on
        its devices: each leaf is an array (restored with its sharding) or a target
        `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`. The checkpoint is sharded as it
        was saved; Orbax reads each target shard's slice, so a state saved on one mesh
        restores onto another (data=2,model=4 -> data=1,model=8, or one device)."""
        abstract = jax.tree_util.tree_map(target, like)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError:  # structure mismatch: a checkpoint with legacy field names, or not this run's
            names = {f.name: LEGACY_FIELDS.get(f.name, f.name) for f in dataclasses.fields(like)}
            if all(old == new for new, old in names.items()):
                raise
            got = self.manager.restore(
                step, args=ocp.args.StandardRestore({old: getattr(abstract, new) for new, old in names.items()})
            )
            return like.replace(**{new: got[old] for new, old in names.items()})

    def close(self):
        self.manager.close()
