"""The relevance-ranked locality variants on a tiny random model: each document's score is the
relevance intrinsic's label-logit margin on that document alone (checked against a dense forward
with the adapter), the answer query lists the documents by score with the most relevant last and
keeps the `ranked_keep` best, and a run records where the gold document was ranked."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_byte import CFG, tiny_model

from spanjax.adapters import AdapterConfig, adapter_mask, export_peft, init_adapter, make_bank
from spanjax.config import ConfigError
from spanjax.engine.adapters import lower_for_engine
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.eval import locality as L
from spanjax.eval.experiments import load_config, run
from spanjax.models import llama
from spanjax.runs import load_items
from spanjax.tasks.answerability import label_token_ids
from spanjax.tasks.locality import RELEVANCE_INVOCATION, make_g, ranked_order, relevance_g

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAGE = 8


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model(3)
    relevance = init_adapter(
        AdapterConfig(kind="lora", r=2, alpha=4, target_modules=("q", "v", "down")), CFG, jax.random.key(5), b_scale=0.5
    )
    return model, relevance


def test_ranked_order_lists_the_most_relevant_last_and_keeps_the_best():
    assert ranked_order([0.5, -1.0, 2.0, 0.1]) == (1, 3, 0, 2)
    assert ranked_order([0.5, -1.0, 2.0, 0.1], keep=2) == (0, 2)
    assert ranked_order([1.0, 1.0, 0.0]) == (2, 0, 1)  # equal scores keep their listed order
    assert ranked_order([3.0, 1.0], keep=2) == (1, 0)


def test_ranked_query_lists_the_documents_of_its_order(tiny):
    model, _ = tiny
    ex = L.locality_examples(L.LocalityEval(split="dev", num_docs=4, num_questions=1, max_doc_tokens=16), 0, None)[0]
    bodies = ex.bodies(1)
    g = make_g(ex, 1, "span-sequential-ranked", "tiny", 4, order=(3, 1))
    docs = [m.content for m in g.input.children[1].children]
    assert docs == [f"Document [1]{bodies[3]}", f"Document [2]{bodies[1]}"]
    assert g.positions == "sequential" and g.adapter is None
    assert make_g(ex, 1, "stock-ranked", "tiny", 4, order=(0, 1, 2, 3)).input.children[1].content.endswith(bodies[0])
    with pytest.raises(ValueError, match="an order of documents is needed"):
        make_g(ex, 1, "span-sequential-ranked", "tiny", 4)
    with pytest.raises(ValueError, match="only for ranked variants"):
        make_g(ex, 1, "span-sequential", "tiny", 4, order=(0, 1))


def test_relevance_scores_equal_a_dense_forward_of_each_document_alone(tiny):
    model, relevance = tiny
    tok, cfg = model.tokenizer, model.cfg
    ev = L.LocalityEval(split="dev", num_docs=3, num_questions=2, max_doc_tokens=20)
    examples = L.locality_examples(ev, 0, tok)
    eng = Engine(model, EngineConfig(num_pages=256, page_size=PAGE, max_tokens_per_step=128, attention="reference"))
    eng.register_adapter("relevance", relevance)
    queries = [(examples[0], 0), (examples[1], 2)]
    got = L.relevance_scores(eng, queries, PAGE)
    yes, no = label_token_ids(tok)
    bank = make_bank([relevance], cfg)
    for (ex, p), scores in zip(queries, got):
        assert scores.shape == (3,)
        for body, score in zip(ex.bodies(p), scores):
            g = relevance_g(ex, body, "tiny")
            plan = lower_for_engine(g, tok, model="tiny", page_size=PAGE, adapters=eng.adapters)
            ids = [t for s in plan.spans for t in s.token_ids]
            # the training format: the document and question, the invocation, the assistant header
            tail = tok.encode_message("user", RELEVANCE_INVOCATION) + tok.generation_prefix_ids()
            assert ids[-len(tail) :] == tail
            tokens = np.asarray([ids], np.int32)
            positions = np.arange(len(ids), dtype=np.int32)[None]
            mask = adapter_mask(relevance.config, ids)[None]
            h, _ = llama.forward_dense(
                model.params, cfg, tokens, positions, llama.init_dense_cache(cfg, 1, len(ids)), bank, mask
            )
            logits = np.asarray(llama.compute_logits(model.params, cfg, h[0, -1:]))[0]
            np.testing.assert_allclose(score, logits[yes] - logits[no], rtol=1e-4, atol=1e-4)
    # A document scored in a batch of others gets the score it gets alone.
    alone = L.relevance_scores(eng, [(examples[1], 2)], PAGE)[0]
    np.testing.assert_allclose(alone, got[1], rtol=1e-4, atol=1e-4)


def smoke_cfg(tmp_path, *extra):
    return load_config(
        CONFIGS / "locality_nq_smoke.yaml",
        [
            f"out_dir={tmp_path / 'runs'}",
            "model=tiny",
            f"engine.page_size={PAGE}",
            "engine.attention=reference",
            *extra,
        ],
    )


def test_ranked_run_records_the_order_and_the_gold_rank(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    model, relevance = tiny
    directory = tmp_path / "relevance"
    export_peft(relevance, str(directory), base_model_name_or_path="tiny")
    with pytest.raises(ConfigError, match="set eval.relevance_adapter"):
        smoke_cfg(tmp_path, "eval.variants=[span-sequential-ranked]")
    with pytest.raises(ConfigError, match="ranked_keep must lie in 0..num_docs=3"):
        smoke_cfg(
            tmp_path,
            "eval.variants=[span-sequential-ranked]",
            f"eval.relevance_adapter={directory}",
            "eval.ranked_keep=4",
        )
    (directory / "train_config.yaml").write_text("data:\n  invocation: 'Answerability: something else'\n")
    with pytest.raises(ValueError, match="the ranking sends"):
        run(
            smoke_cfg(tmp_path, "eval.variants=[span-sequential-ranked]", f"eval.relevance_adapter={directory}"),
            model=model,
        )
    (directory / "train_config.yaml").write_text(f"data:\n  invocation: '{RELEVANCE_INVOCATION}'\n")
    cfg = smoke_cfg(
        tmp_path,
        "eval.variants=[stock, span-sequential-ranked]",
        f"eval.relevance_adapter={directory}",
        "eval.ranked_keep=2",
        "eval.max_tokens=3",
    )
    res, d = run(cfg, model=model)
    items = load_items(d)
    examples = {ex.index: ex for ex in L.locality_examples(cfg.eval, cfg.seed, model.tokenizer)}
    eng = Engine(model, EngineConfig(num_pages=256, page_size=PAGE, max_tokens_per_step=128, attention="reference"))
    eng.register_adapter("relevance", relevance)
    ranked = {k: r for k, r in items.items() if k[0] == "span-sequential-ranked"}
    assert len(ranked) == 2 * 3  # one query per question, recorded at every gold position
    for (_, q, p), r in ranked.items():
        computed_at = r.get("computed_at", p)
        scores = L.relevance_scores(eng, [(examples[q], computed_at)], PAGE)[0]
        assert tuple(r["order"]) == ranked_order(scores, 2)
        assert r["gold_rank"] == int(np.sum(scores > scores[computed_at]))
        assert r["gold_kept"] == (computed_at in r["order"])
    table = res["accuracy"]["span-sequential-ranked"]
    assert table["n"] == 2 and table["ranking"]["n"] == 2
    assert table["ranking"]["gold_kept"] == np.mean([r["gold_kept"] for r in ranked.values() if "computed_at" not in r])


def test_relevance_query_is_the_intrinsics_training_prompt():
    """The ranked variants ask the intrinsic exactly what it was trained on: the answerability
    builder's one-passage user message (gold passage: "answerable"), then the invocation."""
    from spanjax.training.answerability import build_records

    examples = L.locality_examples(L.LocalityEval(split="dev", num_docs=2, num_questions=6), 0, None)
    records = build_records([ex.index for ex in examples], num_docs=1, max_doc_words=120, seed=0)
    checked = 0
    for ex, rec in zip(examples, records):
        if rec["label"] != "answerable":
            continue
        g = relevance_g(ex, ex.gold, "tiny")
        user, invocation = g.input.children
        assert user.content == rec["messages"][0]["content"]
        assert invocation.content == RELEVANCE_INVOCATION
        checked += 1
    assert checked
