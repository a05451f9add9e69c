"""Speculative decoding in the paged engine: outputs equal the plain engine's token for token.

The tiny base model has small layer weights, so its next token is mostly a
function of the current one, and the test speculator is that bigram table
written into MLPSpeculator weights (one-hot embeddings, permutation head):
drafts are often right and often wrong, so acceptance, partial acceptance,
rejection and KV rewind all happen. Batch sizes, token budgets, a pool small
enough to preempt, max_tokens, eos and seeded sampling are varied.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_byte import Tokenizer, tiny_config

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.sampling import SamplingParams
from spanjax.models import llama
from spanjax.models import speculator as S
from spanjax.models.loading import LoadedModel
from spanjax.query import ast as A
from spanjax.query.lower import lower

PAGE = 4


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(max_position_embeddings=1024, tie_word_embeddings=False)
    p = llama.init_params(cfg, jax.random.key(7), scale=0.2)
    p = llama.Params(
        embed=p.embed,
        layers=jax.tree_util.tree_map(lambda x: 0.3 * x, p.layers),
        final_norm=p.final_norm,
        lm_head=p.lm_head,
    )
    return LoadedModel("tiny", cfg, p, Tokenizer())


@pytest.fixture(scope="module")
def bigram_speculator(model):
    cfg, V = model.cfg, model.cfg.vocab_size
    toks = jnp.arange(V)[:, None]
    h, _ = llama.forward_dense(model.params, cfg, toks, jnp.zeros_like(toks), llama.init_dense_cache(cfg, V, 1))
    nxt = np.asarray(jnp.argmax(llama.compute_logits(model.params, cfg, h[:, 0]), -1))
    eye = np.eye(V, dtype=np.float32)
    sc = S.SpeculatorConfig(emb_dim=cfg.hidden_size, vocab_size=V, inner_dim=V, n_predict=3)
    params = S.SpeculatorParams(
        emb=jnp.asarray(np.stack([eye] * 3)),
        proj0=jnp.zeros((cfg.hidden_size, V)),
        proj=jnp.zeros((2, V, V)),
        ln_weight=jnp.ones((3, V)),
        ln_bias=jnp.zeros((3, V)),
        head=jnp.asarray(np.stack([eye[nxt]] * 3)),
    )
    return S.Speculator(sc, params)


@pytest.fixture(scope="module")
def plain_engine(model):
    return Engine(model, engine_config())  # shared: each Engine compiles its own step


@pytest.fixture(scope="module")
def spec_engine(model, bigram_speculator):
    return Engine(model, engine_config(), speculator=bigram_speculator)


def plans_and_sampling(model, n=24, seed=0, temperature=0.0):
    rng = np.random.default_rng(seed)
    plans, samplings = [], []
    for i in range(n):
        text = "".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(1, 30))))
        msgs = (A.Message("system", "be brief"), A.Message("user", text)) if i % 3 else (A.Message("user", text),)
        plans.append(lower(A.G("tiny", A.Cross(msgs)), model.tokenizer, model="tiny", page_size=PAGE))
        samplings.append(
            SamplingParams(
                max_tokens=int(rng.choice([1, 2, 3, 7, 16, 24])),
                ignore_eos=bool(i % 2),
                temperature=temperature,
                seed=i,
            )
        )
    return plans, samplings


def engine_config(**kw):
    return EngineConfig(
        **{
            "num_pages": 256,
            "page_size": PAGE,
            "max_tokens_per_step": 32,
            "max_seqs_per_step": 8,
            "attention": "reference",
            **kw,
        }
    )


def run(engine, plans, samplings):
    reqs = engine.generate(plans, samplings)
    assert not engine.has_work()
    # every page is back: only the null page is referenced
    assert all(info.refcount == 0 for info in engine.pool.pages[1:])
    return [r.generated for r in reqs]


def test_outputs_identical_to_plain_engine_across_batches_and_preemption(model, bigram_speculator, plain_engine):
    greedy = plans_and_sampling(model, n=16)
    sampled = plans_and_sampling(model, n=8, seed=5, temperature=0.8)
    plain = plain_engine
    want_greedy, want_sampled = run(plain, *greedy), run(plain, *sampled)
    accepted = drafted = 0
    for kw in [
        dict(max_running=1, max_seqs_per_step=1),  # batch 1
        dict(
            max_running=4, max_seqs_per_step=4, max_tokens_per_step=16, num_speculative_tokens=2
        ),  # tight token budget
        dict(num_pages=20),
    ]:  # 19 usable pages: requests are preempted and recomputed
        eng = Engine(model, engine_config(**kw), speculator=bigram_speculator)
        reqs = eng.generate(*greedy)
        assert [r.generated for r in reqs] == want_greedy, kw
        if "num_pages" in kw:
            assert sum(r.metrics.preemptions for r in reqs) > 0
        assert run(eng, *sampled) == want_sampled, (
            kw
        )  # seeded sampling: the verifier samples each position as a plain step would
        assert all(info.refcount == 0 for info in eng.pool.pages[1:])
        st = eng.stats()["speculative"]
        accepted, drafted = accepted + st["accepted"], drafted + st["drafted"]
        assert st["emitted"] / st["verify_forwards"] >= 1.0
    assert 0 < accepted < drafted  # drafts were both accepted and rejected


@pytest.fixture(scope="module")
def second_choice_speculator(model, bigram_speculator):
    """The bigram speculator with head 0 ranking the bigram's token second (a decoy first): its
    greedy draft always misses, the draft tree's second candidate is the bigram's."""
    V = model.cfg.vocab_size
    head = np.asarray(bigram_speculator.params.head).copy()  # [3, D = V, V]: row t one-hot at nxt[t]
    nxt = head[0].argmax(-1)
    head[0] = 0.5 * head[0] + np.eye(V, dtype=np.float32)[(nxt + 1) % V]
    return S.Speculator(bigram_speculator.config, dataclasses.replace(bigram_speculator.params, head=jnp.asarray(head)))


def test_draft_tree_candidates_are_verified_in_the_same_forward(
    model, second_choice_speculator, bigram_speculator, spec_engine, plain_engine
):
    """speculative_candidates = 2: the second candidate's drafts are accepted (their K/V copied
    into the span), outputs stay identical, and as many tokens per forward are emitted as with
    the bigram speculator's greedy draft; with one candidate nothing is accepted."""
    greedy = plans_and_sampling(model, n=10, seed=3)
    sampled = plans_and_sampling(model, n=6, seed=6, temperature=0.8)
    want_greedy, want_sampled = run(plain_engine, *greedy), run(plain_engine, *sampled)
    one = Engine(model, engine_config(), speculator=second_choice_speculator)
    assert run(one, *greedy) == want_greedy
    assert one.stats()["speculative"]["accepted"] == 0
    spec_engine.spec_stats.update(dict.fromkeys(spec_engine.spec_stats, 0))
    assert run(spec_engine, *greedy) == want_greedy
    bigram = spec_engine.stats()["speculative"]
    for kw in [
        dict(max_running=1),  # batch 1: every candidate fits the padding of every step
        # 16 tokens of greedy drafts, 2 other candidates fit the budget (not the padding: bucket 16 is full)
        dict(max_running=4, max_seqs_per_step=6, max_tokens_per_step=24, speculative_tree_fill="budget"),
        dict(num_pages=17, max_running=2),
    ]:  # preemption; few free pages for scratch
        eng = Engine(model, engine_config(speculative_candidates=2, **kw), speculator=second_choice_speculator)
        reqs = eng.generate(*greedy)
        assert [r.generated for r in reqs] == want_greedy, kw
        if "num_pages" in kw:
            assert sum(r.metrics.preemptions for r in reqs) > 0
        st = eng.stats()["speculative"]
        assert st["other_candidate_won"] > 0 and st["accepted"] >= st["other_candidate_won"], kw
        if (
            len(kw) == 1 and "max_running" in kw
        ):  # every other candidate fits: the tree finds exactly the bigram's drafts
            assert (st["verify_forwards"], st["accepted"]) == (
                bigram["verify_forwards"],
                bigram["accepted"],
            ) and bigram["accepted"] > 0
        if "num_pages" in kw:
            assert run(eng, *sampled) == want_sampled  # seeded sampling: every branch samples as a plain step would
        assert all(info.refcount == 0 for info in eng.pool.pages[1:])  # scratch pages are back
    with pytest.raises(ValueError, match="speculative_candidates"):
        engine_config(speculative_candidates=0)
    wide = Engine(model, engine_config(speculative_candidates=10**6), speculator=second_choice_speculator)
    assert (
        wide.runner.num_candidates == len(wide.step_path.spec_params.head_ids[0]) < model.cfg.vocab_size
    )  # head 0's distinct columns
    with pytest.raises(ValueError, match="speculative_tree_fill"):
        engine_config(speculative_tree_fill="all")


