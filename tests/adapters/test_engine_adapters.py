"""Adapters in the paged engine: aLoRA pages before the invocation key (and hit) as base
pages, several adapters share one batch, logits equal a dense masked reference."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dense_reference import plan_arrays
from tiny_byte import Tokenizer, tiny_config

from spanjax.adapters import AdapterConfig, init_adapter, make_bank
from spanjax.engine.adapters import AdapterError, lower_for_engine, split_at_invocation
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.executor import run_query
from spanjax.engine.sampling import SamplingParams
from spanjax.kernels.rope import apply_rope
from spanjax.models import llama
from spanjax.models.loading import LoadedModel
from spanjax.query import ast as A
from spanjax.query.lower import lower

PAGE = 4
INV_TEXT = "is it answerable?"


CFG = tiny_config(max_position_embeddings=1024)


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer()
    model = LoadedModel("tiny", CFG, llama.init_params(CFG, jax.random.key(7), scale=0.2), tok)
    inv = tuple(tok.encode_message("user", INV_TEXT))
    adapters = {
        "ans": init_adapter(
            AdapterConfig(kind="alora", r=4, alpha=8, invocation_tokens=inv), CFG, jax.random.key(1), b_scale=0.5
        ),
        "lora": init_adapter(
            AdapterConfig(kind="lora", r=2, alpha=4, target_modules=("q", "v", "up")),
            CFG,
            jax.random.key(2),
            b_scale=0.5,
        ),
    }
    eng = Engine(
        model,
        EngineConfig(num_pages=256, page_size=PAGE, max_tokens_per_step=64, max_seqs_per_step=8, attention="reference"),
    )
    for name, ad in adapters.items():
        eng.register_adapter(name, ad)
    return model, tok, adapters, eng


def reference_logits(model, plan, generated, bank, span_ids):
    """Dense forward with the plan's explicit mask and positions, adapter ids per token."""
    tokens, positions, mask = plan_arrays(plan, generated)
    ids = [i for s in plan.spans for i in [span_ids[s.index]] * len(s)] + [span_ids[-1]] * len(generated)
    cfg = model.cfg
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    G = cfg.num_heads // cfg.num_kv_heads
    m = jnp.asarray(mask)

    def attention(idx, c, q, k, v, pos):
        k = apply_rope(k, pos, inv_freq)
        B, T = pos.shape
        s = jnp.einsum("bthgd,bkhd->bhgtk", q.reshape(B, T, cfg.num_kv_heads, G, cfg.head_dim), k) * cfg.sm_scale
        p = jax.nn.softmax(jnp.where(m[None, None, None], s, -jnp.inf), axis=-1)
        return jnp.einsum("bhgtk,bkhd->bthgd", p, v).reshape(B, T, cfg.num_heads, cfg.head_dim), c

    h, _ = llama.decoder(
        model.params,
        cfg,
        jnp.asarray(tokens)[None],
        jnp.asarray(positions)[None],
        jnp.zeros((cfg.num_layers,)),
        attention,
        bank,
        jnp.asarray(ids, jnp.int32)[None],
    )
    return np.asarray(llama.compute_logits(model.params, cfg, h[0]))


def _context(i):
    # Distinct first tokens: under sequential positions a plus child that shares a first page
    # with a sibling is reused at a shifted offset (lower.py's documented approximation).
    docs = A.Plus(tuple(A.user(f"{k}{i} document: " + "lorem ipsum " * (2 + k)) for k in range(3)))
    return [A.system("answer from the documents"), docs, A.user(f"question number {i}, what is it?")]


