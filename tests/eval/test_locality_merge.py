"""Locality shards (`eval.shard=i/k`), `spanjax merge` and the paired statistics in the
results: shard validation and work split, the merge's checks (configs, duplicate items,
output directory) on hand-written run dirs, McNemar marks in the summary, and (tiny
random model) the merge of two half runs equals one whole run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import tiny_byte
from tiny_byte import tiny_config

from spanjax import config as C
from spanjax.cli.main import main
from spanjax.eval import locality as L
from spanjax.eval.experiments import load_config, run
from spanjax.eval.merge import SELECTION_FIELDS, MergeError, merge
from spanjax.runs import ITEMS_FILE, RunDir, append_items, load_items, open_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")


def smoke_cfg(tmp_path, *extra):
    return load_config(
        CONFIGS / "locality_nq_smoke.yaml",
        [f"out_dir={tmp_path}", "model=tiny", "engine.page_size=8", "engine.attention=reference", *extra],
    )


def item(v, q, p, correct, output=None, **kw):
    rec = {
        "key": [v, q, p],
        "variant": v,
        "question": q,
        "position": p,
        "output": output if output is not None else ("yes" if correct else "no"),
        "correct": correct,
        "prompt_tokens": 100,
        "cached_tokens": 0,
        "ttft_s": 0.01,
        "batch_s": 0.1,
        "batch_size": 2,
    }
    return {**rec, **kw}


def fake_run(cfg, records):
    """A run directory as `spanjax run` leaves it (config.yaml, items.jsonl), without a model."""
    d = open_run(cfg)
    append_items(d, records)
    return d.path


def all_items(cfg, correct=lambda v, q, p: (q + p) % 2 == 0):
    return [item(v, q, p, correct(v, q, p)) for v, q, p in sorted(L.scope(cfg))]


# ---------------------------------------------------------------------------- shards


@pytest.mark.parametrize("bad", ["3/2", "2/2", "a/b", "1/0", "-1/2", "1", "0/2/4", ""])
def test_malformed_shard_is_refused(tmp_path, bad):
    with pytest.raises(C.ConfigError, match=r"eval: shard must be 'i/k' with 0 <= i < k"):
        smoke_cfg(tmp_path, f"eval.shard='{bad}'")


def test_shards_split_by_question_chunk(tmp_path):
    whole = smoke_cfg(tmp_path, "eval.num_questions=7", "eval.batch_questions=2")
    assert whole.eval.shard is None and whole.eval.shard_spec is None
    shards = [L.scope(C.override(whole, [f"eval.shard={i}/3"])) for i in range(3)]
    assert set().union(*shards) == L.scope(whole) and sum(map(len, shards)) == len(L.scope(whole))
    questions = [{q for _, q, _ in s} for s in shards]
    assert questions == [{0, 1, 6}, {2, 3}, {4, 5}]  # chunks of 2: chunk n goes to shard n % 3
    for s, qs in zip(shards, questions):  # every variant and position of a shard's questions
        assert len(s) == len(qs) * len(whole.eval.variants) * len(whole.eval.gold_positions)


# ---------------------------------------------------------------------------- statistics


def test_vs_stock_and_significance_marks(tmp_path):
    cfg = smoke_cfg(tmp_path, "eval.num_questions=12", "eval.variants=[stock,span-parallel,span-sequential]")

    def correct(v, q, p):
        if v == "stock":
            return p != 1  # right at 0 and 2, wrong at 1
        if v == "span-parallel":
            return p == 1 or (p == 2 and q < 6)  # 12 wins at 1, 12 losses at 0, 6 losses at 2
        return (q + p) % 2 == 0

    done = {tuple(r["key"]): r for r in all_items(cfg, correct)}
    table = L.aggregate(cfg, done)
    assert table["stock"]["vs_stock"] is None
    t = table["span-parallel"]["vs_stock"]
    assert t["overall"]["n_pairs"] == 36 and (t["overall"]["b"], t["overall"]["c"]) == (12, 18)
    assert t["overall"]["p"] == pytest.approx(0.3616, abs=1e-4) and not t["overall"]["significant"]
    pos = {r["position"]: r for r in t["per_position"]}
    assert (pos[0]["b"], pos[0]["c"], pos[0]["p"]) == (0, 12, 2 / 4096) and pos[0]["significant"]
    assert (pos[1]["b"], pos[1]["c"]) == (12, 0) and pos[1]["significant"]
    assert (pos[2]["b"], pos[2]["c"], pos[2]["p"]) == (0, 6, 2 / 64) and pos[2]["significant"]
    md = L.markdown_table(cfg, table)
    row = next(line for line in md.splitlines() if line.startswith("| span-parallel |"))
    assert "| 0.000† | 1.000* | 0.500† |" in row
    # "all" of span-parallel (one query at every position, here run at each from a sitting
    # without `order_invariant_once`) counts one item per question, its first position's.
    assert table["span-parallel"]["n"] == 12 and table["span-sequential"]["n"] == 36
    lo, hi = table["span-parallel"]["ci95"]
    assert f"0.000 [{lo:.3f}, {hi:.3f}]" in row  # overall: not significant, with its interval
    assert "McNemar" in md.splitlines()[-1] and "Wilson" in md.splitlines()[-1]
    # Only pairs count: a variant item without its stock item is left out of the test.
    del done[("stock", 0, 0)]
    assert L.aggregate(cfg, done)["span-parallel"]["vs_stock"]["per_position"][0]["n_pairs"] == 11
    # No stock variant: no tests, no marks.
    nostock = smoke_cfg(tmp_path, "eval.num_questions=12", "eval.variants=[span-parallel]")
    assert L.aggregate(nostock, done)["span-parallel"]["vs_stock"] is None
    assert "McNemar" not in L.markdown_table(nostock, L.aggregate(nostock, done))


# ---------------------------------------------------------------------------- merge (no model)


def test_merge_joins_shards_and_variants(tmp_path):
    whole = smoke_cfg(tmp_path / "runs", "eval.num_questions=4", "eval.batch_questions=1")
    recs = all_items(whole)
    d0 = fake_run(C.override(whole, ["eval.shard=0/2"]), [r for r in recs if r["question"] % 2 == 0])
    # the other half, run with one variant less plus a later run of that variant alone
    half = C.override(whole, ["eval.shard=1/2", "eval.variants=[stock,span-sequential]"])
    d1 = fake_run(half, [r for r in recs if r["question"] % 2 == 1 and r["variant"] != "span-parallel-isolated"])
    rest = C.override(whole, ["eval.shard=1/2", "eval.variants=[span-parallel-isolated]", "name=extra"])
    d2 = fake_run(rest, [{**r, "batch_s": 9.0} for r in recs if r["question"] % 2 == 1])  # stock etc. again
    assert C.read_yaml(d0 / "config.yaml")["eval"]["shard"] == "0/2"  # a shard's run dir records it

    res, out = merge([d0, d1, d2], tmp_path / "merged")
    lines = (out.path / ITEMS_FILE).read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == sorted(r["key"] for r in recs)  # deduplicated, sorted
    assert all(", " not in x and '": ' not in x for x in lines)  # compact
    merged = load_config(out.path / "config.yaml")
    assert merged == whole  # every variant (first-seen order) and question, no shard
    assert res["accuracy"]["stock"]["n"] == 12 and res["items_in_scope"] == res["items_expected"] == 36
    assert [m["shard"] for m in res["merged_from"]] == ["0/2", "1/2", "1/2"]
    for name in ("results.json", "summary.md", "accuracy.png", "log.txt"):
        assert (out.path / name).stat().st_size > 0
    assert json.loads((out.path / "results.json").read_text())["accuracy"] == res["accuracy"]


def test_merge_covers_the_union_of_question_ranges_and_positions(tmp_path):
    a = smoke_cfg(tmp_path, "eval.num_questions=2", "eval.positions=[0,2]")
    b = smoke_cfg(tmp_path, "eval.num_questions=3", "eval.first_question=4", "eval.positions=[1]")
    _, out = merge([fake_run(a, all_items(a)), fake_run(b, all_items(b))], tmp_path / "m")
    ev = load_config(out.path / "config.yaml").eval
    assert (ev.first_question, ev.num_questions, ev.positions) == (0, 7, (0, 2, 1))
    assert len(load_items(out)) == 2 * 3 * 2 + 3 * 3 * 1


@pytest.mark.parametrize("change", ["seed=1", "eval.max_tokens=9", "engine.page_size=16", "eval.split=held_out"])
def test_merge_refuses_configs_that_change_results(tmp_path, change):
    a = smoke_cfg(tmp_path, "eval.shard=0/2")
    b = smoke_cfg(tmp_path, "eval.shard=1/2", change)
    field = change.split("=")[0]
    assert field not in SELECTION_FIELDS
    with pytest.raises(MergeError, match=rf"configs differ in {field}: "):
        merge([fake_run(a, []), fake_run(b, [])], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_conflicting_items_and_a_used_directory(tmp_path):
    cfg = smoke_cfg(tmp_path)
    d0 = fake_run(cfg, [item("stock", 0, 1, True, output="Paris")])
    # the same item with other timing and cache state: fine
    d1 = fake_run(cfg, [item("stock", 0, 1, True, output="Paris", ttft_s=5.0, cached_tokens=64, batch_size=1)])
    _, out = merge([d0, d1], tmp_path / "ok")
    assert len(load_items(out)) == 1
    d2 = fake_run(cfg, [item("stock", 0, 1, False, output="Lyon")])
    with pytest.raises(MergeError, match=r"item \['stock', 0, 1\] differs .*\(in correct, output\)"):
        merge([d0, d2], tmp_path / "bad")
    with pytest.raises(C.ConfigError, match="already holds config.yaml"):
        merge([d0], out.path)
    lora = smoke_cfg(tmp_path, "eval.lora_adapter=/a", "eval.variants=[stock+lora]")
    other = smoke_cfg(tmp_path, "eval.lora_adapter=/b", "eval.variants=[stock+lora]")
    with pytest.raises(MergeError, match="different eval.lora_adapter"):
        merge([fake_run(lora, []), fake_run(other, [])], tmp_path / "bad2")
    # a run without the adapter variants merges with one that has them
    res, _ = merge([d0, fake_run(lora, [])], tmp_path / "ok2")
    assert res["adapters"] == {"lora": "/a"}
    assert list(res["accuracy"]) == ["stock", "span-sequential", "span-parallel-isolated", "stock+lora"]


def test_merge_command_line(tmp_path, capsys):
    cfg = smoke_cfg(tmp_path)
    # stock always right: accuracy 1 at its interval's upper end (the plot takes it)
    d0 = fake_run(C.override(cfg, ["eval.shard=0/2"]), all_items(cfg, lambda v, q, p: v == "stock"))
    assert main(["merge", str(d0), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "| stock |" in out and f"results: {tmp_path / 'm'}" in out
    assert main(["merge", str(d0), str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- merge = whole run (tiny model)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_byte.tiny_model(seed=3, cfg=tiny_config(rope_theta=10000.0))


def test_merged_half_runs_equal_one_whole_run(tiny_model, tmp_path, monkeypatch):
    from spanjax.engine.engine import Engine

    whole = smoke_cfg(tmp_path, "eval.batch_questions=1", "eval.variants=[stock,span-sequential]")
    r_whole, d_whole = run(whole, model=tiny_model)
    halves = [run(C.override(whole, [f"eval.shard={i}/2"]), model=tiny_model)[1].path for i in range(2)]
    assert [{q for _, q, _ in load_items_at(h)} for h in halves] == [{0}, {1}]
    r_merged, d_merged = merge(halves, tmp_path / "merged")

    def strip(items):  # timing, batch and what the cache held differ between the runs
        return {k: {f: x for f, x in r.items() if f not in L.RUN_STATE_FIELDS} for k, r in items.items()}

    assert len(load_items(d_whole)) == 12
    assert strip(load_items(d_merged)) == strip(load_items(d_whole))

    def table(res):  # the accuracy tables without timing and cache means
        return {
            v: {f: x for f, x in t.items() if f not in ("mean_item_s", "s_per_question", "mean_cached_tokens")}
            for v, t in res["accuracy"].items()
        }

    assert table(r_merged) == table(r_whole)
    assert r_merged["table_markdown"] == r_whole["table_markdown"]
    assert load_config(d_merged.path / "config.yaml") == whole
    # The merged directory resumes like a run: nothing is left to compute.
    submitted = []
    monkeypatch.setattr(Engine, "submit", lambda self, *a, **k: submitted.append(a))
    r_resumed, _ = run(whole, resume=d_merged.path, model=tiny_model)
    assert not submitted and table(r_resumed) == table(r_merged)


def load_items_at(path):
    return load_items(RunDir(Path(path), logging.getLogger(__name__), True))


def test_resume_may_add_an_adapter_directory_but_not_change_one(tmp_path):
    cfg = smoke_cfg(tmp_path)
    d = fake_run(cfg, [])
    with_adapter = C.override(cfg, ["eval.variants=[stock,span-parallel+alora]", "eval.alora_adapter=a1"])
    scope, settable = L.RESUMABLE_SCOPE, L.RESUMABLE_WHEN_UNSET
    assert open_run(with_adapter, resume=d, scope=scope, settable=settable).path == d
    with pytest.raises(C.ConfigError, match="eval.alora_adapter: 'a1' -> 'a2'"):
        open_run(C.override(with_adapter, ["eval.alora_adapter=a2"]), resume=d, scope=scope, settable=settable)


def test_resume_may_set_the_reweighting_until_a_reweight_item_exists(tmp_path):
    """The re-weighting is chosen on DEV after a held-out run started: settable on resume while no
    finished item is a -reweight variant's, fixed once one is."""
    cfg = smoke_cfg(tmp_path)
    plain = fake_run(cfg, [item("stock", 0, 0, True)])
    chosen = C.override(cfg, ["eval.variants=[stock,span-parallel-reweight]", "eval.reweight_bias=-1.0"])
    kw = dict(scope=L.RESUMABLE_SCOPE, settable=L.RESUMABLE_WHEN_UNSET, unused_by=L.keys_unused_by)
    assert open_run(chosen, resume=plain, **kw).path == plain
    used = fake_run(cfg, [item("stock", 0, 0, True), item("span-parallel-reweight", 0, 0, False)])
    with pytest.raises(C.ConfigError, match=r"eval.reweight_bias: 0.0 -> -1.0"):
        open_run(chosen, resume=used, **kw)
    # an adapter variant with re-weighting counts too
    used_with_adapter = fake_run(cfg, [item("stock", 0, 0, True), item("span-parallel-reweight+alora", 0, 0, False)])
    with pytest.raises(C.ConfigError, match=r"eval.reweight_bias: 0.0 -> -1.0"):
        open_run(chosen, resume=used_with_adapter, **kw)
