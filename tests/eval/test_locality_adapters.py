"""Locality variants with block-attention adapters (span-parallel+alora, +lora) on a tiny
random model: the aLoRA variant's document pages are cache hits from the base variant's
query (cached_tokens), the adapter changes no document KV in the pool, and the run
loads the adapters named in the config."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_byte import CFG, tiny_model

from spanjax.adapters import AdapterConfig, export_peft, init_adapter
from spanjax.config import ConfigError
from spanjax.engine.adapters import lower_for_engine
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.sampling import SamplingParams
from spanjax.eval import locality as L
from spanjax.eval.experiments import load_config, run
from spanjax.runs import load_items
from spanjax.training.block_adapter import opening_ids

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAGE = 8


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model(3)
    tok = model.tokenizer
    inv = opening_ids(tok, "user", "Question:")  # what `spanjax train block-adapter` invokes the aLoRA with
    adapters = {
        "alora": init_adapter(
            AdapterConfig(
                kind="alora", r=4, alpha=8, target_modules=("q", "k", "v", "o", "down"), invocation_tokens=inv
            ),
            CFG,
            jax.random.key(1),
            b_scale=0.5,
        ),
        "lora": init_adapter(
            AdapterConfig(kind="lora", r=2, alpha=4, target_modules=("q", "v")), CFG, jax.random.key(2), b_scale=0.5
        ),
    }
    return model, tok, adapters


def _pages(engine, plan, spans):
    """{page key: (page id, K, V)} of the given spans' pages in the engine's pool."""
    out = {}
    for s in spans:
        for key in s.page_keys:
            page = engine.pool._index[key]
            k, v = (engine.cache.by_layer(x)[:, page] for x in (engine.cache.k, engine.cache.v))
            out[key] = (page, np.asarray(k), np.asarray(v))
    return out


def test_alora_variant_hits_base_document_pages_and_changes_no_document_kv(tiny):
    model, tok, adapters = tiny
    ex = L.locality_examples(L.LocalityEval(split="dev", num_docs=3, num_questions=1, max_doc_tokens=24), 0, tok)[0]
    eng = Engine(model, EngineConfig(num_pages=256, page_size=PAGE, max_tokens_per_step=128, attention="reference"))
    eng.register_adapter("alora", adapters["alora"])
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)
    lower = lambda variant: lower_for_engine(
        L.make_g(ex, 1, variant, "tiny", 2),
        tok,
        model="tiny",
        page_size=PAGE,  # noqa: E731
        adapters=eng.adapters,
    )
    base, alora = lower("span-parallel"), lower("span-parallel+alora")
    assert alora.adapter == "alora" and base.adapter is None
    # Same prompt; system and documents keyed as base pages, the question (the invocation) onward adapted.
    docs = base.spans[:-1]
    assert [s.page_keys for s in alora.spans[:-1]] == [s.page_keys for s in docs]
    assert (
        alora.spans[-1].token_ids[: len(adapters["alora"].config.invocation_tokens)]
        == adapters["alora"].config.invocation_tokens
    )
    n_docs = sum(len(s) for s in docs)

    eng.generate([base], sampling)
    before = _pages(eng, base, docs)
    req = eng.generate([alora], sampling)[0]
    assert req.metrics.cached_tokens == n_docs  # every system/document token is a hit
    after = _pages(eng, base, docs)
    for key, (page, k, v) in before.items():
        assert after[key][0] == page
        np.testing.assert_array_equal(after[key][1], k)
        np.testing.assert_array_equal(after[key][2], v)
    # Cold: the aLoRA query alone writes exactly the base model's document KV.
    eng.clear_cache()
    cold = eng.generate([lower("span-parallel+alora")], sampling)[0]
    assert cold.metrics.cached_tokens == 0
    for key, (_, k, v) in _pages(eng, alora, docs).items():
        np.testing.assert_array_equal(k, before[key][1])
        np.testing.assert_array_equal(v, before[key][2])
    assert cold.generated == req.generated


def smoke_cfg(tmp_path, *extra):
    return load_config(
        CONFIGS / "locality_nq_smoke.yaml",
        [f"out_dir={tmp_path}", "model=tiny", f"engine.page_size={PAGE}", "engine.attention=reference", *extra],
    )


def test_locality_run_with_adapter_variants(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    model, tok, adapters = tiny
    dirs = {}
    for name, ad in adapters.items():
        dirs[name] = str(tmp_path / name)
        export_peft(ad, dirs[name], base_model_name_or_path="tiny")
    with pytest.raises(ConfigError, match="eval.alora_adapter"):
        smoke_cfg(tmp_path, "eval.variants=[span-parallel, span-parallel+alora]")
    with pytest.raises(ValueError, match="is a lora adapter, expected alora"):
        run(
            smoke_cfg(tmp_path, "eval.variants=[span-parallel+alora]", f"eval.alora_adapter={dirs['lora']}"),
            model=model,
        )
    # The kv task's question has no "Question:" message to invoke this aLoRA on: refused
    # before any item runs (the stock variant listed first computes nothing).
    kv = load_config(
        CONFIGS / "locality_kv_smoke.yaml",
        [f"out_dir={tmp_path}", "model=tiny", f"engine.page_size={PAGE}", "engine.attention=reference"]
        + ["eval.variants=[stock, span-parallel+alora]", f"eval.alora_adapter={dirs['alora']}"],
    )
    with monkeypatch.context() as m:
        m.setattr(Engine, "submit", lambda *a, **k: pytest.fail("an item ran"))
        with pytest.raises(ConfigError, match=r"span-parallel\+alora cannot run on the kv task's prompt: .*invocation"):
            run(kv, model=model)
    cfg = smoke_cfg(
        tmp_path,
        "eval.variants=[span-parallel, span-parallel+alora, span-parallel+lora]",
        "eval.num_questions=1",
        "eval.positions=[0, 2]",
        "eval.max_tokens=4",
        f"eval.alora_adapter={dirs['alora']}",
        f"eval.lora_adapter={dirs['lora']}",
    )
    res, d = run(cfg, model=model)
    assert res["adapters"] == {"alora": dirs["alora"], "lora": dirs["lora"]}
    assert set(res["accuracy"]) == {"span-parallel", "span-parallel+alora", "span-parallel+lora"}
    items = load_items(d)
    by_q = {ex.index: ex for ex in L.locality_examples(cfg.eval, cfg.seed, tok)}
    for (v, q, _position), r in items.items():
        if v == "span-parallel+alora":  # only the question message and the assistant header are computed
            final = len(tok.encode_message("user", by_q[q].question)) + len(tok.generation_prefix_ids())
            assert r["cached_tokens"] == r["prompt_tokens"] - final
    outs = lambda v: [items[k]["output"] for k in sorted(items) if k[0] == v]  # noqa: E731
    assert outs("span-parallel+alora") != outs("span-parallel") and outs("span-parallel+lora") != outs("span-parallel")