def test_alora_prefix_pages_key_as_base_and_hit_the_base_cache(setup):
    model, tok, adapters, eng = setup
    eng.clear_cache()
    base_g = A.G("tiny", A.Cross(tuple(_context(0))), max_tokens=2)
    alora_g = A.G("tiny", A.Cross(tuple(_context(0) + [A.user(INV_TEXT)])), max_tokens=2, adapter="ans")
    base_plan = lower(base_g, tok, model="tiny", page_size=PAGE)
    plan = lower_for_engine(alora_g, tok, model="tiny", page_size=PAGE, adapters=eng.adapters)
    naive = lower(alora_g, tok, model="tiny", page_size=PAGE)  # adapter in every key
    # Spans before the final one (system+docs) are identical to the base plan's ...
    for a, b in zip(base_plan.spans[:-1], plan.spans[:-2]):
        assert a.page_keys == b.page_keys
    assert not set(naive.spans[0].page_keys) & set(base_plan.spans[0].page_keys)
    # ... the final span is cut at the invocation: full base pages equal, the rest keyed with the adapter.
    pre, post = plan.spans[-2], plan.spans[-1]
    full = len(pre) // PAGE
    assert pre.page_keys[:full] == base_plan.spans[-1].page_keys[:full]
    assert post.token_ids[: len(adapters["ans"].config.invocation_tokens)] == adapters["ans"].config.invocation_tokens
    assert not set(post.page_keys) & {k for s in base_plan.spans for k in s.page_keys}

    eng.generate([base_plan], SamplingParams(max_tokens=2))
    req = eng.submit(plan, SamplingParams(max_tokens=2))
    eng.run_until_done([req])
    shared = sum(len(s) for s in plan.spans[:-2]) + full * PAGE
    assert req.metrics.cached_tokens == shared
    # A LoRA query of the same prompt shares nothing.
    lora_plan = lower_for_engine(
        A.G("tiny", alora_g.input, adapter="lora"), tok, model="tiny", page_size=PAGE, adapters=eng.adapters
    )
    r2 = eng.submit(lora_plan, SamplingParams(max_tokens=2))
    eng.run_until_done([r2])
    assert r2.metrics.cached_tokens == 0


@pytest.mark.parametrize("positions", ["sequential", "parallel"])
def test_mixed_batch_of_base_alora_lora_equals_dense_reference(setup, positions):
    model, tok, adapters, eng = setup
    bank = make_bank(list(eng.adapters.values()), CFG)
    jobs = []
    for i, adapter in enumerate([None, "ans", "lora", "ans"]):
        msgs = _context(10 + i % 2) + ([A.user(INV_TEXT)] if adapter == "ans" else [])
        g = A.G("tiny", A.Cross(tuple(msgs)), max_tokens=4, adapter=adapter, positions=positions)
        plan = lower_for_engine(g, tok, model="tiny", page_size=PAGE, adapters=eng.adapters)
        jobs.append((plan, eng.submit(plan, SamplingParams(max_tokens=4, ignore_eos=True), keep_logits=True)))
    eng.run_until_done([r for _, r in jobs])
    for _, req in jobs:
        span_ids = req.span_adapter or (-1,) * len(req.plan.spans)
        ref = reference_logits(model, req.plan, req.generated[:-1], bank, span_ids)
        n0 = req.plan.num_tokens
        got = np.stack(req.logits)
        np.testing.assert_allclose(got, ref[n0 - 1 : n0 - 1 + len(got)], atol=2e-4, rtol=1e-4)
    # The adapters changed something.
    assert not np.allclose(np.stack(jobs[0][1].logits)[:1], np.stack(jobs[2][1].logits)[:1], atol=1e-3)


def test_split_keeps_visibility_and_positions(setup):
    model, tok, adapters, eng = setup
    g = A.G("tiny", A.Cross(tuple(_context(3) + [A.user(INV_TEXT), A.user("more after")])), adapter="ans")
    base = lower(g, tok, model="tiny", page_size=PAGE, adapter=None)
    plan, first = split_at_invocation(base, "ans", adapters["ans"].config.invocation_tokens)
    assert len(plan.spans) == len(base.spans) + 1
    np.testing.assert_array_equal(plan.dense_mask(), base.dense_mask())
    assert [p for s in plan.spans for p in s.positions] == [p for s in base.spans for p in s.positions]
    assert all(s.start % PAGE == 0 for s in plan.spans)


def test_errors(setup):
    model, tok, adapters, eng = setup
    g = A.G("tiny", A.Cross(tuple(_context(0))), adapter="ans")
    with pytest.raises(AdapterError, match="invocation"):
        lower_for_engine(g, tok, model="tiny", page_size=PAGE, adapters=eng.adapters)
    with pytest.raises(AdapterError, match="registered"):
        lower_for_engine(A.G("tiny", g.input, adapter="nope"), tok, model="tiny", page_size=PAGE, adapters=eng.adapters)
    with pytest.raises(AdapterError, match="not registered"):
        eng.submit(lower(A.G("tiny", g.input, adapter="nope"), tok, model="tiny", page_size=PAGE))


def test_run_query_with_adapter(setup):
    model, tok, adapters, eng = setup
    q = {
        "g": {
            "model": "tiny",
            "adapter": "ans",
            "max_tokens": 3,
            "input": {"cross": [{"user": "some context here"}, {"user": INV_TEXT}]},
        }
    }
    res = run_query(eng, json.dumps(q))
    assert res.final.generated_tokens >= 1
