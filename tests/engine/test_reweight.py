"""Attention re-weighting (g.reweight = (scale, bias), APE-style): the final span (and generated
tokens) attend to the plus children's keys with logits scale * logit + bias. The engine's logits
equal a dense forward with the plan's mask and the same per-key scaling, with the documents'
pages reused from a query without re-weighting (their keys do not change; the final span's do),
and a re-weighted request batched with a plain one leaves the plain one unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tiny_byte
from dense_reference import masked_dense_logits, plan_arrays, plan_logit_weights
from tiny_byte import tiny_config

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.sampling import SamplingParams
from spanjax.query import ast as A
from spanjax.query import syntax as S
from spanjax.query.errors import SpanQueryError
from spanjax.query.lower import lower

PAGE = 4
REWEIGHT = (0.7, 0.8)


@pytest.fixture(scope="module")
def model():
    return tiny_byte.tiny_model(seed=7, cfg=tiny_config(max_position_embeddings=1024))


@pytest.fixture(scope="module")
def engine(model):
    # "auto": the XLA path on CPU (its prefill and one-pass decode)
    cfg = EngineConfig(num_pages=256, page_size=PAGE, max_tokens_per_step=32, max_seqs_per_step=8, attention="auto")
    return Engine(model, cfg)


def docs(rng, lengths=(13, 22, 9)):
    return [A.Message("user", "".join(chr(int(c)) for c in rng.integers(97, 123, k))) for k in lengths]


def rag(documents, attention, positions, question="which one?", reweight=None):
    prompt = A.Cross((A.Message("system", "use the documents"), A.Plus(tuple(documents)), A.Message("user", question)))
    return A.G("tiny", prompt, attention=attention, positions=positions, reweight=reweight)


def plan_of(model, g):
    return lower(g, model.tokenizer, model="tiny", page_size=PAGE)


def max_error(model, plan, req):
    tokens, positions, mask = plan_arrays(plan, req.generated[:-1])
    scale, bias = plan_logit_weights(plan, plan.reweight or (1.0, 0.0), req.generated[:-1])
    ref = masked_dense_logits(model.params, model.cfg, tokens, positions, mask, scale, bias)
    return max(float(np.abs(a - b).max()) for a, b in zip(ref[plan.num_tokens - 1 :], req.logits))


def run(engine, *plans):
    reqs = [engine.submit(p, SamplingParams(max_tokens=3), keep_logits=True) for p in plans]
    engine.run_until_done(reqs)
    return reqs


@pytest.mark.parametrize("attention,positions", [("prefix", "parallel"), ("isolated", "sequential")])
def test_logits_equal_the_dense_reweighted_forward_with_documents_reused(model, engine, attention, positions):
    documents = docs(np.random.default_rng(1))
    engine.clear_cache()
    plain = plan_of(model, rag(documents, attention, positions))
    (first,) = run(engine, plain)  # caches the documents (and the prefix and question)
    plan = plan_of(model, rag(documents, attention, positions, reweight=REWEIGHT))
    assert plan.reweight == REWEIGHT
    other = plan_of(model, rag(documents[::-1], attention, positions, question="and now?"))
    warm, side = run(engine, plan, other)  # one batch with a plain request
    assert max_error(model, plan, warm) < 1e-4
    assert max_error(model, other, side) < 1e-4
    # Every page but the final span's came from the cache: the documents keep their keys.
    assert warm.metrics.cached_tokens == plan.num_tokens - len(plan.spans[-1])
    assert [s.page_keys for s in plan.spans[:-1]] == [s.page_keys for s in plain.spans[:-1]]
    assert not set(plan.spans[-1].page_keys) & set(plain.spans[-1].page_keys)
    assert float(np.abs(warm.logits[0] - first.logits[0]).max()) > 1e-3  # the weights matter
    engine.clear_cache()
    (cold,) = run(engine, plan)
    np.testing.assert_allclose(cold.logits[0], warm.logits[0], atol=1e-4)


def test_plan_rule_and_identity(model):
    """Only non-plus spans attending to plus children are re-weighted; (1, 0), or a prompt
    without a plus, is no re-weighting at all (the plain plan and keys)."""
    documents = docs(np.random.default_rng(2))
    plain = plan_of(model, rag(documents, "prefix", "sequential"))
    plan = plan_of(model, rag(documents, "prefix", "sequential", reweight=(2.0, -1.0)))
    kinds = {s.index: s.kind for s in plan.spans}
    final = len(plan.spans) - 1
    for a in range(len(plan.spans)):
        for d in plan.spans[a].sees:
            want = (2.0, -1.0) if kinds[a] == "cross" and kinds[d] == "plus" else (1.0, 0.0)
            assert plan.logit_weight(a, d) == want
    assert plan.logit_weight(final, final) == (1.0, 0.0)
    assert plan_of(model, rag(documents, "prefix", "sequential", reweight=(1.0, 0.0))) == plain
    no_plus = A.G("tiny", A.Cross((A.Message("user", "hi"),)), reweight=(2.0, 1.0))
    assert plan_of(model, no_plus) == plan_of(model, dataclasses.replace(no_plus, reweight=None))
    # Different weights, different final-span keys; the same documents' keys.
    again = plan_of(model, rag(documents, "prefix", "sequential", reweight=(2.0, -0.5)))
    assert again.spans[-1].cache_key != plan.spans[-1].cache_key
    assert again.spans[1].cache_key == plan.spans[1].cache_key == plain.spans[1].cache_key


def test_reweight_is_validated_and_round_trips():
    q = S.parse('{"g": {"model": "m", "input": {"user": "x"}, "reweight": {"scale": 0.9, "bias": -0.2}}}', "json")
    assert q.reweight == (0.9, -0.2)
    for fmt in ("json", "yaml", "sexpr"):
        assert S.parse(S.dump(q, fmt), fmt) == q
    sx = S.parse('(g "m" (user "x") :reweight-bias 0.5)', "sexpr")
    assert sx.reweight == (1.0, 0.5)
    meta = S.parse('{"map": {"metadata": {"model": "m", "reweight": {"scale": 2}}, "inputs": ["a"]}}', "json")
    assert meta.template.reweight == (2.0, 0.0)
    bad = [
        ('{"scale": 0}', "$.g.reweight.scale"),
        ('{"scale": -1.5}', "$.g.reweight.scale"),
        ('{"bias": "x"}', "$.g.reweight.bias"),
        ('{"temperature": 1}', "$.g.reweight.temperature"),
        ("[0.9, 0.2]", "$.g.reweight"),
    ]
    for body, path in bad:
        with pytest.raises(SpanQueryError) as e:
            S.parse('{"g": {"model": "m", "input": {"user": "x"}, "reweight": ' + body + "}}", "json")
        assert e.value.path == path
    with pytest.raises(SpanQueryError) as e:
        S.parse('(g "m" (user "x") :reweight-scale 1e999)', "sexpr")
    assert e.value.path == "$.g.reweight.scale"


def test_locality_reweight_variants():
    from spanjax.tasks import locality as L

    ex = L.Example(0, "Q?", ("a", "b"), "gold", ("gold",), "nq")
    for variant, positions in (("span-sequential-reweight", "sequential"), ("span-parallel-reweight", "parallel")):
        g = L.make_g(ex, 1, variant, "tiny", 4)
        assert g.reweight == (L.REWEIGHT_SCALE, L.REWEIGHT_BIAS) and g.positions == positions
        assert isinstance(g.input.children[1], A.Plus)
    assert L.make_g(ex, 1, "span-parallel", "tiny", 4).reweight is None
    # A DEV sweep sets the pair per run (eval.reweight_scale / eval.reweight_bias)
    assert L.make_g(ex, 1, "span-parallel-reweight", "tiny", 4, (1.5, -0.5)).reweight == (1.5, -0.5)
    assert L.make_g(ex, 1, "span-parallel", "tiny", 4, (1.5, -0.5)).reweight is None
    # on top of the block-attention aLoRA: both the adapter and the weights
    g = L.make_g(ex, 1, "span-parallel-reweight+alora", "tiny", 4, (1.5, -0.5))
    assert g.reweight == (1.5, -0.5) and g.adapter == "alora" and g.positions == "parallel"
    assert L.make_g(ex, 1, "span-parallel+alora", "tiny", 4, (1.5, -0.5)).reweight is None
    assert L.order_invariant("span-parallel-reweight+alora")
