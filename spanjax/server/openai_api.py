"""OpenAI request bodies -> what the engine runs, and results -> OpenAI response bodies.

Validation is by hand (no schema library): every field the server uses is checked for type and
range and a bad one raises `BadRequest` naming it (a 400 in OpenAI's error shape). Fields it
does not use (`reasoning_effort`, `user`, `logprobs`, ...) are accepted and ignored.

A chat request becomes a span query, `par` of n `g`s over `cross(messages...)` with seeds
seed, seed + 1, ... (so n > 1 samples differ and each is reproducible); a completion's raw
prompt becomes a one-span plan keyed exactly as lowering keys a first span, so it shares the
cache with any query whose first span has the same tokens.
"""

from __future__ import annotations

import math
import time
import uuid

from spanjax.engine.sampling import MAX_SEED
from spanjax.query import ast as A
from spanjax.query.page_keys import chain_page_keys, context_key, root_key
from spanjax.query.plan import Span, SpanPlan

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # OpenAI's limit on stop sequences


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _short(v, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def check_text(s, param: str) -> str:
    if not isinstance(s, str):
        raise BadRequest(f"{param} must be a string, got {_short(s)}", param)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{param} is not valid Unicode (a lone surrogate)", param) from None
    return s


def _int(body: dict, key: str, lo: int, hi: int, default=None, why: str = ""):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be an integer in {lo}..{hi}{why}, got {_short(v)}", key)
    return v


def _num(body: dict, key: str, lo: float, hi: float, default, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo < v if lo_open else lo <= v) or v > hi:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise BadRequest(f"{key} must be a number in {rng}, got {_short(v)}", key)
    return float(v)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{key} must be a boolean, got {_short(v)}", key)
    return v


class Common:
    """The sampling fields shared by chat and completions, checked."""

    def __init__(self, body: dict, *, max_n: int, context: int, default_max_tokens: int):
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a JSON object, got {_short(body)}")
        self.model = check_text(body.get("model"), "model") if body.get("model") is not None else None
        why = " (the model's context)"
        mt = _int(body, "max_tokens", 1, context, why=why)
        mct = _int(body, "max_completion_tokens", 1, context, why=why)
        self.max_tokens = mct if mct is not None else mt
        self.explicit_max_tokens = self.max_tokens is not None
        if self.max_tokens is None:
            self.max_tokens = default_max_tokens
        self.temperature = _num(body, "temperature", 0.0, 2.0, 1.0)
        self.top_p = _num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)
        self.seed = _int(body, "seed", 0, MAX_SEED)
        self.n = _int(body, "n", 1, max_n, 1, why=" (the server's max_n)")
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise BadRequest(f"seed + n - 1 must be at most {MAX_SEED}", "seed")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOP:
            raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
        for i, s in enumerate(stop):
            if not check_text(s, f"stop[{i}]"):
                raise BadRequest("stop strings must not be empty", "stop")
        self.stop = tuple(stop)
        self.stream = _bool(body, "stream")
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise BadRequest("stream_options must be an object", "stream_options")
        self.include_usage = _bool(so or {}, "include_usage")

    def g(self, model: str, prompt: A.Query, i: int, adapter: str | None = None) -> A.G:
        return A.G(
            model=model,
            input=prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=(self.seed or 0) + i,
            stop=self.stop,
            adapter=adapter,
        )


def _content(c, param: str) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return check_text(c, param)
    if isinstance(c, list):
        parts = []
        for i, p in enumerate(c):
            if not isinstance(p, dict) or p.get("type") != "text":
                raise BadRequest(f"{param}[{i}]: only text content parts are supported", param)
            parts.append(check_text(p.get("text"), f"{param}[{i}].text"))
        return "".join(parts)
    raise BadRequest(f"{param} must be a string or a list of text parts, got {_short(c)}", param)


def chat_messages(body: dict) -> A.Cross:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{p} must be an object", p)
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise BadRequest(f"{p}.role must be one of {', '.join(ROLES)}, got {_short(m.get('role'))}", f"{p}.role")
        out.append(A.Message(role, _content(m.get("content"), f"{p}.content")))
    return A.Cross(tuple(out))


def _prompt_ids(p, tokenizer, param: str) -> list[int]:
    if isinstance(p, str):
        ids = list(tokenizer.encode(check_text(p, param)))
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is not None and not all(0 <= t < vocab for t in p):
            raise BadRequest(f"prompt token ids must be in 0..{vocab - 1}", param)
        ids = list(p)
    else:
        raise BadRequest("prompt must be a string, a list of token ids, or a list of either", param)
    if not ids:
        raise BadRequest("prompt is empty", param)
    return ids


def completion_prompts(body: dict, tokenizer, max_prompts: int) -> list[list[int]]:
    """Token ids of each prompt in `prompt`: a string or a list of token ids (one prompt), or a
    list of strings / of token-id lists (a batch, as spnl's `map` sends)."""
    p = body.get("prompt")
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        if len(p) > max_prompts:
            raise BadRequest(f"{len(p)} prompts in one request; at most {max_prompts} (max_prompts)", "prompt")
        return [_prompt_ids(x, tokenizer, f"prompt[{i}]") for i, x in enumerate(p)]
    return [_prompt_ids(p, tokenizer, "prompt")]


def raw_plan(ids: list[int], *, model: str, page_size: int) -> SpanPlan:
    """A one-span plan over raw ids, keyed as lowering keys a first span (nothing before it)."""
    ckey = context_key(())
    base = root_key(model, None, ckey)
    span = Span(
        index=0,
        kind="cross",
        token_ids=tuple(ids),
        start=0,
        positions=tuple(range(len(ids))),
        sees=(),
        page_keys=chain_page_keys(base, ids, page_size),
        context_key=ckey,
        base_key=base,
    )
    return SpanPlan((span,), page_size, model, None, "prefix", "sequential")


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


def finish_reason(r: str | None) -> str | None:
    return None if r is None else FINISH.get(r, r)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
