"""Dense generator: greedy parity with transformers, stopping rules, seeding, bucketing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import ToyTokenizer

from spanjax.engine import dense_generate as dg
from spanjax.engine.dense_generate import GenerationResult, complete, generate
from spanjax.engine.sampling import SamplingParams
from spanjax.models.hf import load_hf_directory
from spanjax.models.loading import LoadedModel

PROMPT_LENS = (3, 10, 17)


@pytest.fixture(scope="module")
def tiny(tiny_hf_model):
    """(LoadedModel, torch model) for the tiny Llama-3-style checkpoint."""
    path, hf = tiny_hf_model("llama3")
    cfg, params = load_hf_directory(path)
    cfg = dataclasses.replace(cfg, eos_token_ids=())  # no eos: lengths below are predictable
    return LoadedModel(path, cfg, params, ToyTokenizer(cfg.vocab_size)), hf


def _prompts(vocab, lens=PROMPT_LENS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=n).tolist() for n in lens]


def _hf_greedy(hf, prompt, max_new, eos):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", ["llama3", "llama_tied"])
def test_greedy_matches_transformers_generate(tiny_hf_model, name):
    path, hf = tiny_hf_model(name)
    cfg, params = load_hf_directory(path)
    model = LoadedModel(path, cfg, params, ToyTokenizer(cfg.vocab_size))
    prompts = _prompts(cfg.vocab_size)
    max_new = 20
    results = generate(model, prompts, SamplingParams(max_tokens=max_new))
    for p, r in zip(prompts, results):
        want = _hf_greedy(hf, p, max_new, cfg.eos_token_ids)
        if want and want[-1] in cfg.eos_token_ids and len(want) <= max_new and r.finish_reason == "eos":
            want = want[:-1]  # spanjax does not return the eos token
        else:
            assert r.finish_reason == "length" and len(r.token_ids) == max_new
        assert r.token_ids == want
        assert r.prompt_tokens == len(p)
        assert r.text == "".join(f"<{t}>" for t in r.token_ids)


def test_batch_equals_single(tiny):
    model, _ = tiny
    prompts = _prompts(model.cfg.vocab_size, seed=1)
    sp = SamplingParams(max_tokens=8)
    batched = generate(model, prompts, sp)
    for p, r in zip(prompts, batched):
        assert generate(model, [p], sp)[0].token_ids == r.token_ids


def test_sampled_request_is_reproducible_across_batches(tiny):
    model, _ = tiny
    prompts = _prompts(model.cfg.vocab_size, seed=2)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=42)
    greedy = SamplingParams(max_tokens=10)
    alone = generate(model, [prompts[1]], sampled)[0].token_ids
    mixed = generate(model, prompts, [greedy, sampled, SamplingParams(max_tokens=4, temperature=0.7, seed=1)])
    assert mixed[1].token_ids == alone
    assert mixed[0].token_ids == generate(model, [prompts[0]], greedy)[0].token_ids
    assert len(mixed[2].token_ids) <= 4
    other_seed = generate(model, [prompts[1]], dataclasses.replace(sampled, seed=43))[0].token_ids
    assert other_seed != alone  # 10 draws at temperature 1 from a 96-token vocabulary


def test_max_tokens_finishes_with_length(tiny):
    model, _ = tiny
    [r] = generate(model, [[5, 6, 7]], SamplingParams(max_tokens=5))
    assert isinstance(r, GenerationResult)
    assert (len(r.token_ids), r.finish_reason) == (5, "length")
    assert r.prefill_s > 0 and r.decode_s >= 0


def test_eos_stops_and_is_not_returned(tiny):
    model, _ = tiny
    prompt = [5, 6, 7, 8]
    free = generate(model, [prompt], SamplingParams(max_tokens=12))[0].token_ids
    eos = free[4]
    first = free.index(eos)
    stopped = LoadedModel(
        model.name, dataclasses.replace(model.cfg, eos_token_ids=(eos,)), model.params, model.tokenizer
    )
    [r] = generate(stopped, [prompt], SamplingParams(max_tokens=12))
    assert r.finish_reason == "eos" and r.token_ids == free[:first]
    # eos ids from the tokenizer count too.
    tok = type(model.tokenizer)(model.cfg.vocab_size, eos_token_ids=(eos,))
    [r2] = generate(LoadedModel(model.name, model.cfg, model.params, tok), [prompt], SamplingParams(max_tokens=12))
    assert r2.finish_reason == "eos" and r2.token_ids == free[:first]


def test_stop_string_truncates_text(tiny):
    model, _ = tiny
    prompt = [9, 10, 11]
    free = generate(model, [prompt], SamplingParams(max_tokens=10))[0]
    stop = f"<{free.token_ids[3]}>"
    cut = free.text.index(stop)
    [r] = generate(model, [prompt], SamplingParams(max_tokens=10, stop=("never-appears", stop)))
    assert r.finish_reason == "stop"
    assert r.text == free.text[:cut]
    assert r.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3]) + 1]


def test_prompt_longer_than_context_is_rejected(tiny):
    model, _ = tiny
    ctx = model.cfg.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt 1 has {ctx + 5} tokens but the model's context is {ctx} tokens"):
        generate(model, [[5, 6], [7] * (ctx + 5)], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], SamplingParams())
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        generate(model, [[5], [6]], [SamplingParams()])


def test_generation_stops_at_context_end(tiny):
    model, _ = tiny
    ctx = model.cfg.max_position_embeddings
    prompt = (np.arange(ctx - 3) % 90 + 4).tolist()
    [r] = generate(model, [prompt], SamplingParams(max_tokens=10))
    assert (len(r.token_ids), r.finish_reason) == (3, "length")


def test_compiles_stay_within_buckets(tiny):
    model, _ = tiny
    sp = SamplingParams(max_tokens=6)
    generate(model, [[5] * 3], sp)
    before = (dg._prefill._cache_size(), dg._decode_step._cache_size())
    for n in (4, 7, 9):  # all in the 16-token prompt bucket, batch bucket 1, cache bucket 16
        generate(model, [[5] * n], sp)
    generate(model, [[5] * 3], SamplingParams(max_tokens=6, temperature=0.9, top_k=5, seed=3))
    assert (dg._prefill._cache_size(), dg._decode_step._cache_size()) == before


def test_empty_batch(tiny):
    assert generate(tiny[0], [], SamplingParams()) == []


def test_complete_raw_and_chat(tiny):
    model, _ = tiny
    sp = SamplingParams(max_tokens=4)
    raw = complete(model, "hi", sp)
    assert raw.prompt_tokens == len(model.tokenizer.encode("hi", add_special_tokens=True)) == 3
    assert raw.token_ids == generate(model, [model.tokenizer.encode("hi", add_special_tokens=True)], sp)[0].token_ids
    chat = complete(model, "hi", sp, chat=True)
    assert chat.prompt_tokens == len("[user]hi[assistant]")
