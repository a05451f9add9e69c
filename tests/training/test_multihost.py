"""Multi-host (spanjax/distributed.py): the environment's settings, and two processes on
loopback with 4 fake CPU devices each, joined over gloo into one runtime of 8 devices, that
run the same program on the global data=2,model=4 mesh (two aLoRA training steps through the
whole trainer: sharded checkpoints, process 0's metrics and export; and a sharded model
forward), and one Engine on the global (1, 8) mesh (span queries: prefill and decode steps),
and agree with one process computing the same on 8 devices.

The checks each process runs are `CHECKS` in tests/training/mesh_cases.py (scenario
`multihost`); a new one (e.g. an engine step) is compared here by adding its name to
`COMPARED`."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from test_mesh_training import TOL, assert_close_trees, assert_same_curve, result_of, run_cases

from spanjax import distributed
from spanjax.distributed import Settings, settings_from_env

COMPARED = ("train", "forward", "engine")


@pytest.mark.parametrize(
    "env, settings",
    [
        ({}, None),
        (
            {"SPANJAX_COORDINATOR": "10.0.0.1:1234", "SPANJAX_NUM_PROCESSES": "2", "SPANJAX_PROCESS_ID": "1"},
            Settings("10.0.0.1:1234", 2, 1),
        ),
        (  # JAX's own names, and the spanjax name winning where both are set
            {
                "JAX_COORDINATOR_ADDRESS": "h:1",
                "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3",
                "SPANJAX_PROCESS_ID": "0",
            },
            Settings("h:1", 4, 0),
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, Settings("h:1")),  # count and id left to JAX's cluster detection
        ({"SPANJAX_DISTRIBUTED": "auto"}, Settings(auto=True)),
    ],
)
def test_settings_from_env(env, settings):
    assert settings_from_env(env) == settings


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SPANJAX_NUM_PROCESSES": "2", "SPANJAX_PROCESS_ID": "0"}, "coordinator"),
        ({"SPANJAX_COORDINATOR": "h:1", "SPANJAX_NUM_PROCESSES": "two"}, "expected an integer"),
        ({"SPANJAX_COORDINATOR": "h:1", "SPANJAX_NUM_PROCESSES": "2", "SPANJAX_PROCESS_ID": "2"}, "not in 0..1"),
    ],
)
def test_bad_settings_are_refused(env, message):
    with pytest.raises(ValueError, match=message):
        settings_from_env(env)


def test_initialize_without_settings_does_nothing(monkeypatch):
    for name in ("SPANJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "SPANJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES",
                 "SPANJAX_PROCESS_ID", "JAX_PROCESS_ID", "SPANJAX_DISTRIBUTED"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(procs_outs, timeout: float = 600) -> list[dict]:
    """Wait for every process; the first to fail kills the others (they would wait for it)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p, _ in procs_outs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p, _ in procs_outs):
            break
        time.sleep(0.2)
    for p, _ in procs_outs:
        if p.poll() is None and any(q.poll() not in (None, 0) for q, _ in procs_outs):
            p.kill()
    return [result_of(p, out, timeout=max(1.0, deadline - time.monotonic())) for p, out in procs_outs]


def test_two_processes_agree_with_one(tmp_path):
    if not distributed.gloo_available():
        pytest.skip("this jaxlib has no gloo CPU collectives (multi-process CPU runs are impossible)")
    shared = tmp_path / "two"  # one run directory for both processes, as a shared filesystem would give
    env = {"SPANJAX_COORDINATOR": f"127.0.0.1:{_free_port()}", "SPANJAX_NUM_PROCESSES": "2"}
    pair = [run_cases("multihost", shared, 4, {**env, "SPANJAX_PROCESS_ID": str(i)}) for i in (0, 1)]
    single = run_cases("multihost", tmp_path / "one", 8)
    two, _, one = _results([(pair[0], shared), (pair[1], shared), (single, tmp_path / "one")])
    assert (two["process_count"], two["device_count"]) == (2, 8) and (one["process_count"], one["device_count"]) == (
        1,
        8,
    )
    for name in COMPARED:
        assert two[name], name
    assert_same_curve(two["train"]["curve"], one["train"]["curve"])
    assert_close_trees(two["train"]["weights"], one["train"]["weights"])
    logits_two, logits_one = np.asarray(two["forward"]["logits"]), np.asarray(one["forward"]["logits"])
    assert logits_one.shape == (2, 12, 64) and np.abs(logits_two - logits_one).max() <= TOL
    # The engine: its mesh spans both processes, each device holds one kv head of the pool; the
    # same steps, tokens (greedy and seeded sampling) and kept logits as one process.
    engine_two, engine_one = two["engine"], one["engine"]
    assert engine_two["processes"] == [0, 1] and engine_one["processes"] == [0]
    assert engine_two["pool_shard"][2] == 1 and engine_two["steps"] == engine_one["steps"]
    assert engine_two["tokens"] == engine_one["tokens"] and all(len(t) == 5 for t in engine_one["tokens"])
    for got, want in zip(engine_two["logits"], engine_one["logits"]):
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape == (5, 64) and np.abs(got - want).max() <= TOL
        assert np.abs(want).max() > 1e-2  # not a comparison of zeros
    # What does not span processes is refused: engine replicas (data > 1), experiment runs.
    assert "engine replicas (data > 1) run in one process" in engine_two["refused"]["replicas"]
    assert "experiment runs are one process" in engine_two["refused"]["experiment"]
    # The run directory: process 0 wrote the metrics (once) and the export; both wrote the checkpoint.
    run = shared / "runs" / "mh"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "adapter" / "adapter_model.safetensors").exists() and (run / "checkpoints" / "2").is_dir()