def test_logits_of_emitted_tokens_match_plain_engine(model, plain_engine, spec_engine):
    plans, samplings = plans_and_sampling(model, n=4, seed=1)
    a, b = plain_engine, spec_engine
    a.clear_cache(), b.clear_cache()
    ra = [a.submit(p, s, keep_logits=True) for p, s in zip(plans, samplings)]
    rb = [b.submit(p, s, keep_logits=True) for p, s in zip(plans, samplings)]
    a.run_until_done(ra)
    b.run_until_done(rb)
    for x, y in zip(ra, rb):
        assert len(x.logits) == len(y.logits) == len(x.generated)
        np.testing.assert_allclose(np.stack(y.logits), np.stack(x.logits), atol=2e-4, rtol=1e-4)
    assert b.stats()["speculative"]["accepted"] > 0


def test_random_speculator_and_off_by_default(model, plain_engine):
    spec = S.Speculator(
        S.SpeculatorConfig(emb_dim=32, vocab_size=260, inner_dim=16, n_predict=2, tie_weights=True),
        S.init_speculator(
            S.SpeculatorConfig(emb_dim=32, vocab_size=260, inner_dim=16, n_predict=2, tie_weights=True),
            jax.random.PRNGKey(0),
        ),
    )
    plans, samplings = plans_and_sampling(model, n=4, seed=2)
    plain = plain_engine
    plain.clear_cache()
    assert plain.speculator is None and "speculative" not in plain.stats()
    assert run(Engine(model, engine_config(), speculator=spec), plans, samplings) == run(plain, plans, samplings)
    with pytest.raises(ValueError, match="speculator has emb_dim"):
        Engine(model, engine_config(), speculator=S.Speculator(S.SpeculatorConfig(emb_dim=8, vocab_size=260), None))


