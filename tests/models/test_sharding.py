"""Mesh setting, logical-axis sharding rules and the memory planner (spanjax/models/sharding.py,
spanjax/models/memory.py, spanjax/cli/memory.py).

The multi-device checks run in a subprocess with 8 fake CPU devices: this process has already
initialised JAX with one."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from spanjax.cli.memory import main as plan_memory_main
from spanjax.cli.memory import parse_size
from spanjax.models.config import ModelConfig
from spanjax.models.hf import load_hf_config
from spanjax.models.memory import abstract_params, plan_memory
from spanjax.models.sharding import (
    MeshSpec,
    cache_partition_spec,
    mesh_spec_of,
    param_partition_specs,
    parse_mesh,
    resolve_rules,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["llama-3-8b-instruct", "llama-3-70b-instruct", "granite-3.3-8b-instruct"]
TINY = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=4
)


@pytest.mark.parametrize(
    "text, spec",
    [("data=2,model=4", MeshSpec(2, 4)), ("model=3", MeshSpec(1, 3)), (" data = 8 ", MeshSpec(8, 1))],
)
def test_parse_mesh(text, spec):
    assert parse_mesh(text) == spec
    assert mesh_spec_of(text) == spec  # what EngineConfig.mesh takes: a string or a MeshSpec


@pytest.mark.parametrize(
    "text, message",
    [
        ("data=2,tensor=4", "unknown axis 'tensor'"),
        ("data=0", "must be positive"),
        ("model=-2", "must be positive"),
        ("data=2,data=4", "axis 'data' given twice"),
        ("data=two", "must be an integer"),
        ("data", "expected AXIS=SIZE"),
        ("", "empty"),
    ],
)
def test_parse_mesh_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(text)


@pytest.mark.parametrize(
    "changes, mesh, rules, message",
    [
        (dict(num_heads=9, num_kv_heads=3, intermediate_size=1536), MeshSpec(1, 3), "inference", None),  # SmolLM2
        (dict(num_heads=12, num_kv_heads=3), MeshSpec(1, 4), "inference", "num_kv_heads=3 ... model axis (4)"),
        (dict(num_heads=6, num_kv_heads=6), MeshSpec(1, 4), "inference", "num_heads=6 ... model axis (4)"),
        (dict(intermediate_size=66), MeshSpec(1, 4), "inference", "intermediate_size=66 ... model axis (4)"),
        (dict(hidden_size=30), MeshSpec(4, 1), "training", "hidden_size=30 ... data axis (4)"),
        (dict(hidden_size=30), MeshSpec(4, 1), "inference", None),  # no FSDP: the data axis splits no weight
    ],
)
def test_divisibility_error_names_the_field(changes, mesh, rules, message):
    cfg = dataclasses.replace(TINY, **changes)
    if message is None:
        resolve_rules(cfg, rules, mesh)
    else:
        with pytest.raises(ValueError, match=re.escape(message.replace("...", "is not divisible by the"))):
            resolve_rules(cfg, rules, mesh)


def test_uneven_vocab_is_replicated_and_reported():
    cfg = dataclasses.replace(TINY, vocab_size=61)
    specs = param_partition_specs(cfg, abstract_params(cfg), "inference", MeshSpec(1, 4))
    assert specs.embed == P() and specs.lm_head == P() and specs.layers.wq == P(None, None, "model")
    plan = plan_memory(cfg, MeshSpec(1, 4), 10**9, dtype="float32")
    assert plan.notes == ("vocab_size=61 replicated (not divisible by the model axis (4))",)


def test_specs_follow_the_rules():
    specs = param_partition_specs(TINY, abstract_params(TINY), "training", MeshSpec(2, 4))
    assert specs.embed == P("model", "data") and specs.lm_head == P("data", "model")
    assert specs.layers.wq == P(None, "data", "model") and specs.layers.wo == P(None, "model", "data")
    assert specs.layers.w_down == P(None, "model", "data") and specs.layers.attn_norm == P()
    assert cache_partition_spec(TINY, "inference", MeshSpec(2, 4)) == P(None, None, "model")


@pytest.mark.parametrize("rules", ["inference", "training"])
def test_planner_matches_a_count_by_hand(rules):
    """TINY on data=2,model=4 in float32, every leaf counted from the shapes by hand."""
    V, H, I, L, Hq, Hkv, D = 64, 32, 64, 2, 8, 4, 4
    m, d = 4, (2 if rules == "training" else 1)  # FSDP splits every matrix's H over data
    matrices = [V * H, H * V] + [L * x for x in (H * Hq * D, 2 * H * Hkv * D, Hq * D * H, 3 * H * I)]
    norms = H + 2 * L * H
    params = 4 * (sum(matrices) / m / d + norms)
    kv_page = 2 * L * 16 * (Hkv // m) * D * 2  # bfloat16 cache, page_size 16
    T, S = 64, 4
    act = 4 * T * (4 * H + (Hq + 2 * Hkv) * D // m + Hq * D // m + 3 * I // m) + 4 * T * 2 * I // m + 4 * S * 2 * V // m

    memory = 10**6
    plan = plan_memory(
        TINY, MeshSpec(2, 4), memory, dtype="float32", cache_dtype="bfloat16",
        max_tokens_per_step=T, max_seqs_per_step=S, rules=rules,
    )  # fmt: skip
    assert plan.param_bytes_per_device == params
    assert plan.param_bytes_total == 4 * (2 * V * H + norms + L * (2 * H * Hq * D + 2 * H * Hkv * D + 3 * H * I))
    assert plan.kv_bytes_per_page_per_device == kv_page and plan.kv_bytes_per_token_per_device == kv_page // 16
    assert plan.activation_bytes_per_device == act
    pages = (int(memory * 0.9) - params - act) // kv_page
    assert (plan.max_pages, plan.max_tokens, plan.pool_bytes_per_device) == (pages, (pages - 1) * 16, pages * kv_page)


def test_planner_says_when_nothing_fits():
    plan = plan_memory(TINY, MeshSpec(), 20_000, dtype="float32")
    assert not plan.fits and plan.max_pages == 0 and "add devices" in plan.notes[-1]
    assert json.loads(plan.to_json())["fits"] is False


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_plan(name, capsys):
    cfg = load_hf_config(str(ROOT / "configs" / "models" / name))
    assert cfg.num_kv_heads == 8 and cfg.head_dim == 128
    path = str(ROOT / "configs" / "models" / name / "config.json")
    assert plan_memory_main(["--model", path, "--mesh", "data=1,model=8", "--device-memory", "80GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["kv_bytes_per_token_per_device"] == 2 * cfg.num_layers * 128 * 2


def test_cli_sizes_and_errors(capsys):
    assert parse_size("80GB") == 80 * 10**9 and parse_size("80GiB") == 80 * 2**30 and parse_size("16e9") == 16 * 10**9
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("80 parsecs")
    path = str(ROOT / "configs" / "models" / "llama-3-8b-instruct")
    assert plan_memory_main(["--model", path, "--mesh", "model=16", "--device-memory", "80GB"]) == 2
    assert "num_kv_heads=8 is not divisible by the model axis (16)" in capsys.readouterr().err


# Runs with 8 fake CPU devices: shards a tiny model on several meshes, checks every device
# holds what the planner says, and that a jitted forward on the sharded weights agrees.
_SCRIPT = r"""
import json, math
import jax, jax.numpy as jnp, numpy as np
from spanjax.models import llama
from spanjax.models.config import ModelConfig
from spanjax.models.memory import plan_memory
from spanjax.models.sharding import MeshSpec, cache_partition_specs, make_mesh, named_shardings, shard_params

