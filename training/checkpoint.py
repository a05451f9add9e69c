"""Orbax checkpoints of the train state (adapter weights, optimizer state, step)."""

from __future__ import annotations

from pathlib import Path

import jax


class Checkpointer:
    def __init__(self, directory: str | Path, every: int, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            Path(directory).resolve(),
            options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, force: bool = False) -> bool:
        saved = self.manager.save(step, args=self._ocp.args.StandardSave(state), force=force)
        # Block until written: a kill right after must not lose this checkpoint.
        self.manager.wait_until_finished()
        return saved

    def restore(self, step: int, like):
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self):
        self.manager.close()