@pytest.mark.slow
def test_smollm2_with_untrained_speculator_matches_plain_engine(smollm2, tmp_path):
    """SmolLM2-135M, a random speculator loaded from the HF format through EngineConfig.speculator."""
    sc = S.SpeculatorConfig(emb_dim=576, vocab_size=smollm2.cfg.vocab_size, inner_dim=32, n_predict=3, scale_input=True)
    S.export_hf(S.Speculator(sc, S.init_speculator(sc, jax.random.PRNGKey(0))), str(tmp_path / "spec"))
    questions = [
        "What is the capital of France?",
        "Name a prime number.",
        "Why is the sky blue?",
        "Who wrote Hamlet?",
        "What is 2+2?",
    ]
    plans = [
        lower(A.G(smollm2.name, A.Cross((A.Message("user", q),))), smollm2.tokenizer, model=smollm2.name, page_size=16)
        for q in questions
    ]
    sampling = SamplingParams(max_tokens=10)
    # Scanned layers: the unrolled 30-layer step compiles ~10x slower (test_engine_smollm2.py).
    cfg = EngineConfig(
        num_pages=128, page_size=16, max_tokens_per_step=64, max_seqs_per_step=4, max_running=4, layer_loop="scan"
    )
    want = [r.generated for r in Engine(smollm2, cfg).generate(plans, sampling)]
    eng = Engine(smollm2, EngineConfig(**{**cfg.__dict__, "speculator": str(tmp_path / "spec")}))
    assert [r.generated for r in eng.generate(plans, sampling)] == want
    assert eng.stats()["speculative"]["drafted"] > 0
