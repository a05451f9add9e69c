"""Attention-locality eval and the run machinery on a tiny random model
(byte tokenizer): metric normalization, Wilson intervals, example building,
determinism (same config + seed -> same numbers), resume after an interrupt,
and the nested-TTFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_byte
from tiny_byte import tiny_config

from spanjax.config import ConfigError
from spanjax.eval import locality as L
from spanjax.eval.experiments import load_config, run
from spanjax.runs import ITEMS_FILE, load_items, open_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_byte.tiny_model(seed=3, cfg=tiny_config(rope_theta=10000.0))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")


def smoke_cfg(tmp_path, *extra):
    # Byte tokens: 48-token documents, a small pool; "tiny" names the model in cache keys.
    return load_config(
        CONFIGS / "locality_nq_smoke.yaml",
        [f"out_dir={tmp_path}", "model=tiny", "engine.page_size=8", "engine.attention=reference", *extra],
    )


# ---------------------------------------------------------------------------- metric
# (answer normalization and the examples: tests/tasks/test_task_data.py)


def test_wilson_interval():
    lo, hi = L.wilson(0, 10)
    assert lo == 0 and 0.25 < hi < 0.35
    lo, hi = L.wilson(50, 100)
    assert abs((lo + hi) / 2 - 0.5) < 1e-9 and abs(lo - 0.4038) < 1e-3
    assert L.wilson(0, 0) == (0.0, 1.0)


# ---------------------------------------------------------------------------- examples


def test_work_order_batches_one_position_per_chunk(tmp_path):
    cfg = smoke_cfg(tmp_path)
    exs = L.locality_examples(cfg.eval, cfg.seed)
    batches = L.work_order(cfg, exs)
    keys = [k for b in batches for k in b]
    # span-parallel-isolated's query is the same at every gold position: run at position 0 only
    assert len(keys) == len(set(keys)) == 2 * 2 * 3 + 2
    assert {p for v, _, p in keys if v == "span-parallel-isolated"} == {0}
    assert all(len({(v, p) for v, _, p in b}) == 1 for b in batches)
    assert len(L.scope(cfg)) == 3 * 2 * 3  # recorded at every position
    every = smoke_cfg(tmp_path, "eval.order_invariant_once=false")
    assert {k for b in L.work_order(every, exs) for k in b} == L.scope(cfg)


# ---------------------------------------------------------------------------- runs


def test_same_config_same_numbers_and_outputs(tiny_model, tmp_path):
    cfg = smoke_cfg(tmp_path)
    r1, d1 = run(cfg, model=tiny_model)
    r2, d2 = run(cfg, model=tiny_model)
    assert d1.path != d2.path
    assert r1["accuracy"] == r2["accuracy"] or _strip_timing(r1) == _strip_timing(r2)
    out = lambda d: {
        tuple(r["key"]): r["output"] for r in map(json.loads, (d.path / ITEMS_FILE).read_text().splitlines())
    }
    assert out(d1) == out(d2) and len(out(d1)) == 18
    for name in ("config.yaml", "results.json", "log.txt", "accuracy.png", "summary.md"):
        assert (d1.path / name).stat().st_size > 0
    res = json.loads((d1.path / "results.json").read_text())
    assert set(res["accuracy"]) == set(cfg.eval.variants)
    row = res["accuracy"]["stock"]["per_position"][0]
    assert row["n"] == 2 and len(row["ci95"]) == 2
    assert load_config(d1.path / "config.yaml") == cfg  # the stored config is the resolved one
    # Span variants reuse document pages across gold positions.
    recs = [r for r in load_items(d1).values() if r["variant"] == "span-sequential" and r["position"] > 0]
    assert all(r["cached_tokens"] > 0 for r in recs)
    # The once-per-question variant's copies are its position-0 items; "all" counts those once.
    items = load_items(d1)
    for q in (0, 1):
        first = items[("span-parallel-isolated", q, 0)]
        assert "computed_at" not in first
        for p in (1, 2):
            copy = items[("span-parallel-isolated", q, p)]
            assert copy["computed_at"] == 0 and copy["output"] == first["output"]
    assert res["accuracy"]["span-parallel-isolated"]["n"] == 2 and res["accuracy"]["stock"]["n"] == 6


def _strip_timing(r):
    return {v: [(x["correct"], x["n"]) for x in t["per_position"]] for v, t in r["accuracy"].items()}


def test_interrupt_then_resume_skips_finished_items(tiny_model, tmp_path, monkeypatch):
    from spanjax.engine.engine import Engine

    cfg = smoke_cfg(tmp_path)
    calls = {"n": 0}
    real = Engine.run_until_done

    def flaky(self, reqs=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, reqs)

    monkeypatch.setattr(Engine, "run_until_done", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, model=tiny_model)
    run_dir = next(Path(tmp_path).iterdir())
    lines = (run_dir / ITEMS_FILE).read_text().splitlines()
    assert len(lines) == 6  # three batches of 2 finished before the interrupt
    with open(run_dir / ITEMS_FILE, "a") as f:
        f.write('{"key": ["stock", 0, ')  # a torn line from a kill mid-write is ignored

    calls["n"] = -100
    submitted = []
    real_submit = Engine.submit
    monkeypatch.setattr(
        Engine, "submit", lambda self, plan, *a, **k: submitted.append(plan) or real_submit(self, plan, *a, **k)
    )
    res, d = run(cfg, resume=run_dir, model=tiny_model)
    assert d.path == run_dir and len(submitted) == 14 - 6  # span-parallel-isolated: position 0 only
    assert sum(t["n"] for t in res["accuracy"].values()) == 14
    # A different config cannot resume that directory.
    with pytest.raises(ConfigError, match="config differs.*eval.max_tokens"):
        open_run(smoke_cfg(tmp_path, "eval.max_tokens=9"), resume=run_dir)


def test_resume_with_more_questions_keeps_finished_items(tiny_model, tmp_path, monkeypatch):
    from spanjax.engine.engine import Engine

    small = smoke_cfg(tmp_path, "eval.num_questions=1")
    _, d = run(small, model=tiny_model)
    first = {k: r["output"] for k, r in load_items(d).items()}
    assert len(first) == 9 and {q for _, q, _ in first} == {0}  # 7 computed, 2 copies
    submitted = []
    real_submit = Engine.submit
    monkeypatch.setattr(
        Engine, "submit", lambda self, plan, *a, **k: submitted.append(plan) or real_submit(self, plan, *a, **k)
    )
    res, d2 = run(smoke_cfg(tmp_path), resume=d.path, model=tiny_model)  # num_questions=2: only question 1 is new
    assert d2.path == d.path and len(submitted) == 7
    assert all(r["n"] == 2 for t in res["accuracy"].values() for r in t["per_position"])
    assert {k: r["output"] for k, r in load_items(d2).items() if k in first} == first
    assert load_config(d.path / "config.yaml") == smoke_cfg(tmp_path)  # the run's config now says 2
    # Shrinking the scope again reports only the items inside it (nothing recomputed).
    submitted.clear()
    res, _ = run(smoke_cfg(tmp_path, "eval.num_questions=1", "eval.variants=[stock]"), resume=d.path, model=tiny_model)
    assert not submitted and set(res["accuracy"]) == {"stock"}
    assert all(r["n"] == 1 for r in res["accuracy"]["stock"]["per_position"])


def test_nested_ttft_smoke(tiny_model, tmp_path):
    cfg = load_config(
        CONFIGS / "ttft_nested_smoke.yaml",
        [f"out_dir={tmp_path}", "model=tiny", "engine.page_size=8", "engine.attention=reference"],
    )
    res, d = run(cfg, model=tiny_model)
    rows = {r["n"]: r for r in res["rows"]}
    assert set(rows) == {1, 2}
    for r in rows.values():
        assert r["span"]["ttft_median_s"] > 0 and r["stock"]["ttft_median_s"] > 0
        # The span outer query reuses the inner exchanges; the flat stock prompt does not.
        assert r["span"]["cached_tokens"] > r["stock"]["cached_tokens"]
    assert (d.path / "ttft.png").exists() and (d.path / "summary.md").exists()


def test_ttft_waves_report_compilation_apart(tiny_model):
    """The TTFT tasks subtract the seconds JAX spends tracing and compiling inside a wave: a
    fresh engine's first query compiles, the same query again does not. The persistent cache is
    off explicitly: programs stored by an earlier run would be compiled at construction."""
    from spanjax.engine.engine import Engine, EngineConfig
    from spanjax.eval.nested_ttft import run_waves
    from spanjax.query import ast as A

    engine = Engine(tiny_model, EngineConfig(num_pages=64, page_size=8, attention="reference", compilation_cache="off"))
    g = A.G("tiny", A.Cross((A.Message("user", "a question of some length"),)), max_tokens=1, temperature=0.0)
    ((wall, compiling, _),) = run_waves(engine, g)
    assert 0 < compiling < wall
    engine.clear_cache()
    ((wall, compiling, _),) = run_waves(engine, g)
    assert compiling == 0 and wall > 0


def test_rag_ttft_smoke(tiny_model, tmp_path):
    cfg = load_config(
        CONFIGS / "ttft_rag_smoke.yaml",
        [f"out_dir={tmp_path}", "model=tiny", "engine.page_size=8", "engine.attention=reference"],
    )
    res, d = run(cfg, model=tiny_model)
    rows = {r["k"]: r for r in res["rows"]}
    assert set(rows) == {1, 2}
    for r in rows.values():
        assert r["span"]["ttft_median_s"] > 0 and r["stock"]["ttft_median_s"] > 0
        assert r["span"]["prompt_tokens"] >= r["stock"]["prompt_tokens"]  # spans are page-aligned with padding
    # Reordered documents: the span query hits every cached document page; with two documents the
    # flat stock prompt shares at most the system prompt and the first document.
    assert rows[2]["span"]["cached_tokens"] > rows[2]["stock"]["cached_tokens"]
    assert (d.path / "ttft.png").exists() and (d.path / "summary.md").exists()
    # Resuming a finished run measures nothing again.
    res2, _ = run(cfg, resume=d.path, model=tiny_model)
    assert res2["rows"] == res["rows"]
