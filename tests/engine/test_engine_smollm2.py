"""The paged engine on the real SmolLM2-135M weights.

The engines here scan their layers (`layer_loop="scan"`): a 30-layer unrolled step takes ~14 s
to compile on a 2-core CPU and these tests meet a dozen shape buckets; the unrolled loop
computes the same (test_engine.py::test_scan_layer_loop_equals_the_dense_mask) and runs in
every other engine test."""

import pytest

from spanjax.engine.dense_generate import generate as dense_generate
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.executor import run_query
from spanjax.engine.sampling import SamplingParams
from spanjax.query import ast as A
from spanjax.query.lower import lower

pytestmark = pytest.mark.slow

TOPICS = [
    "the moon",
    "tea",
    "rivers",
    "prime numbers",
    "a violin",
    "Paris",
    "volcanoes",
    "bees",
    "the number zero",
    "sailing",
    "glaciers",
    "chess",
    "bread",
    "owls",
    "copper",
    "rain",
    "maps",
    "clocks",
    "salt",
    "the alphabet",
]


def prompts():
    """20 chat prompts of mixed lengths (1 to ~120 words of user text)."""
    out = []
    for i, topic in enumerate(TOPICS):
        filler = " ".join(["Please be brief and factual."] * (i % 7) * 3)
        out.append(
            [
                A.Message("system", "You are a helpful assistant."),
                A.Message("user", f"Tell me one fact about {topic}. {filler}"),
            ]
        )
    return out


def test_paged_engine_matches_dense_generator_on_concurrent_stock_prompts(smollm2):
    tok = smollm2.tokenizer
    sampling = SamplingParams(max_tokens=12)
    engine = Engine(
        smollm2,
        EngineConfig(
            num_pages=256,
            page_size=16,
            max_tokens_per_step=256,
            max_seqs_per_step=8,
            max_running=8,
            layer_loop="scan",
        ),
    )
    plans = [lower(A.G(smollm2.name, A.Cross(tuple(m))), tok, model=smollm2.name, page_size=16) for m in prompts()]
    dense_ids = []
    for msgs in prompts():
        text = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in msgs], add_generation_prompt=True
        )
        dense_ids.append(tok.encode(text))
    # The lowering's token ids are the chat template's (a system message comes first).
    assert [list(p.spans[-1].token_ids) for p in plans] == dense_ids
    want = [r.token_ids for r in dense_generate(smollm2, dense_ids, sampling)]
    reqs = engine.generate(plans, sampling)
    got = [[t for t in r.generated if t not in engine.eos_token_ids] for r in reqs]
    assert got == want
    assert not engine.has_work()


def test_nested_generation_reuses_inner_exchanges(smollm2):
    """An outer g over a plus of inner g's: the inner exchanges hit the pages the
    inner generations left (cached_tokens shows it)."""
    engine = Engine(smollm2, EngineConfig(num_pages=512, page_size=16, layer_loop="scan"))
    inner = [
        A.G(
            smollm2.name,
            A.Cross((A.Message("system", "Answer in one short sentence."), A.Message("user", q))),
            max_tokens=16,
        )
        for q in ("What color is the sky?", "What is two plus two?", "Name a fruit.")
    ]
    outer = A.G(
        smollm2.name,
        A.Cross((A.Message("system", "Summarize the answers."), A.Plus(tuple(inner)), A.Message("user", "Summary:"))),
        max_tokens=8,
    )
    res = run_query(engine, outer)
    assert len(res.generations) == 4
    inner_tokens = sum(g.prompt_tokens + g.generated_tokens - 1 for g in res.generations[:3])
    # Every full page of every inner exchange is a hit; only partial tail pages are not.
    assert res.final.cached_tokens >= inner_tokens - 3 * 16
    assert res.final.text


def test_engine_on_kept_quantized_weights_matches_the_dense_generator(smollm2_gguf_path):
    # The GGUF's Q4_1 / Q8_0 blocks kept as stored (decode steps run the CPU kernels, on the lane
    # copy for several sequences; prefill expands the blocks): the engine's greedy tokens equal
    # the dense generator's on the same weights.
    from spanjax.kernels.quantized_matmul import BlockQuantized
    from spanjax.models.loading import load_model

    model = load_model(smollm2_gguf_path, quantized=True)
    assert isinstance(model.params.layers.w_up, BlockQuantized)
    tok, sampling = model.tokenizer, SamplingParams(max_tokens=10)
    msgs = prompts()[:4]
    plans = [lower(A.G(model.name, A.Cross(tuple(m))), tok, model=model.name, page_size=16) for m in msgs]
    want = [r.token_ids for r in dense_generate(model, [list(p.spans[-1].token_ids) for p in plans], sampling)]
    engine = Engine(model, EngineConfig(num_pages=64, max_tokens_per_step=256, max_running=4, layer_loop="scan"))
    # Decode batches of 2-16 sequences read the fp32 lane copy (the default).
    assert not engine.params.layers.wq.lanes.int8_activations and model.params.layers.wq.lanes is None
    got = [[t for t in r.generated if t not in engine.eos_token_ids] for r in engine.generate(plans, sampling)]
    assert got == want


def test_int8_activations_stay_close_to_the_dense_generator(smollm2_gguf_path):
    # Opt-in int8 activations (decode products as llama.cpp computes them): greedy tokens are no
    # longer guaranteed to be the dense generator's (a near-tie may flip), but most must be: a
    # wrong lane layout or scale derails every answer within a token or two.
    from spanjax.models.loading import load_model

    model = load_model(smollm2_gguf_path, quantized=True)
    tok, sampling = model.tokenizer, SamplingParams(max_tokens=10)
    msgs = prompts()[:4]
    plans = [lower(A.G(model.name, A.Cross(tuple(m))), tok, model=model.name, page_size=16) for m in msgs]
    want = [r.token_ids for r in dense_generate(model, [list(p.spans[-1].token_ids) for p in plans], sampling)]
    config = EngineConfig(
        num_pages=64, max_tokens_per_step=256, max_running=4, layer_loop="scan", int8_activations=True
    )
    engine = Engine(model, config)
    assert engine.params.layers.wq.lanes is not None and model.params.layers.wq.lanes is None
    got = [[t for t in r.generated if t not in engine.eos_token_ids] for r in engine.generate(plans, sampling)]
    agree = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w))) for g, w in zip(got, want)]
    assert sum(agree) >= 20, (agree, got, want)  # measured: 31 of 40 (8, 10, 3, 10)
    with pytest.raises(ValueError, match="block-quantized"):
        Engine(load_model(smollm2_gguf_path), config)


def test_engine_unrolls_kept_quantized_weights_in_place(smollm2_gguf_path):
    # The engine's default layer loop on a quantized GGUF (what `--quantized` runs): the layers
    # and the block-quantized, tied embedding stay as stored (nothing to pack), read in place.
    from spanjax.kernels.quantized_matmul import BlockQuantized
    from spanjax.models import llama
    from spanjax.models.loading import load_model

    model = load_model(smollm2_gguf_path, quantized=True)
    engine = Engine(model, EngineConfig(num_pages=16, max_tokens_per_step=16, max_running=1))
    assert isinstance(engine.params.layers, llama.UnrolledLayers)
    assert isinstance(engine.params.layers.stack.w_up, BlockQuantized) and engine.params.lm_head is None
