"""The training core (training/core.py) on a toy quadratic recipe: exact resume after a
simulated kill, eval callbacks joining (and forcing) metric lines, and checkpoints written
before the core (trained pytree stored as `weights`) restoring into TrainState."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanjax.training.checkpoint import Checkpointer
from spanjax.training.config import OptimSection
from spanjax.training.core import Recipe, SimulatedCrash, TrainState, crash_after, read_metrics, train_loop


@dataclasses.dataclass(frozen=True)
class Quadratic:
    scale: float = 1.0

    def context(self, frozen, batch):
        return None

    def loss(self, params, rng, frozen, batch, context):
        noise = 0.01 * jax.random.normal(rng, params["w"].shape)  # uses the step's key
        return self.scale * jnp.sum((params["w"] + noise - batch) ** 2), {"target_norm": jnp.linalg.norm(batch)}


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = 7
    checkpoint_every: int = 3
    log_every: int = 2
    seed: int = 0
    optim: OptimSection = OptimSection(lr=0.1, warmup_steps=1)


def recipe(calls: list) -> Recipe:
    def evaluate(done, state):
        calls.append(done)
        return {"w0": float(state.params["w"][0])} if done == 3 else {}

    batch = lambda step: np.full(3, float(step % 4), np.float32)
    return Recipe("toy", {"w": jnp.zeros(3)}, Quadratic(), None, batch, evals=[evaluate])


def test_loop_resumes_exactly_and_logs_evaluations(tmp_path):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_dir.mkdir(), killed_dir.mkdir()
    calls = []
    full = train_loop(Cfg(), full_dir, recipe(calls))
    lines = read_metrics(full_dir)
    # every log_every steps, the last, and the evaluated step 3
    assert [m["step"] for m in lines] == [2, 3, 4, 6, 7] and "w0" in lines[1]
    assert set(lines[0]) == {"step", "loss", "grad_norm", "lr", "target_norm", "step_s"}
    assert calls == list(range(1, 8)) and full.resumed_from == 0
    with pytest.raises(SimulatedCrash):
        train_loop(Cfg(), killed_dir, recipe([]), hooks=[crash_after(5)])
    resumed = train_loop(Cfg(), killed_dir, recipe([]))
    assert resumed.resumed_from == 3
    strip = lambda ms: [{k: v for k, v in m.items() if k != "step_s"} for m in ms]
    assert strip(read_metrics(killed_dir)) == strip(lines)
    np.testing.assert_array_equal(np.asarray(resumed.state.params["w"]), np.asarray(full.state.params["w"]))


@dataclasses.dataclass(frozen=True)
class LegacyState:  # how adapter runs stored their state before the training core
    step: Any
    weights: Any
    opt_state: Any


jax.tree_util.register_dataclass(LegacyState, data_fields=["step", "weights", "opt_state"], meta_fields=[])


def test_a_legacy_checkpoint_restores_into_train_state(tmp_path):
    ckpt = Checkpointer(tmp_path, 1)
    ckpt.save(3, LegacyState(jnp.int32(3), {"a": jnp.arange(3.0)}, (jnp.ones(2),)), force=True)
    ckpt.close()
    ckpt = Checkpointer(tmp_path, 1)
    got = ckpt.restore(ckpt.latest_step(), TrainState(jnp.int32(0), {"a": jnp.zeros(3)}, (jnp.zeros(2),)))
    ckpt.close()
    assert isinstance(got, TrainState) and int(got.step) == 3
    np.testing.assert_array_equal(np.asarray(got.params["a"]), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(got.opt_state[0]), [1.0, 1.0])
