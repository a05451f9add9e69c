"""The ASGI app: spnl's span-query endpoint and the OpenAI API over one shared engine.

    server = Server(engine, ServerConfig(api_key=None))
    uvicorn.run(server.app, host="127.0.0.1", port=8000)

Endpoints (docs/server.md): POST /v1/query/execute?stream=, POST /v1/chat/completions,
POST /v1/completions, GET /v1/models, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter,
GET /health, GET /metrics.

Every request is bounded before it reaches the engine: body bytes (MAX_QUERY_BYTES), n,
max_tokens (the model's context), prompt + max_tokens summed over all of a request's g's
(`max_total_tokens`), HTTP requests in flight (`max_pending`, then 429 + Retry-After), and
time (`request_timeout_s`). Parsing and lowering run in a worker thread, not on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from spanjax.adapters.peft_format import load_peft
from spanjax.engine.adapters import lower_for_engine
from spanjax.engine.engine import Engine
from spanjax.engine.executor import log_prints, sampling_for
from spanjax.query import ast as A
from spanjax.query.errors import SpanQueryError
from spanjax.query.passes import prepare, ready
from spanjax.query.syntax import MAX_QUERY_BYTES, parse
from spanjax.server import openai_api as oa
from spanjax.server.loop import CLIENT_ERRORS, EngineLoop, Job, JobError, JobResult, Sink, error_for
from spanjax.server.metrics import Metrics

log = logging.getLogger("spanjax.server")

DEFAULT_QUERY_MAX_TOKENS = 128  # a g without max_tokens (the executor's default)
# Content types of the three query forms; anything else (spnl sends JSON as text/plain) is sniffed.
QUERY_FORMATS = {
    "application/json": "json",
    "application/yaml": "yaml",
    "application/x-yaml": "yaml",
    "text/yaml": "yaml",
    "text/x-yaml": "yaml",
    "application/x-sexp": "sexpr",
    "application/x-sexpr": "sexpr",
    "text/x-sexp": "sexpr",
    "text/x-sexpr": "sexpr",
}
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body is read (and dropped) up to this, then the answer is 413


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  # required as `Authorization: Bearer KEY` everywhere but /health
    max_pending: int = 256  # HTTP requests in flight (queued or running); more get 429
    max_n: int = 16  # choices per OpenAI request
    max_prompts: int = 64  # prompts in one /v1/completions request (spnl's `map` sends a list)
    request_timeout_s: float = 600.0  # a request still running after this is aborted (504)
    max_body_bytes: int = MAX_QUERY_BYTES
    max_total_tokens: int = 1 << 20  # prompt + max_tokens summed over a request's g's
    default_max_tokens: int = 256  # OpenAI requests without max_tokens (clipped to the context)
    retry_after_s: int = 1


class _Fail(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def _error(status: int, message: str, kind: str = "invalid_request_error", param=None, headers=None) -> JSONResponse:
    code = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded",
            504: "timeout"}.get(status)  # fmt: skip
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogates in the answer
    return JSONResponse(oa.error_body(message, kind, param, code), status_code=status, headers=headers)


class _AsyncSink(Sink):
    """Delivers a job's events onto the handler's event loop."""

    def __init__(self, aloop: asyncio.AbstractEventLoop, on_end: Callable[[], None]):
        self.aloop, self.q, self.on_end = aloop, asyncio.Queue(), on_end
        self.ended = False

    def _put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop closed (shutdown)
            self.aloop.call_soon_threadsafe(self.q.put_nowait, item)

    def _end(self, item) -> None:
        self._put(item)
        with contextlib.suppress(RuntimeError):
            self.aloop.call_soon_threadsafe(self.on_end)

    def delta(self, index, text):
        self._put(("delta", index, text))

    def done(self, result):
        self._end(("done", result))

    def error(self, err):
        self._end(("error", err))


class _Auth:
    """Pure ASGI middleware (streams and disconnects pass through untouched)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"] != "/health":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, b"Bearer " + self.key.encode()):
                await _error(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error")(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


class Server:
    """One engine, its stepping loop and the Starlette app (`.app`) serving them."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None):
        config = config or ServerConfig()
        self.engine, self.config = engine, config
        self.name = engine.model.name
        self.context = engine.model.cfg.max_position_embeddings
        self.loop = EngineLoop(engine)
        self.metrics = Metrics(lambda: self.loop.snapshot, lambda: self.loop.step_errors)
        self.loop.on_finish = self.metrics.request_finished
        self.inflight = 0
        routes = [
            Route("/v1/query/execute", self.query_execute, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        self.starlette = Starlette(routes=routes, lifespan=self._lifespan)
        self.app = _Auth(self.starlette, config.api_key)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        if not self.loop.alive:
            self.loop.start()
        yield
        # uvicorn has drained the open connections (graceful shutdown); stop the stepping thread.
        await run_in_threadpool(self.loop.stop)

    # -- plumbing ----------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_DRAIN_BYTES:
            raise _Fail(413, f"request body of {declared} bytes; at most {limit} bytes")
        chunks, n = [], 0
        try:
            async for chunk in request.stream():
                n += len(chunk)
                if n <= limit:
                    chunks.append(chunk)
                elif n > MAX_DRAIN_BYTES:
                    break
        except ClientDisconnect:
            raise _Fail(400, "client disconnected while sending the body") from None
        if n > limit:
            raise _Fail(413, f"request body of {n}+ bytes; at most {limit} bytes (MAX_QUERY_BYTES)")
        return b"".join(chunks)

    async def _json(self, request: Request) -> dict:
        raw = await self._body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _Fail(400, f"the body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise _Fail(400, "the request body must be a JSON object")
        return body

    def _check_model(self, model: str | None) -> str | None:
        """The adapter an OpenAI `model` names (None = the base model); 404 for an unknown name."""
        if model is None or model == self.name:
            return None
        if model in self.engine.adapters:
            return model
        known = [self.name, *self.engine.adapters]
        raise _Fail(404, f"the model {model!r} does not exist; this server has {known}", "NotFoundError", "model")

    def _admit(self) -> None:
        if self.inflight >= self.config.max_pending:
            self.metrics.rejected.inc()
            raise _Fail(
                429,
                f"the server has {self.inflight} requests in flight (max_pending); retry later",
                "rate_limit_error",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )

    def _end(self) -> None:
        self.inflight -= 1

    async def _guard(self, endpoint: str, handler) -> Response:
        """Run `handler`, turning every failure into an OpenAI error body (never a bare 500)."""
        t0 = time.perf_counter()
        try:
            self._admit()
            resp = await handler()
        except _Fail as e:
            resp = _error(e.status, e.message, e.kind, e.param, e.headers)
        except oa.BadRequest as e:
            resp = _error(e.status, e.message, e.kind, e.param)
        except SpanQueryError as e:
            resp = _error(400, str(e), "invalid_request_error")
        except JobError as e:
            resp = _error(e.status, e.message, e.kind)
        except CLIENT_ERRORS as e:  # an unknown adapter, a plan past the context, ...
            err = error_for(e)
            resp = _error(err.status, err.message, err.kind)
        except Exception as e:  # noqa: BLE001
            log.exception("unhandled error in %s", endpoint)
            resp = _error(500, f"internal error: {type(e).__name__}", "internal_error")
        if not isinstance(resp, StreamingResponse):
            self.metrics.e2e.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.http.labels(endpoint, str(resp.status_code)).inc()
        return resp

    def _start(self, query, first, stream: bool) -> tuple[Job, _AsyncSink]:
        sink = _AsyncSink(asyncio.get_running_loop(), self._end)
        job = Job(query, first, sink, stream)
        self.inflight += 1
        self.loop.submit(job)
        return job, sink

    async def _result(self, request: Request, job: Job, sink: _AsyncSink) -> JobResult:
        """Wait for a job (non-streaming), aborting it if the client leaves or time runs out."""
        deadline = time.monotonic() + self.config.request_timeout_s
        while True:
            try:
                ev = await asyncio.wait_for(sink.q.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    self.loop.abort(job)
                    raise _Fail(499, "client disconnected") from None
                if time.monotonic() > deadline:
                    self.loop.abort(job)
                    raise _Fail(504, f"request timed out after {self.config.request_timeout_s} s", "timeout") from None
                continue
            if ev[0] == "done":
                return ev[1]
            if ev[0] == "error":
                raise ev[1]

    async def _events(self, job: Job, sink: _AsyncSink) -> AsyncIterator[tuple]:
        """A job's events (streaming); aborts the job if the consumer stops early (disconnect)."""
        deadline = time.monotonic() + self.config.request_timeout_s
        finished = False
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(sink.q.get(), timeout=max(deadline - time.monotonic(), 0.01))
                except TimeoutError:
                    yield ("error", JobError(504, f"request timed out after {self.config.request_timeout_s} s"))
                    return
                if ev[0] != "delta":
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.loop.abort(job)

    def _sse(self, endpoint: str, gen: AsyncIterator[dict | str]) -> StreamingResponse:
        t0 = time.perf_counter()

        async def body():
            status = "200"
            try:
                async for item in gen:
                    yield "data: " + (item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)) + "\n\n"
            except asyncio.CancelledError:
                status = "499"
                raise
            finally:
                with contextlib.suppress(Exception):
                    await gen.aclose()
                self.metrics.e2e.labels(endpoint).observe(time.perf_counter() - t0)
                self.metrics.http.labels(endpoint, status).inc()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- span queries --------------------------------------------------------------------

    def _prepare_query(self, raw: bytes, fmt: str | None):
        """Parse, bound and lower the first wave (a worker thread)."""
        parsed = parse(raw, fmt)
        log_prints(parsed)
        q = prepare(parsed)
        gs = {n for n in A.walk(q) if isinstance(n, A.G)}
        new = 0
        for g in gs:
            mt = g.max_tokens if g.max_tokens is not None else DEFAULT_QUERY_MAX_TOKENS
            if mt >= self.context:
                raise oa.BadRequest(f"a g asks for max_tokens {mt}; the model's context is {self.context} tokens")
            new += mt
        tok, ps = self.engine.model.tokenizer, self.engine.config.page_size
        first = []
        for g in ready(q):
            plan = lower_for_engine(g, tok, model=self.name, page_size=ps, adapters=self.engine.adapters)
            first.append((g, plan, sampling_for(g)))
        total = new + sum(p.num_tokens for _, p, _ in first)
        if total > self.config.max_total_tokens:
            raise oa.BadRequest(
                f"the query asks for {total} tokens (prompts + max_tokens over its g's); "
                f"at most {self.config.max_total_tokens} (max_total_tokens)"
            )
        return q, first

    async def query_execute(self, request: Request) -> Response:
        return await self._guard("query", lambda: self._query_execute(request))

    async def _query_execute(self, request: Request) -> Response:
        stream = request.query_params.get("stream", "false").lower()
        if stream not in ("true", "false", "1", "0"):
            raise _Fail(400, f"stream must be true or false, got {stream[:40]!r}", param="stream")
        stream = stream in ("true", "1")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await self._body(request)
        q, first = await run_in_threadpool(self._prepare_query, raw, QUERY_FORMATS.get(ctype))
        job, sink = self._start(q, first, stream)
        rid, created = oa.new_id("spnl"), oa.now()
        if not stream:
            res = await self._result(request, job, sink)
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": self.name,
                    "choices": [
                        {
                            "index": c.index,
                            "message": {"role": "assistant", "content": c.text},
                            "finish_reason": oa.finish_reason(c.finish_reason),
                            "logprobs": None,
                        }
                        for c in res.choices
                    ],
                    "usage": res.usage(),
                    "value": res.value,
                    "generations": [g.to_json() for g in res.generations],
                }
            )

        async def chunks():
            def chunk(choices, **extra):
                return {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                        "choices": choices, **extra}  # fmt: skip

            async for ev in self._events(job, sink):
                if ev[0] == "delta":
                    yield chunk([{"index": ev[1], "text": ev[2], "logprobs": None, "finish_reason": None}])
                elif ev[0] == "done":
                    res: JobResult = ev[1]
                    fin = [
                        {
                            "index": c.index,
                            "text": "",
                            "logprobs": None,
                            "finish_reason": oa.finish_reason(c.finish_reason),
                        }
                        for c in res.choices
                    ]
                    yield chunk(fin, usage=res.usage())
                else:
                    yield oa.error_body(ev[1].message, ev[1].kind)
            yield "[DONE]"

        return self._sse("query", chunks())

    # -- OpenAI ---------------------------------------------------------------------------

    def _clip_max_tokens(self, common: oa.Common, plan) -> None:
        end = max(max(s.positions) for s in plan.spans)
        room = self.context - 1 - end
        if room < 1:
            raise oa.BadRequest(
                f"the prompt ({plan.num_tokens} tokens) fills the model's context of {self.context} tokens", "messages"
            )
        if common.max_tokens > room:
            if common.explicit_max_tokens:
                raise oa.BadRequest(
                    f"this model's maximum context length is {self.context} tokens; the prompt takes "
                    f"{plan.num_tokens} and max_tokens asks for {common.max_tokens}",
                    "max_tokens",
                )
            common.max_tokens = room
        if plan.num_tokens + common.n * common.max_tokens > self.config.max_total_tokens:
            raise oa.BadRequest(f"prompt + n * max_tokens is more than {self.config.max_total_tokens} tokens", "n")

    def _prepare_chat(self, body: dict):
        common = oa.Common(
            body, max_n=self.config.max_n, context=self.context, default_max_tokens=self.config.default_max_tokens
        )
        adapter = self._check_model(common.model)
        prompt = oa.chat_messages(body)
        tok, ps = self.engine.model.tokenizer, self.engine.config.page_size
        g0 = common.g(self.name, prompt, 0, adapter)
        plan = lower_for_engine(g0, tok, model=self.name, page_size=ps, adapters=self.engine.adapters)
        self._clip_max_tokens(common, plan)
        gs = [common.g(self.name, prompt, i, adapter) for i in range(common.n)]
        q = A.Par(tuple(gs))
        first = [(g, plan, sampling_for(g)) for g in gs]  # same prompt: one lowering
        return common, q, first

    def _prepare_completion(self, body: dict):
        common = oa.Common(
            body, max_n=self.config.max_n, context=self.context, default_max_tokens=self.config.default_max_tokens
        )
        if self._check_model(common.model) is not None:
            raise oa.BadRequest("adapters are served through /v1/chat/completions and span queries", "model")
        prompts = oa.completion_prompts(body, self.engine.model.tokenizer, self.config.max_prompts)
        plans = [oa.raw_plan(ids, model=self.name, page_size=self.engine.config.page_size) for ids in prompts]
        for plan in plans:  # clips max_tokens to the room the longest prompt leaves
            self._clip_max_tokens(common, plan)
        total = sum(p.num_tokens for p in plans) + len(plans) * common.n * common.max_tokens
        if total > self.config.max_total_tokens:
            limit = self.config.max_total_tokens
            raise oa.BadRequest(f"prompts + n * max_tokens is more than {limit} tokens", "prompt")
        # Choice k * n + i is the i-th sample of prompt k (OpenAI's order for a list of prompts).
        first = [(None, p, sampling_for(common.g(self.name, A.user(""), i))) for p in plans for i in range(common.n)]
        return common, None, first

    async def chat_completions(self, request: Request) -> Response:
        return await self._guard("chat", lambda: self._openai(request, chat=True))

    async def completions(self, request: Request) -> Response:
        return await self._guard("completions", lambda: self._openai(request, chat=False))

    async def _openai(self, request: Request, chat: bool) -> Response:
        body = await self._json(request)
        prep = self._prepare_chat if chat else self._prepare_completion
        common, q, first = await run_in_threadpool(prep, body)
        job, sink = self._start(q, first, common.stream)
        rid, created = oa.new_id("chatcmpl" if chat else "cmpl"), oa.now()
        obj = "chat.completion" if chat else "text_completion"
        if not common.stream:
            res = await self._result(request, job, sink)
            choices = [
                {"index": c.index, "finish_reason": oa.finish_reason(c.finish_reason), "logprobs": None}
                | ({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})
                for c in res.choices
            ]
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": common.model or self.name,
                    "choices": choices,
                    "usage": res.usage(choices_per_prompt=common.n),
                }  # fmt: skip
            )

        model = common.model or self.name
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra):
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}

        def piece(i, text, fin=None):
            d = {"index": i, "logprobs": None, "finish_reason": fin}
            return d | ({"delta": {"content": text} if text or fin is None else {}} if chat else {"text": text})

        async def chunks():
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(common.n)])  # fmt: skip
            async for ev in self._events(job, sink):
                if ev[0] == "delta":
                    yield chunk([piece(ev[1], ev[2])])
                elif ev[0] == "done":
                    res: JobResult = ev[1]
                    yield chunk([piece(c.index, "", oa.finish_reason(c.finish_reason)) for c in res.choices])
                    if common.include_usage:
                        yield chunk([], usage=res.usage(choices_per_prompt=common.n))
                else:
                    yield oa.error_body(ev[1].message, ev[1].kind)
            yield "[DONE]"

        return self._sse("chat" if chat else "completions", chunks())

    # -- adapters at run time (vLLM's endpoints and JSON) ----------------------------------

    def _adapter_name(self, body: dict) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise _Fail(400, "lora_name must be a non-empty string (at most 256 characters)", param="lora_name")
        return name

    async def load_lora_adapter(self, request: Request) -> Response:
        return await self._guard("load_lora_adapter", lambda: self._load_lora_adapter(request))

    async def _load_lora_adapter(self, request: Request) -> Response:
        body = await self._json(request)
        name, path = self._adapter_name(body), body.get("lora_path")
        if not isinstance(path, str) or not path:
            raise _Fail(400, "lora_path must be the path of a PEFT adapter directory", param="lora_path")
        if name == self.name or name in self.engine.adapters:
            raise _Fail(400, f"the adapter {name!r} has already been loaded (unload it first)", param="lora_name")
        try:  # reading the weights takes a while: a worker thread, not the event loop or the engine loop
            adapter = await run_in_threadpool(load_adapter, path, self.engine)
        except (OSError, ValueError) as e:  # a missing directory, a malformed or mismatched adapter
            raise _Fail(400, f"cannot load adapter {name!r} from {path!r}: {e}", param="lora_path") from None
        await asyncio.wrap_future(self.loop.call(lambda eng: eng.register_adapter(name, adapter)))
        log.info("loaded adapter %s from %s", name, path)
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    async def unload_lora_adapter(self, request: Request) -> Response:
        return await self._guard("unload_lora_adapter", lambda: self._unload_lora_adapter(request))

    async def _unload_lora_adapter(self, request: Request) -> Response:
        name = self._adapter_name(await self._json(request))
        if name not in self.engine.adapters:
            known = sorted(self.engine.adapters) or "none"
            raise _Fail(404, f"the adapter {name!r} is not loaded; loaded: {known}", "NotFoundError", "lora_name")
        try:
            await asyncio.wrap_future(self.loop.call(lambda eng: eng.unregister_adapter(name)))
        except RuntimeError as e:  # adapted requests still running: the client may retry
            raise _Fail(409, str(e), "conflict", "lora_name", {"Retry-After": str(self.config.retry_after_s)}) from None
        except KeyError:  # unloaded by a concurrent request
            raise _Fail(404, f"the adapter {name!r} is not loaded", "NotFoundError", "lora_name") from None
        log.info("unloaded adapter %s", name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    # -- the rest -------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        created = oa.now()
        data = [{"id": self.name, "object": "model", "created": created, "owned_by": "spanjax", "root": self.name,
                 "parent": None, "max_model_len": self.context}]  # fmt: skip
        data += [
            {"id": a, "object": "model", "created": created, "owned_by": "spanjax", "root": a, "parent": self.name}
            for a in self.engine.adapters
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        if not self.loop.alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        s = self.loop.snapshot
        return JSONResponse({"status": "ok", "model": self.name, "running": s.running, "waiting": s.waiting})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def load_adapter(path: str, engine: Engine):
    """A PEFT LoRA / aLoRA directory read for the engine's model, in its parameter dtype."""
    return load_peft(path, engine.model.cfg, dtype=engine.model.params.embed.dtype)


def create_app(engine: Engine, config: ServerConfig | None = None) -> Server:
    return Server(engine, config)
