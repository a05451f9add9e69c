"""The recompute policy (g.recompute_pages, EPIC-style): each plus child's first pages are
encoded again in the query's context. The engine's logits equal a dense forward with the
plan's explicit mask, cold and with the documents' pages reused from another query, and the
child tails keep the page keys (so the cache entries) of the independent encoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tiny_byte
from dense_reference import masked_dense_logits, plan_arrays
from tiny_byte import tiny_config

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.sampling import SamplingParams
from spanjax.query import ast as A
from spanjax.query.lower import lower

PAGE = 4


@pytest.fixture(scope="module")
def model():
    return tiny_byte.tiny_model(seed=5, cfg=tiny_config(max_position_embeddings=1024))


@pytest.fixture(scope="module")
def engine(model):
    cfg = EngineConfig(
        num_pages=256, page_size=PAGE, max_tokens_per_step=32, max_seqs_per_step=8, attention="reference"
    )
    return Engine(model, cfg)


def docs(rng, n=4):
    # Lengths straddle the recompute head: some documents are shorter than two pages.
    lengths = [0, 17, 30, 9, 22][:n]
    return [A.Message("user", "".join(chr(int(c)) for c in rng.integers(97, 123, k))) for k in lengths]


def rag(documents, order, attention, positions, pages):
    prompt = A.Cross((A.Message("system", "use the documents"), A.Plus(tuple(documents[i] for i in order)),
                      A.Message("user", "which one?")))  # fmt: skip
    return A.G("tiny", prompt, attention=attention, positions=positions, recompute_pages=pages)


def run(engine, plan):
    req = engine.submit(plan, SamplingParams(max_tokens=3), keep_logits=True)
    engine.run_until_done([req])
    return req


def max_error(model, plan, req):
    tokens, positions, mask = plan_arrays(plan, req.generated[:-1])
    ref = masked_dense_logits(model.params, model.cfg, tokens, positions, mask)
    n0 = plan.num_tokens
    return max(float(np.abs(a - b).max()) for a, b in zip(ref[n0 - 1 :], req.logits))


@pytest.mark.parametrize("attention,positions", [("prefix", "parallel"), ("isolated", "sequential")])
@pytest.mark.parametrize("pages", [1, 2])
def test_logits_equal_the_dense_masked_forward_cold_and_reused(model, engine, attention, positions, pages):
    rng = np.random.default_rng(pages)
    documents = docs(rng)
    tok = model.tokenizer
    engine.clear_cache()
    plain = lower(rag(documents, [0, 1, 2, 3], attention, positions, 0), tok, model="tiny", page_size=PAGE)
    run(engine, plain)  # caches the documents' independent encodings
    plan = lower(rag(documents, [2, 0, 3, 1], attention, positions, pages), tok, model="tiny", page_size=PAGE)
    warm = run(engine, plan)
    assert max_error(model, plan, warm) < 1e-4
    # The tails (and the independent heads the tails see) came from the cache.
    recomputed = sum(min(pages * PAGE, len(tok.encode_message("user", d.content))) for d in documents)
    assert warm.metrics.cached_tokens >= plain.num_tokens - len(plain.spans[-1]) - recomputed - len(plain.spans[0])
    engine.clear_cache()
    cold = run(engine, plan)
    assert max_error(model, plan, cold) < 1e-4
    np.testing.assert_allclose(cold.logits[0], warm.logits[0], atol=1e-4)


def test_plan_shape(model):
    """Later spans see each child's in-context head and its tail, never the independent head;
    the in-context head sees the prefix and the earlier children; tails keep their page keys."""
    rng = np.random.default_rng(0)
    documents = docs(rng)
    tok = model.tokenizer
    plain = lower(rag(documents, [0, 1, 2, 3], "prefix", "parallel", 0), tok, model="tiny", page_size=PAGE)
    plan = lower(rag(documents, [0, 1, 2, 3], "prefix", "parallel", 1), tok, model="tiny", page_size=PAGE)
    final = plan.spans[-1]
    by_index = {s.index: s for s in plan.spans}
    heads = [s for s in plan.spans if s.kind == "plus" and any(t.sees and s.index in t.sees for t in plan.spans
             if t.kind == "plus" and t.index == s.index + 1 and t.base_key == s.cache_key)]  # fmt: skip
    split = sum(len(tok.encode_message("user", d.content)) > PAGE for d in documents)
    assert 0 < len(heads) == split  # a document of one page or less is recomputed whole, not split
    for h in heads:
        tail, again = by_index[h.index + 1], by_index[h.index + 2]
        assert h.index not in final.sees and {tail.index, again.index} <= set(final.sees)
        assert again.token_ids == h.token_ids and again.positions == h.positions
        assert set(h.sees) < set(again.sees)  # the in-context copy also sees earlier children
        assert set(tail.page_keys) <= {k for s in plain.spans for k in s.page_keys}  # reused as encoded alone
    first_again = by_index[heads[0].index + 2]
    assert first_again.sees == tuple(sorted(set(first_again.sees)))
    # A reordering changes the in-context heads' keys (their KV depends on it), not the tails'.
    other = lower(rag(documents, [3, 2, 1, 0], "prefix", "parallel", 1), tok, model="tiny", page_size=PAGE)
    keys = lambda p: {k for s in p.spans for k in s.page_keys}  # noqa: E731
    assert {k for h in heads for k in by_index[h.index + 1].page_keys} <= keys(other)
    assert not {k for h in heads for k in by_index[h.index + 2].page_keys} <= keys(other)


def test_recompute_is_validated_and_round_trips():
    from spanjax.query import syntax as S
    from spanjax.query.errors import SpanQueryError

    g = {"g": {"model": "m", "input": {"user": "x"}, "recompute_pages": 2}}
    q = S.parse(S.to_json(S.parse(str(g).replace("'", '"'), "json")), "json")
    assert q.recompute_pages == 2 and S.parse(S.dump(q, "sexpr"), "sexpr") == q
    with pytest.raises(SpanQueryError) as e:
        S.parse('{"g": {"model": "m", "input": {"user": "x"}, "recompute_pages": -1}}', "json")
    assert e.value.path == "$.g.recompute_pages"
    assert dataclasses.replace(q, recompute_pages=0) != q
