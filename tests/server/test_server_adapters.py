"""Adapters at run time: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, chosen by
`model` (OpenAI) or `adapter` (span queries); output equals an engine with the adapter registered
directly; an aLoRA query reuses the base query's pages; `spanjax serve --adapter` is checked."""

from __future__ import annotations

import json

import jax
import openai
import pytest

from spanjax.adapters import AdapterConfig, init_adapter
from spanjax.adapters.peft_format import export_peft
from spanjax.cli.main import main
from spanjax.engine.engine import Engine
from spanjax.engine.executor import run_query
from spanjax.query import ast as A

INVOCATION = "Answerable?"
CONTEXT = "The river runs north past the old mill and the stone bridge."


def fresh_engine(server) -> Engine:
    """An engine of its own: the server's model and config."""
    return Engine(server.engine.model, server.engine.config)


@pytest.fixture(scope="module")
def adapter_dirs(server, tmp_path_factory):
    model = server.engine.model
    inv = tuple(model.tokenizer.encode_message("user", INVOCATION))
    made = {
        "lo": init_adapter(
            AdapterConfig(kind="lora", r=2, alpha=4, target_modules=("q", "v", "up")),
            model.cfg,
            jax.random.key(2),
            b_scale=0.5,
        ),
        "ans": init_adapter(
            AdapterConfig(kind="alora", r=4, alpha=8, invocation_tokens=inv), model.cfg, jax.random.key(1), b_scale=0.5
        ),
    }
    dirs = {}
    for name, ad in made.items():
        dirs[name] = str(tmp_path_factory.mktemp(name))
        export_peft(ad, dirs[name])
    return dirs


@pytest.fixture(scope="module")
def alone_with_adapters(server, adapter_dirs):
    from spanjax.server.app import load_adapter

    eng = fresh_engine(server)
    for name, path in adapter_dirs.items():
        eng.register_adapter(name, load_adapter(path, eng))
    return eng


def chat_g(adapter):
    return A.G("tiny", A.Cross((A.user("Name a colour."),)), max_tokens=8, temperature=0.0, adapter=adapter)


def alora_query(adapter):
    g = {"model": "tiny", "max_tokens": 6, "input": {"cross": [{"user": CONTEXT}, {"user": INVOCATION}]}}
    return {"g": {**g, "adapter": adapter} if adapter else g}


def model_ids(http):
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_load_use_and_unload_at_run_time(server, http, adapter_dirs, alone_with_adapters):
    load = lambda name, path: http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})  # noqa: E731
    try:
        assert load("lo", adapter_dirs["lo"]).status_code == 200
        assert load("ans", adapter_dirs["ans"]).status_code == 200
        assert {"lo", "ans"} <= set(model_ids(http))
        # Errors: loaded twice, the base model's name, a missing directory, a bad body.
        assert load("lo", adapter_dirs["lo"]).status_code == 400
        assert load("tiny", adapter_dirs["lo"]).status_code == 400
        bad = load("nope", adapter_dirs["lo"] + "-missing")
        assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
        assert http.post("/v1/load_lora_adapter", json={"lora_path": "x"}).status_code == 400

        # OpenAI: `model` picks the adapter; greedy output equals the engine with it registered directly.
        with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
            r = client.chat.completions.create(model="lo", messages=[{"role": "user", "content": "Name a colour."}],
                                               max_tokens=8, temperature=0)  # fmt: skip
        adapted = run_query(alone_with_adapters, chat_g("lo")).final.text
        assert r.choices[0].message.content == adapted
        assert adapted != run_query(alone_with_adapters, chat_g(None)).final.text  # the adapter changes the output

        # Span queries: `adapter` in a g. The aLoRA's prompt before the invocation keys as base pages,
        # so after the base query the adapted one finds the context cached.
        base = http.post("/v1/query/execute", content=json.dumps(alora_query(None))).json()
        res = http.post("/v1/query/execute", content=json.dumps(alora_query("ans"))).json()
        ref = run_query(alone_with_adapters, json.dumps(alora_query("ans"))).final
        assert res["choices"][0]["message"]["content"] == ref.text
        assert base["usage"]["prompt_tokens"] > 0
        assert res["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(CONTEXT) // 2
    finally:
        for name in ("lo", "ans"):
            http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert not {"lo", "ans"} & set(model_ids(http))
    gone = http.post("/v1/chat/completions", json={"model": "lo", "messages": [{"role": "user", "content": "x"}]})
    assert gone.status_code == 404
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "lo"}).status_code == 404


def test_unload_is_refused_while_adapted_requests_run(server, adapter_dirs):
    from spanjax.server.app import load_adapter

    eng = fresh_engine(server)
    eng.register_adapter("lo", load_adapter(adapter_dirs["lo"], eng))
    run_query(eng, chat_g(None))  # leaves cached pages
    from spanjax.engine.adapters import lower_for_engine
    from spanjax.engine.executor import sampling_for

    g = chat_g("lo")
    req = eng.submit(lower_for_engine(g, eng.model.tokenizer, model="tiny", page_size=4, adapters=eng.adapters),
                     sampling_for(g))  # fmt: skip
    with pytest.raises(RuntimeError, match="adapted requests"):
        eng.unregister_adapter("lo")
    eng.run_until_done([req])
    assert eng.pool.num_cached() > 0
    eng.unregister_adapter("lo")
    assert eng.adapters == {} and eng.pool.num_cached() == 0  # no page keyed with it survives
    assert run_query(eng, chat_g(None)).final.generated_tokens > 0  # the base model still runs
    with pytest.raises(KeyError):
        eng.unregister_adapter("lo")


def test_serve_adapter_flag_is_checked_before_loading(capsys):
    assert main(["serve", "--model", "smollm2-135m", "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
