"""The paged span engine against independent references.

- span semantics: logits equal a brute-force dense forward with the explicit
  docs/design.md §3 mask and positions (tests/dense_reference.py);
- commutativity: permuted plus children hit the cache; parallel logits agree;
- a tiny pool preempts and still gives the ample pool's outputs;
- compilations stay within the documented bound;
- `ignore_eos` runs past end-of-sequence ids to max_tokens, as the dense generator does.
"""

import dataclasses

import jax
import numpy as np
import pytest
import tiny_byte
from dense_reference import masked_dense_logits, plan_arrays
from tiny_byte import Tokenizer, tiny_config

from spanjax.engine.dense_generate import generate as dense_generate
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.executor import run_query
from spanjax.engine.sampling import SamplingParams
from spanjax.engine.scheduler import RequestTooLarge
from spanjax.models import llama
from spanjax.models.loading import LoadedModel
from spanjax.query import ast as A
from spanjax.query.lower import lower

PAGE = 4
POLICIES = [(a, p) for a in ("prefix", "isolated") for p in ("sequential", "parallel")]


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_byte.tiny_model(seed=7, cfg=tiny_config(max_position_embeddings=1024))


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(
        tiny_model,
        EngineConfig(num_pages=256, page_size=PAGE, max_tokens_per_step=32, max_seqs_per_step=8, attention="reference"),
    )


def words(rng, lo=1, hi=12):
    return "".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(lo, hi))))


def random_prompt(rng, depth=0):
    """A random cross of messages and plus nodes (plus children may nest)."""
    items = [A.Message("system", words(rng))] if depth == 0 else []
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5 and depth < 2:
            kids = tuple(
                random_prompt(rng, depth + 1) if rng.random() < 0.3 else A.Message("user", words(rng))
                for _ in range(int(rng.integers(1, 4)))
            )
            items.append(A.Plus(kids))
        else:
            items.append(A.Message("user", words(rng)))
    return A.Cross(tuple(items))


def check_against_reference(model, plan, req):
    tokens, positions, mask = plan_arrays(plan, req.generated[:-1])
    ref = masked_dense_logits(model.params, model.cfg, tokens, positions, mask)
    n0 = plan.num_tokens
    rows = ref[n0 - 1 : n0 - 1 + len(req.logits)]
    return max(float(np.abs(a - b).max()) for a, b in zip(rows, req.logits))


@pytest.mark.parametrize("attention,positions", POLICIES)
def test_logits_equal_brute_force_dense_mask(tiny_model, engine, attention, positions):
    rng = np.random.default_rng(hash((attention, positions)) % 2**32)
    for _ in range(4):
        g = A.G("tiny", random_prompt(rng), attention=attention, positions=positions)
        plan = lower(g, tiny_model.tokenizer, model="tiny", page_size=PAGE)
        engine.clear_cache()  # sequential reuse is approximate by design; test exact semantics
        req = engine.submit(plan, SamplingParams(max_tokens=4), keep_logits=True)
        engine.run_until_done([req])
        assert len(req.logits) == len(req.generated) >= 1
        assert check_against_reference(tiny_model, plan, req) < 1e-4


def test_scan_layer_loop_equals_the_dense_mask(tiny_model):
    """`layer_loop="scan"` (stacked weights, one lax.scan: what the SmolLM2 tests use to compile
    ~10x faster) computes what the unrolled default does: prefill chunks and decode steps."""
    engine = Engine(tiny_model, EngineConfig(num_pages=64, page_size=PAGE, max_tokens_per_step=32, layer_loop="scan"))
    assert not isinstance(engine.params.layers, tuple)  # stacked: the scan path runs
    g = A.G("tiny", random_prompt(np.random.default_rng(11)), positions="parallel")
    plan = lower(g, tiny_model.tokenizer, model="tiny", page_size=PAGE)
    req = engine.submit(plan, SamplingParams(max_tokens=4, ignore_eos=True), keep_logits=True)
    engine.run_until_done([req])
    assert len(req.logits) == 4 and check_against_reference(tiny_model, plan, req) < 1e-4