assert len(jax.devices()) == 8
cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=16,
                  num_kv_heads=8, head_dim=4)
params = jax.jit(llama.init_params, static_argnums=0)(cfg, jax.random.key(0))  # one compile, not one per op
tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8))
positions = np.broadcast_to(np.arange(8), (2, 8))
fwd = jax.jit(lambda p, c: llama.compute_logits(p, cfg, llama.forward_dense(p, cfg, tokens, positions, c)[0]))
want = np.asarray(fwd(params, llama.init_dense_cache(cfg, 2, 8)))
out = []
for data, model, rules in [(1, 8, "inference"), (2, 4, "inference"), (8, 1, "training"), (2, 4, "training")]:
    spec = MeshSpec(data, model)
    mesh = make_mesh(spec)
    plan = plan_memory(cfg, spec, 10**9, dtype="float32", cache_dtype="float32", rules=rules)
    sharded = shard_params(params, cfg, mesh, rules)
    held = {d: 0 for d in jax.devices()}
    for leaf in jax.tree.leaves(sharded):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    pool_shardings = named_shardings(cache_partition_specs(cfg, rules, mesh), mesh)
    cache = jax.jit(lambda: llama.init_paged_cache(cfg, 6, 16), out_shardings=pool_shardings)()
    pool = {d: 0 for d in jax.devices()}
    for leaf in jax.tree.leaves(cache):
        for shard in leaf.addressable_shards:
            pool[shard.device] += shard.data.nbytes
    got = np.asarray(fwd(sharded, llama.init_dense_cache(cfg, 2, 8)))
    out.append(dict(mesh=str(spec), rules=rules, held=sorted(set(held.values())), planned=plan.param_bytes_per_device,
                    pool=sorted(set(pool.values())), planned_pool=6 * plan.kv_bytes_per_page_per_device,
                    err=float(np.abs(got - want).max()), scale=float(np.abs(want).max())))
print(json.dumps(out))
"""


def test_sharded_params_on_eight_fake_devices():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # conftest's -O0 kept
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for r in results:
        assert r["held"] == [r["planned"]], r  # every device holds exactly the planned bytes
        assert r["pool"] == [r["planned_pool"]], r
        assert r["err"] <= 1e-5, r
        assert r["scale"] > 1e-3, r  # the comparison is not of zeros
