"""Malformed bodies get 4xx (never a 500 or a hung connection), a dropped stream frees its
pages, a full queue answers 429, a slow request times out, a pool-sized request gets the page
counts, an exception in one request fails only that request, and the API key is checked."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from conftest import pages_in_use

from spanjax.server import Server, ServerConfig

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
QUERY = {"g": {"model": "tiny", "max_tokens": 4, "input": {"user": "hi"}}}


VALID = {("temperature", "1.5"), ("temperature", "0"), ("seed", "0"), ("stop", "'x'"), ("stop", "[]"),
         ("stream", "True"), ("stream_options", "{}"), ("prompt", "'x'"), ("prompt", "[1]")}  # fmt: skip


def malformed():
    """(path, content, content-type) of bodies every endpoint must refuse with a 4xx."""
    bad_values = [None, True, -1, 0, 1.5, "x", [], {}, [1], 10**30, float("nan"), "\ud800"]
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "tiny", "prompt": "hi"})):
        for key in ("messages" if "chat" in path else "prompt", "max_tokens", "max_completion_tokens", "n",
                    "temperature", "top_p", "seed", "stop", "stream", "stream_options", "model"):  # fmt: skip
            for v in bad_values:
                if v is None and key not in ("messages", "prompt") or (key, repr(v)) in VALID:
                    continue
                body = dict(base, **{key: v})
                yield path, json.dumps(body, allow_nan=True), "application/json"
        for raw in ("", "{", "[]", "null", '"x"', "[" * 100_000, "{" + '"a":' * 50_000, "1" * 5000):
            yield path, raw, "application/json"
    yield (
        "/v1/chat/completions",
        json.dumps(dict(CHAT, messages=[{"role": "tool", "content": "x"}])),
        "application/json",
    )
    yield (
        "/v1/chat/completions",
        json.dumps(dict(CHAT, messages=[{"role": "user", "content": [{"type": "image"}]}])),
        "",
    )
    queries = [
        "", "{", "null", "[]", '{"g": {}}', '{"g": {"model": "tiny"}}', '{"frobnicate": {"n": 1}}',
        '{"g": {"model": "tiny", "input": {"user": 5}}}',
        '{"g": {"model": "tiny", "max_tokens": -3, "input": {"user": "x"}}}',
        '{"g": {"model": "tiny", "max_tokens": 100000000, "input": {"user": "x"}}}',
        '{"g": {"model": "tiny", "max_tokens": 4095, "input": {"user": "x"}}}',
        '{"repeat": {"n": -1, "g": {"model": "tiny", "input": {"user": "x"}}}}',
        '{"g": {"model": "tiny", "input": {"plus": []}}}', '{"g": {"model": "tiny", "input": {"user": "\\ud800"}}}',
        '{"g": {"model": "tiny", "adapter": "nope", "input": {"user": "x"}}}',
        '{"g": {"model": "tiny", "input": {"assistant": "x", "token_ids": [999999999999]}}}',
        "(g", "(frob 1)", "g: [1, 2", "- - - [" * 1000, "\x00" * 1000, "[" * 5000,
    ]  # fmt: skip
    for q in queries:
        for ctype in ("text/plain", "application/json", "application/yaml", "application/x-sexp"):
            yield "/v1/query/execute", q, ctype
    yield "/v1/query/execute?stream=maybe", json.dumps(QUERY), "text/plain"


def test_malformed_bodies_get_4xx_with_a_message(http):
    n = 0
    for path, content, ctype in malformed():
        r = http.post(path, content=content.encode("utf-8", "surrogatepass"), headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, (path, content[:200], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["message"] and set(err) == {"message", "type", "param", "code"}, r.text
        n += 1
    assert n >= 300
    assert http.get("/health").json()["status"] == "ok"


def test_a_10_mb_body_gets_413(http):
    for path in ("/v1/query/execute", "/v1/chat/completions"):
        r = http.post(path, content=b"{" + b" " * 10_000_000 + b"}")
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]


def test_a_request_that_never_fits_the_pool_gets_the_page_counts(http):
    q = {"g": {"model": "tiny", "max_tokens": 2000, "input": {"user": "x"}}}  # 255 pages of 4 tokens: too few
    r = http.post("/v1/query/execute", json=q)
    assert r.status_code == 400 and "KV pages" in r.json()["error"]["message"]


def test_client_gone_mid_stream_frees_its_pages(server, http):
    body = dict(CHAT, max_tokens=400, stream=True, temperature=0)
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a few tokens, then hang up
        assert any('"content"' in g for g in got)
    assert pages_in_use(server) == 0
    # Non-streaming client that gives up: the server notices and aborts too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=dict(CHAT, max_tokens=400), timeout=1.0)
    assert pages_in_use(server) == 0
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving


def test_full_queue_429_and_timeout_504(server, http):
    cfg = server.config
    try:
        server.config = dataclasses.replace(cfg, max_pending=1, request_timeout_s=1.0)
        with http.stream("POST", "/v1/chat/completions", json=dict(CHAT, max_tokens=400, stream=True)) as r:
            lines = r.iter_lines()
            next(lines)
            busy = http.post("/v1/chat/completions", json=CHAT)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            tail = list(lines)  # the stream ends with an error event after the timeout
        assert any("timed out" in ln for ln in tail) and "data: [DONE]" in tail
        server.config = dataclasses.replace(cfg, request_timeout_s=1.0)
        r = http.post("/v1/chat/completions", json=dict(CHAT, max_tokens=400))
        assert r.status_code == 504
    finally:
        server.config = cfg
    assert pages_in_use(server) == 0


def test_an_exception_in_one_request_fails_only_that_request(server, http, monkeypatch):
    import spanjax.engine.executor as executor

    def broken(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(executor, "lower_for_engine", broken)  # the loop lowers waves after the first
    nested = {"g": {"model": "tiny", "max_tokens": 2, "input": {"cross": [{"user": "a"}, QUERY]}}}
    r = http.post("/v1/query/execute", json=nested)
    assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert http.post("/v1/query/execute", json=QUERY).status_code == 200
    assert pages_in_use(server) == 0


def test_api_key(server):
    from starlette.testclient import TestClient

    secured = Server(server.engine, ServerConfig(api_key="sekret"))
    c = TestClient(secured.app)  # not entered: the lifespan (a second stepping loop) never runs
    assert c.get("/health").status_code == 503  # open without a key (503: this app's loop is not started)
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).json()["data"][0]["id"] == "tiny"
    r = c.post("/v1/query/execute", content=b"{}")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
