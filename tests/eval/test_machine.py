"""Benchmark results name the CPU they ran on (model and the ISA features that decide dtypes)."""

from pathlib import Path

import pytest

from spanjax.runs import CPU_FEATURES, cpu_model, machine, machine_record


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="Linux only")
def test_cpu_model_names_the_model_and_its_listed_features():
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    family = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("cpu family"))
    described = cpu_model()
    assert described.startswith(name)
    assert f"(family {family} model " in described  # Zen 4 and Zen 5 share the model name
    assert described.endswith("[" + " ".join(f for f in CPU_FEATURES if f in flags) + "]")
    assert described in machine()
    assert machine_record()["processor"] == described
