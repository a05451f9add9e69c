"""spnl's endpoint, POST /v1/query/execute, through httpx: both stream modes, the three forms,
a RAG query sent twice with its plus children reordered (the second hits the documents'
pages), /metrics parsed with prometheus_client showing those hits; and IBM's spnl client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from spanjax.engine.executor import run_query
from spanjax.query import syntax

DOCS = [
    "Document: The Eiffel Tower is in Paris. It was completed in 1889 for the World's Fair.",
    "Document: The Colosseum is in Rome. It was completed in 80 AD under Titus.",
    "Document: The Parthenon is in Athens. It was completed in 438 BC.",
]


def rag(docs, max_tokens=6):
    return {"g": {"model": "tiny", "max_tokens": max_tokens, "temperature": 0.0, "input": {"cross": [
        {"system": "Answer using the documents."},
        {"plus": [{"user": d} for d in docs]},
        {"user": "When was the Eiffel Tower completed?"}]}}}  # fmt: skip


def metrics(http) -> dict[str, float]:
    """Every sample by name, summed over labels (histogram buckets left out)."""
    out = {}
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            if "le" not in s.labels:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def sse(lines) -> list[dict]:
    data = [ln.removeprefix("data: ") for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_rag_twice_reordered_hits_the_documents_pages(http, alone):
    before = metrics(http)
    first = http.post("/v1/query/execute", content=json.dumps(rag(DOCS)), headers={"content-type": "text/plain"})
    assert first.status_code == 200, first.text
    a = first.json()
    ref = run_query(alone, json.dumps(rag(DOCS))).final
    assert a["choices"][0]["message"]["content"] == ref.text  # greedy: equals the query run alone
    assert a["usage"]["prompt_tokens"] == ref.prompt_tokens
    second = http.post("/v1/query/execute?stream=false", json=rag(DOCS[::-1]))
    b = second.json()
    assert b["choices"][0]["message"]["content"] == ref.text  # a plus is commutative (prefix, sequential: approx.)
    doc_tokens = sum(len(d.encode()) + 2 for d in DOCS)  # byte tokenizer: role + bytes + end
    page = 4
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] >= doc_tokens - len(DOCS) * page
    assert b["generations"][0]["cached_tokens"] == b["usage"]["prompt_tokens_details"]["cached_tokens"]
    after = metrics(http)
    hits = after["spanjax_prefix_cache_hit_tokens_total"] - before["spanjax_prefix_cache_hit_tokens_total"]
    assert hits >= b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert after["spanjax_prefix_cache_query_tokens_total"] > before["spanjax_prefix_cache_query_tokens_total"]
    for name in ("spanjax_requests_running", "spanjax_requests_waiting", "spanjax_kv_pages_used",
                 "spanjax_kv_pages_cached", "spanjax_time_to_first_token_seconds_count",
                 "spanjax_e2e_request_latency_seconds_count", "spanjax_generation_tokens_total",
                 "spanjax_preemptions_total", "spanjax_compilations_total"):  # fmt: skip
        assert name in after, name
    assert after["spanjax_kv_pages_cached"] > 0 and after["spanjax_generation_tokens_total"] >= 12


def test_stream_matches_non_stream_in_every_form(http):
    q = syntax.parse(json.dumps(rag(DOCS[:2], max_tokens=5)))
    plain = http.post("/v1/query/execute", json=rag(DOCS[:2], max_tokens=5)).json()
    text = plain["choices"][0]["message"]["content"]
    for ctype, body in (("text/plain", syntax.to_json(q)), ("application/yaml", syntax.to_yaml(q)),
                        ("application/x-sexp", syntax.to_sexpr(q))):  # fmt: skip
        with http.stream("POST", "/v1/query/execute?stream=true", content=body, headers={"content-type": ctype}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = sse(r.iter_lines())
        assert all(c["object"] == "text_completion" for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == text, ctype
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]


def test_nested_query_value_and_generations(http):
    inner = {"g": {"model": "tiny", "max_tokens": 3, "input": {"user": "Say a word."}}}
    q = {"g": {"model": "tiny", "max_tokens": 4, "input": {"cross": [{"user": "Repeat:"}, inner]}}}
    r = http.post("/v1/query/execute", json=q).json()
    assert len(r["generations"]) == 2 and r["value"] == r["choices"][0]["message"]["content"]
    assert r["usage"]["completion_tokens"] == sum(g["generated_tokens"] for g in r["generations"])


def test_ibm_spnl_client_runs_unmodified(server):
    """PyPI spnl, model prefix openai/, OPENAI_API_BASE at the server: a g (chat completions) and a
    `map` (spnl sends its inputs as one /v1/completions request with a list of prompts). Its
    execute() holds the GIL while it waits for the HTTP answer, so it runs in its own process
    (in-process it would starve this server's thread)."""
    g = {"model": "openai/tiny", "max_tokens": 6, "temperature": 0.0,
         "input": {"cross": [{"system": "Be brief."}, {"user": "Name a colour."}]}}  # fmt: skip
    bulk = {"map": {"metadata": {"model": "openai/tiny", "max_tokens": 4, "temperature": 0.0}, "inputs": ["a", "bb"]}}
    code = (
        "import asyncio, json, spnl, sys\n"
        "out = [asyncio.run(spnl.execute(q)).data for q in sys.argv[1:]]\n"
        "sys.stderr.write(json.dumps(out))\n"
    )
    env = dict(os.environ, OPENAI_API_BASE=server.url + "/v1", OPENAI_API_KEY="none", NO_PROXY="127.0.0.1")
    argv = [sys.executable, "-c", code, json.dumps({"g": g}), json.dumps(bulk)]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    answer, mapped = json.loads(p.stderr)
    import httpx

    direct = httpx.post(server.url + "/v1/query/execute", json={"g": dict(g, model="tiny")}, timeout=60).json()
    assert answer == direct["choices"][0]["message"]["content"]
    alone = [
        httpx.post(
            server.url + "/v1/completions", json={"prompt": x, "max_tokens": 4, "temperature": 0}, timeout=60
        ).json()["choices"][0]["text"]
        for x in ("a", "bb")
    ]
    assert mapped == "\n".join(alone)  # spnl joins a map's outputs with newlines


def test_spnl_operators_map_zip_print_run(http, caplog):
    """spnl's map (value: the list of its generations, each the chat request alone), zip and print."""
    meta = {"model": "tiny", "max_tokens": 3, "temperature": 0.0}
    r = http.post("/v1/query/execute", json={"map": {"metadata": meta, "inputs": ["a", "bb"]}}).json()
    chat = lambda s: http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": s}],  # noqa: E731
                                                             "max_tokens": 3, "temperature": 0}).json()  # fmt: skip
    assert r["value"] == [chat(s)["choices"][0]["message"]["content"] for s in ("a", "bb")]
    assert len(r["generations"]) == 2
    zipped = {"zip": [{"print": "zipping"}, {"par": [{"user": "x"}, {"user": "y"}]}]}
    q = {"g": {**meta, "input": {"cross": [zipped, {"user": "go"}]}}}
    with caplog.at_level("INFO", logger="spanjax.query"):
        r = http.post("/v1/query/execute", json=q)
    assert r.status_code == 200 and isinstance(r.json()["value"], str)
    assert "print: zipping" in caplog.text
    bad = http.post("/v1/query/execute", json={"augment": {"q": 1}})
    assert bad.status_code == 400 and "augment" in bad.json()["error"]["message"]
