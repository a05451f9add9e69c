"""The locality evaluation on engine replicas (`engine.mesh` data > 1, eval/locality.py): on 2
fake CPU devices (a subprocess: this process has already started JAX with one device) a
data=2,model=1 run gives the one-device run's items, with every chunk of questions on one
replica (its documents cached across gold positions there); a replica that fails stops the
run and the items finished stay. The TTFT tasks refuse data > 1, and a
mesh that is not the number of devices is refused, in one line before any run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parents[1] / "configs"
# Run-state fields (timing, batch, what the cache held) differ between runs by design.
COMPARED_FIELDS = ("key", "variant", "question", "position", "output", "correct", "prompt_tokens")


def smoke_overrides(out_dir, *extra: str) -> list[str]:
    # tests/eval/test_locality.py's tiny run; batch_questions=1: its 2 questions are 2 chunks.
    return [
        f"out_dir={out_dir}",
        "model=tiny",
        "engine.page_size=8",
        "engine.attention=reference",
        "eval.batch_questions=1",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")


def test_replica_run_gives_the_one_device_items(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",  # conftest's -O0 kept
        JAX_PLATFORMS="cpu",
        SPANJAX_NO_PROGRESS="1",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["one_device"], out["replicas"]
    assert len(one) == 18 and one == two  # outputs, correctness, prompts: every item the same
    assert out["replica_steps"] and all(s > 0 for s in out["replica_steps"]) and len(out["replica_steps"]) == 2
    # Each question's batches ran on one replica, which reused its documents across positions.
    assert out["span_reuse_min_cached"] > 0
    # A replica failing mid-run: the error reaches the caller, the other replica stops after its
    # batch in flight, and the finished batches stay (each as the full run has it).
    failed = out["failed"]
    assert "replica failed" in failed["error"]
    assert 2 <= failed["lines"] < 18 and len(failed["kept"]) == failed["lines"]
    assert failed["kept"] == {k: one[k] for k in failed["kept"]}


def test_ttft_tasks_refuse_replicas_in_one_line(tmp_path, capsys):
    from spanjax.cli.main import main

    for preset, task in (("ttft_rag_smoke.yaml", "ttft_rag"), ("ttft_nested_smoke.yaml", "ttft_nested")):
        code = main(["run", str(CONFIGS / preset), f"out_dir={tmp_path}", "--mesh", "data=2,model=1"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"task {task}: engine.mesh=data=2,model=1 asks for 2 engine replicas" in err
    # locality takes data > 1, but its mesh must be the number of devices (this process has one).
    code = main(["run", str(CONFIGS / "locality_nq_smoke.yaml"), f"out_dir={tmp_path}", "--mesh", "data=2,model=1"])
    err = capsys.readouterr().err
    assert code == 2 and "needs 2 devices, there are 1" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before any run directory was made


# ----------------------------------------------------------------------------
# The subprocess: 2 fake CPU devices.


def _worker(out_dir: Path) -> None:
    import jax
    import tiny_byte

    from spanjax.engine.engine import Engine
    from spanjax.engine.runner import StepRunner
    from spanjax.eval.experiments import load_config, run
    from spanjax.runs import ITEMS_FILE, RunDir, load_items

    assert jax.device_count() == 2
    # Two buckets per axis (a decode's and a prefill's): each engine compiles about three steps,
    # not one per shape; 5 engines compile, most of this test's time. Padding does not change results.
    init = StepRunner.__init__

    def few_shapes(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.token_buckets, self.seq_buckets = [16, self.token_buckets[-1]], [1, self.seq_buckets[-1]]
        self.page_buckets = [64]

    StepRunner.__init__ = few_shapes
    model = tiny_byte.tiny_model(seed=3, cfg=tiny_byte.tiny_config(rope_theta=10000.0))
    smoke = CONFIGS / "locality_nq_smoke.yaml"

    def items(d) -> dict:
        return {str(k): {f: r[f] for f in COMPARED_FIELDS} for k, r in sorted(load_items(d).items())}

    _, one = run(load_config(smoke, smoke_overrides(out_dir / "one")), model=model)
    cfg = load_config(smoke, smoke_overrides(out_dir / "two", "engine.mesh=data=2,model=1"))
    res, two = run(cfg, model=model)
    done = load_items(two)
    span = [r["cached_tokens"] for r in done.values() if r["variant"] == "span-parallel-isolated" and r["position"] > 0]

    # Replica 0 raises in its third batch; replica 1 stops after its current one.
    real, calls = Engine.run_until_done, []

    def failing(self, reqs=None):
        if threading.current_thread().name == "engine-replica-0":
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("replica failed")
        return real(self, reqs)

    failing_cfg = load_config(smoke, smoke_overrides(out_dir / "failed", "engine.mesh=data=2,model=1"))
    Engine.run_until_done = failing
    try:
        run(failing_cfg, model=model)
        error = ""
    except RuntimeError as e:
        error = str(e)
    Engine.run_until_done = real
    failed_dir = next((out_dir / "failed").iterdir())
    kept = len((failed_dir / ITEMS_FILE).read_text().splitlines())

    print(
        json.dumps(
            {
                "one_device": items(one),
                "replicas": items(two),
                "replica_steps": [s["steps"] for s in res["engine"]["replicas"]],
                "span_reuse_min_cached": min(span),
                "failed": {"error": error, "lines": kept, "kept": items(RunDir(failed_dir, None, True))},
            }
        )
    )


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