@pytest.mark.parametrize("attention", ["prefix", "isolated"])
def test_cached_spans_are_exact_where_design_says(tiny_model, engine, attention):
    """Parallel positions (any attention) and isolated spans (any positions) reuse cache exactly."""
    rng = np.random.default_rng(3)
    docs = [A.Message("user", words(rng, 5, 20)) for _ in range(4)]
    for positions in ("parallel", "sequential") if attention == "isolated" else ("parallel",):
        engine.clear_cache()
        for order in ([0, 1, 2, 3], [2, 0, 3, 1]):
            g = A.G(
                "tiny",
                A.Cross((A.Message("system", "sys"), A.Plus(tuple(docs[i] for i in order)), A.Message("user", "q?"))),
                attention=attention,
                positions=positions,
            )
            plan = lower(g, tiny_model.tokenizer, model="tiny", page_size=PAGE)
            req = engine.submit(plan, SamplingParams(max_tokens=3), keep_logits=True)
            engine.run_until_done([req])
            assert check_against_reference(tiny_model, plan, req) < 1e-4


def rag_query(docs, order, positions):
    return A.G(
        "tiny",
        A.Cross(
            (
                A.Message("system", "answer from the documents"),
                A.Plus(tuple(docs[i] for i in order)),
                A.Message("user", "which?"),
            )
        ),
        max_tokens=2,
        positions=positions,
    )


def test_permuted_documents_hit_the_cache_and_parallel_logits_agree(tiny_model, engine):
    rng = np.random.default_rng(11)
    docs = [A.Message("user", words(rng, 20, 40)) for _ in range(5)]
    engine.clear_cache()
    tok = tiny_model.tokenizer
    first = lower(rag_query(docs, range(5), "parallel"), tok, model="tiny", page_size=PAGE)
    r1 = engine.submit(first, SamplingParams(max_tokens=2), keep_logits=True)
    engine.run_until_done([r1])
    assert r1.metrics.cached_tokens == 0
    second = lower(rag_query(docs, [3, 1, 4, 0, 2], "parallel"), tok, model="tiny", page_size=PAGE)
    r2 = engine.submit(second, SamplingParams(max_tokens=2), keep_logits=True)
    engine.run_until_done([r2])
    doc_and_prefix_tokens = sum(len(s) for s in second.spans[:-1])
    assert r2.metrics.cached_tokens >= doc_and_prefix_tokens
    np.testing.assert_allclose(r1.logits[0], r2.logits[0], atol=1e-4)
    # Through the query executor too (sequential positions: reuse at shifted offsets).
    res = run_query(engine, rag_query(docs, [4, 3, 2, 1, 0], "sequential"))
    warm = run_query(engine, rag_query(docs, [0, 2, 4, 1, 3], "sequential"))
    assert res.final.cached_tokens < warm.final.cached_tokens
    assert warm.final.cached_tokens >= sum(len(tok.encode_message("user", d.content)) for d in docs)


def burst(engine, tok, n=12):
    rng = np.random.default_rng(5)
    plans = []
    for i in range(n):
        g = A.G(
            "tiny",
            A.Cross(
                (
                    A.Message("system", f"s{i % 3}"),
                    A.Plus((A.Message("user", words(rng, 10, 30)), A.Message("user", words(rng, 5, 15)))),
                    A.Message("user", words(rng)),
                )
            ),
        )
        plans.append(lower(g, tok, model="tiny", page_size=PAGE))
    samplings = [
        SamplingParams(max_tokens=int(rng.integers(3, 9)), temperature=0.7 if i % 2 else 0.0, seed=i) for i in range(n)
    ]
    reqs = engine.generate(plans, samplings)
    return [r.generated for r in reqs], sum(r.metrics.preemptions for r in reqs)


