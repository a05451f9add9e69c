"""The engine on a jax.sharding.Mesh (EngineConfig.mesh, EngineReplicas) against the single-device engine.

The multi-device checks run this file as a script in a subprocess with 8 fake CPU devices (this
process has already initialised JAX with one): one process for every mesh, tiny dims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spanjax.config import ConfigError, override
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.replicas import EngineReplicas, merge_round_robin, split_round_robin
from spanjax.models.sharding import MeshSpec

HERE = Path(__file__).resolve().parent
PAGE = 4
MESHES = [(1, 8), (2, 4), (8, 1)]


def test_mesh_setting_parses_and_checks():
    assert EngineConfig().mesh is None and EngineConfig().mesh_spec is None
    assert EngineConfig(mesh="model=8").mesh_spec == MeshSpec(1, 8)
    assert EngineConfig(mesh=MeshSpec(2, 4)).mesh_spec == MeshSpec(2, 4)
    with pytest.raises(ValueError, match="unknown axis 'tensor'"):
        EngineConfig(mesh="tensor=2")
    # Through the experiment configs' dotted overrides (the `engine` section is an EngineConfig).
    assert override(EngineConfig(), ["mesh=data=2,model=4"]).mesh_spec == MeshSpec(2, 4)
    assert override(EngineConfig(), ["mesh={data: 2, model: 4}"]).mesh == MeshSpec(2, 4)
    with pytest.raises(ConfigError, match="size of 'model' must be positive"):
        override(EngineConfig(), ["mesh=model=0"])


def test_one_engine_is_one_data_replica():
    import tiny_byte

    model = tiny_byte.tiny_model()
    with pytest.raises(ValueError, match="EngineReplicas .* runs data=2"):
        Engine(model, EngineConfig(num_pages=16, mesh="data=2,model=4"))
    # A one-device mesh is the single-device engine, unchanged.
    assert Engine(model, EngineConfig(num_pages=16, mesh="data=1,model=1")).mesh is None


def test_cli_mesh_flag(capsys):
    from spanjax.cli.main import main

    root = HERE.parents[1]
    assert main(["query", str(root / "examples" / "rag.json"), "--mesh", "tensor=2"]) == 2
    assert "unknown axis 'tensor'" in capsys.readouterr().err
    # run / eval: --mesh is the override engine.mesh=...
    assert main(["run", str(root / "configs" / "ttft_rag.yaml"), "--mesh", "data=2,model=4", "--print-config"]) == 0
    assert "mesh: data=2,model=4" in capsys.readouterr().out


def test_replicas_split_and_merge_in_order():
    items = list(range(11))
    parts = split_round_robin(items, 3)
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert merge_round_robin(parts) == items
    assert merge_round_robin(split_round_robin([], 4)) == []

    replicas = EngineReplicas.__new__(EngineReplicas)  # fake engines: `map` only hands them to fn
    replicas.engines = ["e0", "e1", "e2"]
    seen = []
    out = replicas.map(lambda e, x: seen.append((e, threading.current_thread().name)) or (e, x * x), items)
    assert out == [(f"e{i % 3}", i * i) for i in items]
    assert {name for _, name in seen} == {f"engine-replica-{i}" for i in range(3)}

    def fail(engine, x):
        if x == 4:
            raise RuntimeError("item 4")
        return x

    with pytest.raises(RuntimeError, match="item 4"):
        replicas.map(fail, items)

    # Groups: every item of a group on one replica, groups dealt in order of first appearance.
    groups = ["a", "a", "b", "c", "b", "d", "a"]
    assert replicas.assign(len(groups), groups) == [[0, 1, 5, 6], [2, 4], [3]]
    out = replicas.map(lambda e, x: (e, x), list(range(7)), groups=groups)
    assert out == [("e0", 0), ("e0", 1), ("e1", 2), ("e2", 3), ("e1", 4), ("e0", 5), ("e0", 6)]
    with pytest.raises(ValueError, match="2 groups for 3 items"):
        replicas.map(lambda e, x: x, [1, 2, 3], groups=["a", "b"])

    # After one replica's exception the others finish their item in flight and start no other.
    started, finished = threading.Barrier(3), []

    def stop_early(engine, x):
        if x < 3:
            started.wait(5)  # every replica is in its first item
        if x == 0:
            raise RuntimeError("replica 0 failed")
        threading.Event().wait(0.2)
        finished.append(x)
        return x

    with pytest.raises(RuntimeError, match="replica 0 failed"):
        replicas.map(stop_early, items)
    assert sorted(finished) == [1, 2]


def test_engine_on_meshes_of_eight_fake_devices():
    """Meshes (1, 8), (2, 4), (8, 1): the engine's logits equal the single-device engine's within
    1e-5 on span-query batches (cross, plus, both attentions and positions, prefill chunks and
    decode); the pool is split by kv heads and never gathered; sharded span attention equals the
    reference; a model whose kv heads do not divide the axis is refused naming the field."""
    proc = subprocess.run(
        [sys.executable, __file__], env=_env(8, fast_compile=True), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for mesh in MESHES:
        r = out[f"{mesh[0]},{mesh[1]}"]
        assert r["replicas"] == mesh[0] and r["items"] == 8, r
        assert r["tokens_equal"] and r["err"] <= 1e-5, r
        assert r["scale"] > 1e-2, r  # the comparison is not of zeros
        assert r["pool_shard"][2] == 8 // mesh[1], r  # kv heads per device
        assert r["pool_collectives"] == [], r
        assert r["placed"] and r["devices"] == [list(range(i * mesh[1], (i + 1) * mesh[1])) for i in range(mesh[0])], r
    assert max(out["attention_err"]) <= 1e-5, out["attention_err"]
    assert "num_kv_heads=2 is not divisible by the model axis (8)" in out["kv_heads_error"]


@pytest.mark.slow
def test_smollm2_on_model_3_gives_the_single_device_tokens(smollm2_gguf_path):
    """SmolLM2-135M (9 query / 3 kv heads) on `model=3` (3 fake devices): the README's RAG example
    (examples/rag.json) through run_query gives the one-device engine's greedy tokens."""
    proc = subprocess.run(
        [sys.executable, __file__, "smollm2"], env=_env(3), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["one_device"]) > 10 and out["model=3"] == out["one_device"], out
    assert out["pool_shard_kv_heads"] == 1


