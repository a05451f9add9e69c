"""The persistent compilation cache: a second process running the same engine step shapes
neither traces nor compiles its steps (their traced programs are read back, aot.py)
and writes nothing new; "off" writes nothing. Each run is a fresh interpreter, as a user's
second CLI call is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import collections, json, sys
import jax.monitoring
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name.rsplit("/", 1)[-1]]))
from tiny_byte import tiny_config, tiny_model
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.executor import run_query

model = tiny_model(seed=5, cfg=tiny_config(max_position_embeddings=1024))
if len(sys.argv) > 2:  # block-quantized layers
    from tiny_byte import quantized_layers
    model = quantized_layers(model)
engine = Engine(model,
                EngineConfig(num_pages=64, page_size=4, max_tokens_per_step=32, max_seqs_per_step=4,
                             attention="reference", compilation_cache=sys.argv[1],
                             quantized_lanes=sys.argv[-1] != "no-lanes"))
q = {"g": {"model": "tiny", "max_tokens": 4, "input": {"cross": [
    {"plus": [{"user": "first document"}, {"user": "second one"}]}, {"user": "question?"}]}}}
res = run_query(engine, json.dumps(q))
out = {**engine.stats(), "text": res.final.text, "hits": events["cache_hits"], "misses": events["cache_misses"]}
print(json.dumps(out))
"""


def run(setting: str, tmp_path: Path, *extra: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, setting, *extra],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_reads_every_step_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = run(str(cache), tmp_path)
    entries = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    steps = [e for e in entries if e.startswith("steps/")]
    assert first["compilations"] == len(steps) > 0 and first["programs_preloaded"] == 0  # one file per bucket
    second = run(str(cache), tmp_path)
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == entries  # nothing new written
    assert first["misses"] > 0 and second["misses"] == 0
    # The second process compiles every stored step at construction (persistent-cache reads, in
    # preload_s); the query then neither traces nor compiles (trace_s and compile_s are its own).
    assert second["compilations"] == 0 and second["programs_preloaded"] == len(steps)
    assert second["trace_s"] == second["compile_s"] == 0.0 and second["text"] == first["text"]

    off = tmp_path / "off"
    run("off", tmp_path)
    assert not off.exists() and sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == entries


def test_quantized_steps_read_back_with_the_weights_they_were_traced_for(tmp_path):
    """An engine with block-quantized weights and one without their lane copies take different
    weight trees, so their stored programs have different scopes: a later engine with the copies
    never takes a program stored without them (called with the other tree, it would fail on its
    argument count). It traces its own, and a third process reads those back."""
    cache = tmp_path / "cache"
    plain = run(str(cache), tmp_path, "quantized", "no-lanes")
    one_kind = {p.name for p in (cache / "steps").iterdir()}
    assert plain["compilations"] == len(one_kind) >= 2 and len({n.split("-")[1] for n in one_kind}) == 1
    first = run(str(cache), tmp_path, "quantized")
    steps = {p.name for p in (cache / "steps").iterdir()}
    assert first["compilations"] == plain["compilations"] and len({n.split("-")[1] for n in steps}) == 2
    second = run(str(cache), tmp_path, "quantized")
    assert second["compilations"] == 0 and second["text"] == first["text"] == plain["text"]


def test_stored_programs_are_keyed_on_what_the_step_closes_over(tmp_path):
    """Two models with the same shapes but another constant (rope_theta) never share a program."""
    import jax.numpy as jnp
    from tiny_byte import tiny_config

    from spanjax.engine.aot import StepPrograms

    fixed, bucket = (jnp.zeros((2, 3)),), ("bucket",)
    a = StepPrograms(tmp_path, "step", context=repr(tiny_config()))
    b = StepPrograms(tmp_path, "step", context=repr(tiny_config(rope_theta=10000.0)))
    assert a.path(fixed, bucket) != b.path(fixed, bucket)
    assert a.path(fixed, bucket) == StepPrograms(tmp_path, "step", context=repr(tiny_config())).path(fixed, bucket)
    assert a.path(fixed, bucket) != a.path((jnp.zeros((2, 4)),), bucket)  # the weights' shapes


