"""Training on a mesh (training/mesh.py, the core's sharded update, sharded Orbax checkpoints):
on 8 fake CPU devices, a run on data=2,model=4 or data=8,model=1 takes the single-device
run's steps (loss, grad norm, updated weights within float rounding), a speculator's sharded
trained params and optimizer state too, and a checkpoint saved on data=2,model=4 resumes on
data=1,model=8 continuing the uninterrupted single-device loss curve.

The multi-device runs happen in one subprocess (tests/training/mesh_cases.py, scenario
`mesh`): this process has already started JAX with one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spanjax import config as C
from spanjax.cli import main
from spanjax.training.config import TrainConfig
from spanjax.training.speculator_config import SpeculatorTrainConfig

CASES = Path(__file__).with_name("mesh_cases.py")
SINGLE = "data=1,model=1"
TOL = 1e-5


def run_cases(scenario: str, out: Path, devices: int = 8, env: dict | None = None) -> subprocess.Popen:
    """Start `mesh_cases.py SCENARIO OUT` with `devices` fake CPU devices (and `env`)."""
    env = {
        **os.environ,
        # conftest's flags (-O0) and the fake devices
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "SPANJAX_NO_PROGRESS": "1",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(CASES), scenario, str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def result_of(proc, out: Path, timeout: int = 600) -> dict:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        raise AssertionError(f"{CASES.name} timed out:\n{log[-3000:]}") from None
    assert proc.returncode == 0, log[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    return result_of(run_cases("mesh", out), out)


def assert_same_curve(got: list[dict], want: list[dict]):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "lr"):
            assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(b[key])), (key, a, b)


def assert_close_trees(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        err = np.abs(np.asarray(got[k]) - np.asarray(want[k])).max()
        assert err <= TOL, (k, err)


@pytest.mark.parametrize("mesh", ["data=2,model=4", "data=8,model=1"])
def test_adapter_steps_on_a_mesh_match_one_device(mesh_results, mesh):
    ref, got = mesh_results["adapter"][SINGLE], mesh_results["adapter"][mesh]
    assert len(ref["curve"]) == 4 and ref["curve"][-1]["loss"] < ref["curve"][0]["loss"]  # it learns
    assert_same_curve(got["curve"], ref["curve"])
    assert_close_trees(got["weights"], ref["weights"])
    assert max(np.abs(np.asarray(w)).max() for w in ref["weights"].values()) > 1e-2  # not a comparison of zeros


def test_speculator_with_sharded_params_matches_one_device(mesh_results):
    ref, got = mesh_results["speculator"][SINGLE], mesh_results["speculator"]["data=2,model=4"]
    # vocabulary over model, inner dimension over data; AdamW's moments follow the parameter
    assert got["emb_spec"] == got["mu_emb_spec"] == "P(None, 'model', 'data')"
    assert_same_curve(got["curve"], ref["curve"])
    assert_close_trees(got["params"], ref["params"])


def test_checkpoint_saved_on_one_mesh_resumes_on_another(mesh_results):
    full = mesh_results["adapter"][SINGLE]
    killed, resumed = mesh_results["killed"], mesh_results["resumed"]
    assert killed["crashed"] and [m["step"] for m in killed["curve"]] == [1, 2, 3]
    assert resumed["resumed_from"] == 2  # the data=2,model=4 checkpoint, restored on data=1,model=8
    assert_same_curve(resumed["curve"], full["curve"])  # steps 3 and 4 continue the single-device curve
    assert_close_trees(resumed["weights"], full["weights"])
    direct = mesh_results["direct"]  # Checkpointer.restore onto abstract targets with shardings
    assert direct == {"equal": True, "spec": "P(None, 'model')", "mesh_shape": {"data": 1, "model": 8}}


@pytest.mark.parametrize("cls", [TrainConfig, SpeculatorTrainConfig])
def test_mesh_setting(cls):
    assert cls().mesh == SINGLE
    assert C.override(cls(), ["mesh=data=2,model=4"]).mesh == "data=2,model=4"
    assert C.override(cls(), ["mesh=model=8"]).mesh == "data=1,model=8"  # stored in full
    with pytest.raises(C.ConfigError, match="unknown axis 'tensor'"):
        C.override(cls(), ["mesh=tensor=2"])


def test_train_command_takes_a_mesh(capsys):
    argv = ["train", "lora", "configs/lora_answerability_smoke.yaml", "--mesh", "model=8", "--print-config"]
    assert main(argv) == 0
    assert "mesh: data=1,model=8" in capsys.readouterr().out.splitlines()
    assert main(["train", "lora", "configs/lora_answerability_smoke.yaml", "--mesh", "data=0", "--print-config"]) == 2
    assert "must be positive" in capsys.readouterr().err