def _env(devices: int, fast_compile: bool = False) -> dict:
    # Optimization level 0 halves XLA's compile time, most of the tiny model's test (the same for
    # every mesh); SmolLM2's is mostly compute, which it slows down.
    flags = f"--xla_force_host_platform_device_count={devices}"
    return dict(
        os.environ,
        XLA_FLAGS=flags + (" --xla_backend_optimization_level=0" if fast_compile else ""),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )


# ----------------------------------------------------------------------------
# The subprocesses: fake CPU devices.


def _smollm2_worker():
    from spanjax.engine.executor import run_query
    from spanjax.models.loading import load_model

    model = load_model("smollm2-135m")
    query = (HERE.parents[1] / "examples" / "rag.json").read_text()
    out = {}
    for name, mesh in (("one_device", None), ("model=3", "model=3")):
        # Scanned layers: the unrolled 30-layer step compiles ~10x slower (test_engine_smollm2.py).
        engine = Engine(model, EngineConfig(num_pages=256, mesh=mesh, layer_loop="scan"))
        out[name] = run_query(engine, query).final.token_ids
    out["pool_shard_kv_heads"] = engine.cache.k.sharding.shard_shape(engine.cache.k.shape)[2]
    print(json.dumps(out))


def _batches(tok):
    """8 batches of span queries, each submitted at once (so steps are ragged, mixed prefill/decode)."""
    import numpy as np
    from test_engine import POLICIES, rag_query, random_prompt, words

    from spanjax.query import ast as A
    from spanjax.query.lower import lower

    rng = np.random.default_rng(4)
    batches = []
    for i in range(8):
        attention, positions = POLICIES[i % len(POLICIES)]
        gs = [A.G("tiny", random_prompt(rng), attention=attention, positions=positions) for _ in range(2)]
        docs = [A.Message("user", words(rng, 8, 20)) for _ in range(3)]
        gs.append(rag_query(docs, rng.permutation(3), positions))
        batches.append([lower(g, tok, model="tiny", page_size=PAGE) for g in gs])
    return batches


def _one_shape(engine):
    """One bucket per axis: every step pads to one shape, so each engine compiles two programs (a
    mixed step and a decode-only one), not one per bucket; 12 engines compile, which is most of
    this test's time. Padding does not change results."""
    runner = engine.runner
    runner.token_buckets, runner.seq_buckets, runner.page_buckets = [32], [8], [64]
    return engine


def _run(engine, plans):
    """Every plan's generated tokens and the logits of every sampled token."""
    import numpy as np

    from spanjax.engine.sampling import SamplingParams

    _one_shape(engine)
    engine.clear_cache()  # every batch from a cold cache: sequential reuse is approximate by design
    # The last plan samples (seeded, top-k and top-p): the draw is the same however the logits are split.
    samplings = [SamplingParams(max_tokens=5, ignore_eos=True)] * (len(plans) - 1)
    samplings.append(SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.8, top_k=50, top_p=0.9, seed=1))
    reqs = [engine.submit(p, s, keep_logits=True) for p, s in zip(plans, samplings)]
    engine.run_until_done(reqs)
    return [(r.generated, np.stack(r.logits)) for r in reqs]