def test_preload_compiles_only_the_most_recently_loaded_programs(tmp_path):
    """A cache directory that collected many buckets preloads at most `limit` of them, the
    most recently loaded first (each compiled program costs the process memory maps); the
    others still load on first use."""
    import jax.numpy as jnp

    from spanjax.engine.aot import StepPrograms

    programs = StepPrograms(tmp_path, "t")
    fixed = (jnp.ones(3),)
    for n in (1, 2, 3, 4):
        programs.load_or_export(lambda w, x: w.sum() + x, (*fixed, jnp.ones(n)), fixed=1, bucket=n)
    path = lambda n: programs.path(fixed, n)  # noqa: E731
    for i, n in enumerate((3, 1, 4, 2)):  # loaded in this order: 2 last
        os.utime(path(n), (1_000_000 + i, 1_000_000 + i))
    assert sorted(programs.preload(fixed, limit=2)) == [2, 4]
    step = programs.load_or_export(lambda w, x: w.sum() + x, (*fixed, jnp.ones(1)), fixed=1, bucket=1)
    assert float(step(*fixed, jnp.ones(1))[0]) == 4.0
    assert len(programs.preload(fixed)) == 4  # the default cap is above this


def test_runner_keeps_only_the_most_recently_used_loaded_programs(monkeypatch):
    """A long process meeting many buckets drops the least recently used loaded program beyond
    `aot.LOADED_MAX` (each holds memory maps; dropped, they are freed) and loads it again
    from disk when it comes back. The bound is the process's, across engines: a second runner's
    programs push out the first's, and a runner that is gone holds none of it."""
    import collections
    import gc

    import numpy as np
    from tiny_byte import tiny_config

    from spanjax.engine import aot
    from spanjax.engine.runner import StepRunner

    class Programs:  # a StepPrograms that counts loads
        def __init__(self):
            self.loads = []

        def load_or_export(self, fn, args, fixed, bucket, donate=()):
            self.loads.append(args[2].shape[0])
            return lambda *a: args[2].shape[0]

    monkeypatch.setattr(aot, "LOADED_MAX", 2)
    monkeypatch.setattr(aot, "_loaded", collections.OrderedDict())  # other tests' runners out of it
    programs = Programs()
    runner = StepRunner(tiny_config(), max_tokens=16, max_seqs=2, max_pages_per_seq=4, programs=programs)
    for n in (1, 2, 1, 3, 1, 2):  # 2 is dropped when 3 comes (1 was used after it)
        assert runner._step_for((None, None, np.zeros(n)))() == n
    assert programs.loads == [1, 2, 3, 2] and len(runner._stored) == 2
    other = StepRunner(tiny_config(), max_tokens=16, max_seqs=2, max_pages_per_seq=4, programs=programs)
    assert other._step_for((None, None, np.zeros(4)))() == 4  # pushes out the first runner's 1
    assert len(runner._stored) == 1 and len(other._stored) == 1
    assert runner._step_for((None, None, np.zeros(1)))() == 1 and programs.loads[-1] == 1  # loaded again
    del other
    gc.collect()
    assert runner._step_for((None, None, np.zeros(3)))() == 3
    assert len(runner._stored) == 2  # the gone runner's slot is free: 1 (recent) and 3 kept


def test_on_means_the_default_location_not_a_directory_named_on(monkeypatch, tmp_path):
    from spanjax import compilation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    default = compilation.cache_dir("")
    assert default.parent == tmp_path / "spanjax"
    for value in ("on", "ON", "true", "1"):
        assert compilation.cache_dir(value) == default
    assert compilation.cache_dir("off") is None
    assert compilation.cache_dir(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