def test_tiny_pool_preempts_and_matches_ample_pool(tiny_model):
    ample = Engine(
        tiny_model,
        EngineConfig(num_pages=512, page_size=PAGE, max_tokens_per_step=32, max_seqs_per_step=8, attention="reference"),
    )
    tiny = Engine(
        tiny_model,
        EngineConfig(
            num_pages=24,
            page_size=PAGE,
            max_tokens_per_step=32,
            max_seqs_per_step=8,
            max_running=12,
            attention="reference",
        ),
    )
    want, _ = burst(ample, tiny_model.tokenizer)
    got, preemptions = burst(tiny, tiny_model.tokenizer)
    assert preemptions > 0, "the pool was not small enough to exercise preemption"
    assert got == want


def test_request_larger_than_pool_is_rejected_up_front(tiny_model):
    eng = Engine(tiny_model, EngineConfig(num_pages=4, page_size=PAGE, attention="reference"))
    plan = lower(A.G("tiny", A.Message("user", "x" * 40)), tiny_model.tokenizer, model="tiny", page_size=PAGE)
    with pytest.raises(RequestTooLarge, match="num_pages"):
        eng.submit(plan, SamplingParams(max_tokens=4))
    assert not eng.has_work()


def test_compilations_stay_within_documented_bound(tiny_model):
    eng = Engine(
        tiny_model,
        EngineConfig(num_pages=128, page_size=PAGE, max_tokens_per_step=64, max_seqs_per_step=4, attention="reference"),
    )
    runner = eng.runner
    assert runner.token_buckets == [16, 32, 48, 64]  # midpoints from 32 tokens up
    assert runner.seq_buckets == [1, 2, 4]
    assert runner.page_buckets == [4, 8, 16, 32, 64, 128]
    assert runner.decode_page_buckets == [4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert runner.compile_bound == 4 * 3 * 6 + 3 * 11
    rng = np.random.default_rng(9)
    for _wave in range(6):  # varied prompt lengths, concurrency and decode lengths
        plans = [
            lower(A.G("tiny", A.Message("user", words(rng, 1, 150))), eng.model.tokenizer, model="tiny", page_size=PAGE)
            for _ in range(int(rng.integers(1, 6)))
        ]
        eng.generate(plans, SamplingParams(max_tokens=int(rng.integers(1, 20))))
    assert 1 < runner.compile_count <= runner.compile_bound


def test_repeated_prompt_ending_on_a_page_boundary_completes(tiny_model, engine):
    """A prompt whose final span fills its last page exactly, sent twice: the second
    time every page could hit, but the last prompt token must still be computed
    (its logits pick the first token), so the request must not stall."""
    tok = tiny_model.tokenizer
    for n in range(1, 40):  # find a user text whose final span is a whole number of pages
        g = A.G("tiny", A.Cross((A.Message("system", "s"), A.Message("user", "y" * n))))
        plan = lower(g, tok, model="tiny", page_size=PAGE)
        if len(plan.spans[-1]) % PAGE == 0:
            break
    assert len(plan.spans[-1]) % PAGE == 0
    engine.clear_cache()
    first = engine.generate([plan], SamplingParams(max_tokens=3))[0]
    again = engine.submit(plan, SamplingParams(max_tokens=3))
    for _ in range(50):  # bounded: a stalled request would never finish
        if again.finished:
            break
        engine.step()
    assert again.finished and again.generated == first.generated
    assert again.metrics.cached_tokens == len(plan.spans[-1]) - PAGE


def test_executor_runs_seq_par_monad_and_repeat(tiny_model, engine):
    def g(text, **kw):
        return A.G("tiny", A.Cross((A.Message("system", "s"), A.Message("user", text))), max_tokens=3, **kw)

    query = A.Seq(
        (
            A.Monad(g("warm the cache")),
            A.Par((g("a"), A.Repeat(2, g("b", temperature=0.9, seed=5)))),
            g("last"),
        )
    )
    res = run_query(engine, query)
    # monad + par(a, b seed 5, b seed 6) + last, in evaluation order
    assert len(res.generations) == 5
    assert isinstance(res.value, str) and res.value == res.final.text
    # The two repeat samples are distinct requests with distinct seeds.
    again = run_query(engine, A.Repeat(2, g("b", temperature=0.9, seed=5)))
    assert isinstance(again.value, list) and len(again.value) == 2
    assert sorted(again.value) == sorted(r.text for r in res.generations[2:4])


def test_ignore_eos_generates_max_tokens_like_the_dense_generator(tiny_model, engine):
    """A token the tiny model generates early is made an eos id: without ignore_eos the engine stops
    there; with it the engine generates max_tokens, the tokens of a run where nothing is eos, and
    the dense generator's tokens (eos ids included)."""
    n = 12
    plan = lower(A.G("tiny", A.Message("user", "tell me more")), tiny_model.tokenizer, model="tiny", page_size=PAGE)
    assert len(plan.spans) == 1
    ref = engine.generate([plan], SamplingParams(max_tokens=n))[0]
    assert ref.finish_reason == "length" and len(ref.generated) == n
    eos = ref.generated[1]
    first = ref.generated.index(eos)
    model = LoadedModel(
        "tiny", dataclasses.replace(tiny_model.cfg, eos_token_ids=(eos,)), tiny_model.params, Tokenizer()
    )
    eng = Engine(
        model,
        EngineConfig(num_pages=64, page_size=PAGE, max_tokens_per_step=32, max_seqs_per_step=8, attention="reference"),
    )
    stopped, kept = eng.generate(
        [plan, plan], [SamplingParams(max_tokens=n), SamplingParams(max_tokens=n, ignore_eos=True)]
    )
    assert stopped.finish_reason == "eos" and stopped.generated == ref.generated[: first + 1]
    assert kept.finish_reason == "length" and len(kept.generated) == n and eos in kept.generated
    assert kept.generated == ref.generated
    dense = dense_generate(model, [list(plan.spans[0].token_ids)], SamplingParams(max_tokens=n, ignore_eos=True))[0]
    assert dense.finish_reason == "length" and dense.token_ids == kept.generated


def test_quantized_layers_run_unrolled_from_their_stacks(tiny_model):
    """Block-quantized layers are not copied out per layer: the engine unrolls over views of the
    stacks (`UnrolledLayers`), the C++ kernels reading each layer in place, two or more
    sequences through the lane copy; greedy tokens are the dense generator's on the same
    weights, which slices and expands them."""
    model = tiny_byte.quantized_layers(tiny_model)
    eng = Engine(
        model,
        EngineConfig(num_pages=64, page_size=PAGE, max_tokens_per_step=32, max_seqs_per_step=4, attention="reference"),
    )
    assert isinstance(eng.params.layers, llama.UnrolledLayers)
    assert eng.params.layers.stack.w_up.q is model.params.layers.w_up.q  # the same buffers
    assert eng.params.layers.stack.w_up.lanes is not None
    assert len(jax.tree.leaves(eng.params)) < 60
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    plans = [
        lower(A.G("tiny", A.Message("user", text)), model.tokenizer, model="tiny", page_size=PAGE)
        for text in ("tell me more", "why", "a longer question about the weather")
    ]
    want = [r.token_ids for r in dense_generate(model, [list(p.spans[0].token_ids) for p in plans], sampling)]
    assert [r.generated for r in eng.generate(plans, sampling)] == want
    assert eng.generate(plans[:1], sampling)[0].generated == want[0]  # one row: the blocks


def test_warmup_compiles_the_shapes_and_leaves_the_engine_untouched(tiny_model):
    """After warmup(), a request of a warmed size compiles nothing; the pool and counters look untouched."""
    eng = Engine(tiny_model, EngineConfig(num_pages=128, page_size=PAGE, max_tokens_per_step=32, max_seqs_per_step=4))
    info = eng.warmup(prompt_tokens=(40,), streams=(1, 2), new_tokens=3)
    assert info["compilations"] >= 2 and info["compilations"] == eng.stats()["compilations"]
    assert eng.stats()["cached_pages"] == 0 and eng.stats()["steps"] == 0
    assert eng.pool.stats.hit_tokens == eng.pool.stats.miss_tokens == 0
    before = eng.runner.compile_count
    tok = tiny_model.tokenizer
    filler = "Warm the engine up with a sentence of ordinary words. "  # about 40 byte tokens, as warmed
    plans = [
        lower(A.G(model="m", input=A.user(f"{i} " + filler)), tok, model=tiny_model.name, page_size=PAGE)
        for i in range(2)
    ]
    reqs = eng.generate(plans, SamplingParams(max_tokens=3, ignore_eos=True))
    assert all(len(r.generated) == 3 for r in reqs)
    assert eng.runner.compile_count == before


def test_abort_releases_pages_at_once(tiny_model):
    """Aborting a running request (mid-decode) and a waiting one frees every page they held; the
    engine keeps serving the others, whose output is unchanged."""
    eng = Engine(tiny_model, EngineConfig(num_pages=64, page_size=PAGE, max_tokens_per_step=32, max_running=2))
    tok = tiny_model.tokenizer
    plans = [
        lower(A.G(model="m", input=A.user(f"request {i} " * 6)), tok, model=tiny_model.name, page_size=PAGE)
        for i in range(3)
    ]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = eng.generate([plans[0]], sp)[0].generated
    eng.clear_cache()
    free_before = eng.pool.num_available()
    reqs = [eng.submit(p, sp) for p in plans]  # max_running=2: the third waits
    while len(reqs[1].generated) < 3:
        eng.step()
    assert eng.abort(reqs[1]) and eng.abort(reqs[2]) and not eng.abort(reqs[2])
    assert reqs[1].finish_reason == reqs[2].finish_reason == "abort"
    eng.run_until_done()
    assert reqs[0].generated == alone and len(reqs[1].generated) < 12 and reqs[2].generated == []
    eng.clear_cache()
    assert eng.pool.num_available() == free_before


def test_nested_inner_g_writes_its_final_token(tiny_model, monkeypatch):
    """An inner g writes its last token before releasing its pages, so the outer query finds
    every token of every inner exchange cached (not only the full pages); the answer is the
    same as when the outer recomputes the tails."""
    inner = [
        A.G("m", A.Cross((A.system("Answer briefly."), A.user(q))), max_tokens=7)
        for q in ("What color is the sky?", "Two plus two?", "Name a fruit, please.")
    ]
    outer = A.G("m", A.Cross((A.system("Summarize."), A.Plus(tuple(inner)), A.user("Summary:"))), max_tokens=5)

    def run(write_tail: bool):
        eng = Engine(tiny_model, EngineConfig(num_pages=256, page_size=PAGE, max_tokens_per_step=32))
        if not write_tail:
            submit = eng.submit
            monkeypatch.setattr(eng, "submit", lambda p, s, prefill=False, **kw: submit(p, s, prefill=prefill))
        res = run_query(eng, outer)
        assert eng.pool.num_available() == eng.pool.capacity  # no page still held
        return res

    with_tail, without = run(True), run(False)
    exchanges = sum(g.prompt_tokens + g.generated_tokens for g in with_tail.generations[:3])
    assert with_tail.final.cached_tokens >= exchanges and with_tail.final.cached_tokens > without.final.cached_tokens
    assert with_tail.final.token_ids == without.final.token_ids
    assert [g.token_ids for g in with_tail.generations] == [g.token_ids for g in without.generations]


def test_waiting_outer_g_has_its_known_prompt_encoded_during_the_inner_wave(tiny_model, monkeypatch):
    """While the inner g's generate, the outer g's system prompt is encoded by a prefill request,
    so the outer wave computes only its question; its logits stay those of the dense mask and
    its tokens those of a run without the prefill. A second run finds the prefill all cached."""
    inner = [
        A.G("m", A.Cross((A.system("Be brief."), A.user(q))), max_tokens=4)
        for q in ("What color is the sky?", "Two plus two?")
    ]
    outer = A.G(
        "m",
        A.Cross((A.system("Summarize the answers above."), A.Plus(tuple(inner)), A.user("Summary:"))),
        max_tokens=3,
        positions="parallel",
    )
    from spanjax.engine import executor

    def run(prefill: bool):
        eng = Engine(tiny_model, EngineConfig(num_pages=128, page_size=PAGE, max_tokens_per_step=32))
        submit, plans = eng.submit, []
        monkeypatch.setattr(eng, "submit", lambda p, s, **kw: plans.append((p, kw)) or submit(p, s, **kw))
        if not prefill:
            monkeypatch.setattr(executor.QueryEvaluation, "_known_prefixes", lambda *a: [])
        first, second = run_query(eng, outer), run_query(eng, outer)
        monkeypatch.undo()
        assert eng.pool.num_available() == eng.pool.capacity and not eng.has_work()
        return first, second, plans

    first, second, plans = run(True)
    prefills = [p for p, kw in plans if kw.get("prefill")]
    assert len(prefills) == 2  # one per run; the second found its pages cached at admission
    outer_plan = plans[-1][0]
    assert prefills[0].spans == outer_plan.spans[:1]  # the outer system prompt
    assert first.final.cached_tokens == outer_plan.num_tokens - len(outer_plan.spans[-1])
    baseline, _, _ = run(False)
    assert first.final.cached_tokens > baseline.final.cached_tokens
    assert [g.token_ids for g in first.generations] == [g.token_ids for g in baseline.generations]
    assert second.final.token_ids == first.final.token_ids


def test_prefill_request_publishes_its_pages_and_samples_nothing(tiny_model):
    eng = Engine(tiny_model, EngineConfig(num_pages=64, page_size=PAGE, max_tokens_per_step=32))
    plan = lower(
        A.G("m", A.user("a prompt of a few pages")), tiny_model.tokenizer, model=tiny_model.name, page_size=PAGE
    )
    pre = eng.submit(plan, SamplingParams(max_tokens=1), prefill=True)
    eng.run_until_done([pre])
    assert pre.finish_reason == "prefill" and pre.generated == [] and pre.metrics.first_token_s is None
    assert eng.pool.num_available() == eng.pool.capacity  # released; its pages stay cached
    req = eng.submit(plan, SamplingParams(max_tokens=2), keep_logits=True)
    eng.run_until_done([req])
    last_page = (len(plan.spans[-1]) - 1) // PAGE * PAGE  # the final span recomputes its last prompt page
    assert req.metrics.cached_tokens == last_page > 0
    assert check_against_reference(tiny_model, plan, req) < 1e-4
    with pytest.raises(ValueError, match="samples nothing"):
        eng.submit(plan, SamplingParams(max_tokens=1), prefill=True, keep_logits=True)


def test_pipelined_decode_gives_the_tokens_and_logits_of_step_by_step(tiny_model, monkeypatch):
    """Decoding one step ahead (the next step's tokens taken on the device) changes nothing a
    request sees: tokens, logits and finish reasons equal those of step-by-step decoding, with
    requests ending at different steps (length, a stop string), seeded sampling, a request
    aborted while a step holding it is in flight, and a nested query (its inner g's last-token
    write). Every page is released at the end."""
    rng = np.random.default_rng(3)
    plans = [
        lower(A.G("m", random_prompt(rng)), tiny_model.tokenizer, model=tiny_model.name, page_size=PAGE)
        for _ in range(4)
    ]
    samplings = [
        SamplingParams(max_tokens=9, ignore_eos=True),
        SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.9, seed=4),
        SamplingParams(max_tokens=12, ignore_eos=True, stop=("Q",)),
        SamplingParams(max_tokens=14, ignore_eos=True),
    ]
    nested = A.G(
        "m",
        A.Cross((A.system("Sum up."), A.Plus((A.G("m", A.user("Name a fruit."), max_tokens=6),)), A.user("So?"))),
        max_tokens=4,
    )

    def run(pipeline: bool):
        eng = Engine(
            tiny_model, EngineConfig(num_pages=128, page_size=PAGE, max_tokens_per_step=64, pipeline_decode=pipeline)
        )
        ahead = []
        build = eng.scheduler.continue_decoding
        monkeypatch.setattr(eng.scheduler, "continue_decoding", lambda b: ahead.append(build(b)) or ahead[-1])
        reqs = [eng.submit(p, s, keep_logits=True) for p, s in zip(plans, samplings)]
        for _ in range(4):
            eng.step()
        assert (eng.step_path.in_flight is not None) == pipeline
        eng.abort(reqs[3])  # its row in the step already dispatched is dropped
        eng.run_until_done()
        nested_ids = run_query(eng, nested).final.token_ids
        assert eng.pool.num_available() == eng.pool.capacity
        return reqs, nested_ids, sum(a is not None for a in ahead)

    piped, piped_nested, dispatched_ahead = run(True)
    plain, plain_nested, _ = run(False)
    assert dispatched_ahead > 10
    for a, b in zip(piped, plain):
        assert (a.generated, a.text, a.finish_reason) == (b.generated, b.text, b.finish_reason)
        assert len(a.logits) == len(b.logits) and all(np.allclose(x, y, atol=1e-5) for x, y in zip(a.logits, b.logits))
    assert piped[2].finish_reason == "stop" and piped[3].finish_reason == "abort"
    assert piped_nested == plain_nested