def _pool_collectives(engine):
    """Collectives in the compiled mixed step that move as much as one layer of a device's share
    of the pool: with the pool split by kv heads there are none (each device writes and reads its
    own heads). The legitimate ones (the [T, H] all-reduces after attention and the MLP, the
    logits' for sampling) are far smaller than a layer of the pool; a gather or all-to-all of
    the pool is at least that large."""
    import re

    import numpy as np

    from spanjax.engine.sampling import SamplingRows
    from spanjax.models.llama import SpanBatchMeta

    runner, cache = engine.runner, engine.cache
    T, S, M = runner.token_buckets[-1], runner.seq_buckets[-1], runner.page_buckets[-1]
    z = lambda *shape: np.zeros(shape, np.int32)
    meta = SpanBatchMeta(z(S, M), z(S, M), z(S, M), z(S + 1), z(T))
    sampling = SamplingRows(np.zeros(S, np.float32), z(S), np.ones(S, np.float32), np.zeros(S, np.uint32), z(S))
    args = (engine.params, cache, z(T), z(T), meta, z(S), sampling, z(S), z(T) - 1, None, None)
    hlo = runner._step.lower(*args).compile().as_text()
    layer_share = int(np.prod(cache.k.sharding.shard_shape(cache.k.shape))) // cache.num_layers
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(", line)
        if m:
            elems = sum(int(np.prod([int(d) for d in dims.split(",")])) for dims in re.findall(r"\[([\d,]+)\]", m[1]))
            if elems >= layer_share:
                found.append(line.strip()[:200])
    return found


def _worker():
    import dataclasses

    import jax
    import numpy as np
    import tiny_byte

    from spanjax.kernels.span_attention import get_attention_impl, span_attention_reference
    from spanjax.kernels.span_attention.sharded import shard_heads
    from spanjax.kernels.span_attention.testing import args_kwargs, make_batch
    from spanjax.models.sharding import make_mesh

    assert len(jax.devices()) == 8
    # 8 query and 8 kv heads (model=8 needs both to divide); vocab 260 does not divide 8
    # (replicated there) but divides 4 (split there).
    cfg = tiny_byte.tiny_config(num_heads=8, num_kv_heads=8, head_dim=4, max_position_embeddings=1024)
    model = tiny_byte.tiny_model(seed=3, cfg=cfg)
    config = EngineConfig(num_pages=512, page_size=PAGE, max_tokens_per_step=32, max_seqs_per_step=8)
    batches = _batches(model.tokenizer)
    single = Engine(model, config)
    want = [_run(single, b) for b in batches]
    out = {}
    for data, model_axis in MESHES:
        replicas = EngineReplicas(model, dataclasses.replace(config, mesh=f"data={data},model={model_axis}"))
        got = replicas.map(_run, batches)
        pairs = [(g, w) for gb, wb in zip(got, want) for g, w in zip(gb, wb)]
        engine = replicas[0]
        out[f"{data},{model_axis}"] = dict(
            replicas=len(replicas),
            items=len(got),
            tokens_equal=all(g[0] == w[0] for g, w in pairs),
            err=max(float(np.abs(g[1] - w[1]).max()) for g, w in pairs),
            scale=max(float(np.abs(w[1]).max()) for _, w in pairs),
            pool_shard=list(engine.cache.k.sharding.shard_shape(engine.cache.k.shape)),
            pool_collectives=_pool_collectives(engine) if model_axis > 1 else [],
            # Each replica's mesh, and its weights and pool on exactly that mesh's devices.
            devices=[sorted(d.id for d in e.mesh.devices.flat) for e in replicas.engines],
            placed=all(
                {d.id for x in jax.tree.leaves((e.params, e.cache)) for d in x.sharding.device_set}
                == {d.id for d in e.mesh.devices.flat}
                for e in replicas.engines
            ),
        )

    # Sharded span attention (shard_map around the XLA path) against the reference: a mixed
    # prefill batch (GQA 2) and a decode-only one, on the model axes of (2, 4) and (1, 8).
    errs = []
    rng = np.random.default_rng(0)
    mixed = [dict(prefix=21, q_len=5, tail=9), dict(prefix=7, children=[12, 3, 20], q_len=4), dict(prefix=33)]
    for spec in (MeshSpec(2, 4), MeshSpec(1, 8)):
        attention = jax.jit(shard_heads(get_attention_impl("xla"), make_mesh(spec)), static_argnames="sm_scale")
        for seqs in (mixed, [dict(prefix=30), dict(prefix=5, children=[9, 4]), dict(prefix=0, q_len=0)]):
            b = make_batch(rng, seqs, num_q_heads=16, num_kv_heads=8, head_dim=8, page_size=PAGE, extra_tokens=2)
            args, kw = args_kwargs(b)
            if all(s.get("q_len", 1) <= 1 for s in seqs):
                args[3] = args[3].replace(max_q_len=1)  # the XLA path's decode shape
            errs.append(float(np.abs(np.asarray(attention(*args, **kw)) - span_attention_reference(*args, **kw)).max()))
    out["attention_err"] = errs

    try:
        bad = tiny_byte.tiny_model(cfg=tiny_byte.tiny_config(num_heads=8, num_kv_heads=2))
        Engine(bad, dataclasses.replace(config, mesh="model=8"))
        out["kv_heads_error"] = ""
    except ValueError as e:
        out["kv_heads_error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1:] == ["smollm2"]:
        _smollm2_worker()
    else:
        _worker()