def test_abort_of_a_request_still_writing_its_last_token_keeps_its_reason(tiny_model):
    """A finished request that is still writing its last token (write_final_token) is released by
    abort() without that step: abort() reports False and the request keeps its finish reason."""
    eng = Engine(tiny_model, EngineConfig(num_pages=64, page_size=PAGE, max_tokens_per_step=32))
    plan = lower(
        A.G(model="m", input=A.user("a short prompt")), tiny_model.tokenizer, model=tiny_model.name, page_size=PAGE
    )
    req = eng.submit(plan, SamplingParams(max_tokens=3, ignore_eos=True), write_final_token=True)
    while not req.finished:
        eng.step()
    assert eng.has_work()  # its last token is not written yet
    assert not eng.abort(req) and req.finish_reason == "length"
    assert not eng.has_work() and eng.pool.num_available() == eng.pool.capacity


def test_run_until_done_includes_the_last_token_write(tiny_model):
    """run_until_done returns once the requests' pages are complete: a write_final_token request's
    extra step belongs to its own wave, not to whatever is submitted next."""
    eng = Engine(tiny_model, EngineConfig(num_pages=64, page_size=PAGE, max_tokens_per_step=32))
    plan = lower(
        A.G(model="m", input=A.user("a short prompt")), tiny_model.tokenizer, model=tiny_model.name, page_size=PAGE
    )
    req = eng.submit(plan, SamplingParams(max_tokens=3, ignore_eos=True), write_final_token=True)
    eng.run_until_done([req])
    assert req.finished and not eng.has_work()
    assert eng.pool.num_available() == eng.pool.capacity


@pytest.mark.parametrize("attention", ["reference", "auto"])
def test_spans_and_the_spans_they_see_share_a_step(tiny_model, attention):
    """A cold query's system prompt, the plus children that see it and the question that sees
    them all are computed in one step when the budget holds them (every layer writes the step's
    K/V before it attends), and the logits stay those of the dense mask."""
    prompt = A.Cross(
        (
            A.Message("system", "abcdefg"),
            A.Plus((A.Message("user", "hij"), A.Message("user", "klmno"))),
            A.Message("user", "pq"),
        )
    )
    plan = lower(A.G("tiny", prompt), tiny_model.tokenizer, model="tiny", page_size=PAGE)
    assert [s.sees for s in plan.spans] == [(), (0,), (0,), (0, 1, 2)]  # three levels of dependence
    engine = Engine(tiny_model, EngineConfig(num_pages=64, page_size=PAGE, max_tokens_per_step=64, attention=attention))
    req = engine.submit(plan, SamplingParams(max_tokens=1), keep_logits=True)
    engine.run_until_done([req])
    assert engine.steps == 1 and len(req.logits) == 1
    assert check_against_reference(tiny_model, plan, req) < 1e-4
