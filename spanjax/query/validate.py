"""Validation: generic parsed data (dicts, lists, scalars) -> AST, before any compute.

All three text forms (JSON, YAML, s-expression) are first turned into the same
generic JSON-shaped data plus a map `locs: path -> (line, col)`; this module
is the single place that checks it. Every problem raises `SpanQueryError` with
the JSON path of the node, what was found, what was expected, and the line and
column of the nearest located ancestor.

Limits (documented, enforced): query nesting depth <= MAX_DEPTH (64);
repeat n in 1..MAX_REPEAT (1024); at most MAX_GENERATIONS g's in all, counted
with every repeat multiplied out (checked before anything is expanded);
integers fit in a signed 64-bit int (MAX_INT); text is valid Unicode (no lone
surrogates, which cannot be encoded for the tokenizer or printed).
"""

from __future__ import annotations

import json
import math
import re

from spanjax.query import ast as A
from spanjax.query.errors import SpanQueryError, describe

MAX_DEPTH = 64
MAX_REPEAT = 1024
# Total g's of one query with repeats multiplied out: nested repeats multiply
# (1024 x 1024 from 400 bytes), so one cap bounds the whole tree.
MAX_GENERATIONS = 4096
MAX_INT = 2**63 - 1  # every integer field (the engine's widest integer type)

NODE_TAGS = ("g", "cross", "plus", "seq", "par", "system", "user", "assistant", "repeat", "monad", "print")
_EXPECT_NODE = "a query node: an object with exactly one key of " + ", ".join(NODE_TAGS)

# g fields: canonical name -> accepted spellings (spnl uses snake case; kebab aliases accepted).
G_FIELDS = {
    "model": ("model",),
    "input": ("input",),
    "max_tokens": ("max_tokens", "max-tokens"),
    "temperature": ("temperature",),
    "top_p": ("top_p", "top-p"),
    "seed": ("seed",),
    "stop": ("stop",),
    "adapter": ("adapter",),
    "attention": ("attention",),
    "positions": ("positions",),
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def child_path(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _IDENT.match(key):
        return f"{path}.{key}"
    return f"{path}[{_quote(key)}]"


def _quote(s: str) -> str:
    return json.dumps(s if len(s) <= 40 else s[:40] + "...", ensure_ascii=True)


def locate(locs: dict | None, path: str) -> tuple[int | None, int | None]:
    """Line/column of `path` or of its nearest located ancestor."""
    if not locs:
        return None, None
    p = path
    while True:
        if p in locs:
            return locs[p]
        cut = max(p.rfind("."), p.rfind("["))
        if cut <= 0:
            return locs.get("$", (None, None))
        p = p[:cut]


class _Validator:
    def __init__(self, locs):
        self.locs = locs or {}

    def fail(self, path, found, expected):
        line, col = locate(self.locs, path)
        raise SpanQueryError(path, found, expected, line, col)

    # --- scalars -------------------------------------------------------------------
    def string(self, v, path, what="a string"):
        if not isinstance(v, str):
            self.fail(path, describe(v), what)
        return self.text(v, path)

    def text(self, s: str, path) -> str:
        """Reject lone surrogates (from JSON/YAML escapes): UTF-8 cannot encode them."""
        if not s.isascii():
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                self.fail(path, f"a lone surrogate U+{ord(s[e.start]):04X} at index {e.start}", "valid Unicode text")
        return s

    def integer(self, v, path, lo, hi=MAX_INT, what=None):
        what = what or (f"an integer in {lo}..2**63-1" if hi == MAX_INT else f"an integer in {lo}..{hi}")
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or v > hi:
            self.fail(path, describe(v), what)
        return v

    def number(self, v, path, ok, what):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(path, describe(v), what)
        try:
            x = float(v)  # a huge int overflows here (OverflowError)
        except OverflowError:
            self.fail(path, describe(v), what)
        if not math.isfinite(x) or not ok(x):
            self.fail(path, describe(v), what)
        return x

    def choice(self, v, path, options):
        if not isinstance(v, str) or v not in options:
            self.fail(path, describe(v), "one of " + ", ".join(map(repr, options)))
        return v

    def fields(self, body, path, spec: dict, required=(), what="fields"):
        """Map accepted spellings to canonical names; reject unknown and duplicate keys."""
        if not isinstance(body, dict):
            self.fail(path, describe(body), f"an object with {what}")
        out = {}
        for key, value in body.items():
            canon = next((c for c, names in spec.items() if key in names), None)
            kpath = child_path(path, key)
            if canon is None:
                self.fail(kpath, f"unknown key {key!r}", "one of " + ", ".join(n[0] for n in spec.values()))
            if canon in out:
                self.fail(kpath, f"key {key!r} given twice (as an alias)", f"one {canon!r}")
            out[canon] = (value, kpath)
        for r in required:
            if r not in out:
                self.fail(path, f"no {r!r}", f"{what} including {r!r}")
        return out

    # --- nodes ---------------------------------------------------------------------
    def query(self, v, path, depth):
        if depth > MAX_DEPTH:
            self.fail(path, f"nesting deeper than {MAX_DEPTH} levels", "a shallower query")
        if not isinstance(v, dict):
            self.fail(path, describe(v), _EXPECT_NODE)
        if len(v) != 1:
            self.fail(path, describe(v), _EXPECT_NODE)
        ((tag, body),) = v.items()
        if tag not in NODE_TAGS:
            self.fail(path, f"unknown node {tag!r}" if isinstance(tag, str) else describe(tag), _EXPECT_NODE)
        p = child_path(path, tag)
        return getattr(self, "node_" + tag)(body, p, depth)

    def _list(self, body, path, depth, what):
        if not isinstance(body, list):
            self.fail(path, describe(body), f"a non-empty list of queries ({what})")
        if not body:
            self.fail(path, "empty list", f"a non-empty list of queries ({what})")
        return tuple(self.query(c, child_path(path, i), depth + 1) for i, c in enumerate(body))

    def node_cross(self, body, path, depth):
        return A.Cross(self._list(body, path, depth, "cross"))

    def node_seq(self, body, path, depth):
        return A.Seq(self._list(body, path, depth, "seq"))

    def node_par(self, body, path, depth):
        return A.Par(self._list(body, path, depth, "par"))

    def node_plus(self, body, path, depth):
        if isinstance(body, dict):  # extension: {"plus": {"items": [...], "attention": ..., "positions": ...}}
            spec = {"items": ("items",), "attention": ("attention",), "positions": ("positions",)}
            f = self.fields(body, path, spec, required=("items",), what="plus fields")
            att = f.get("attention", (None, None))
            pos = f.get("positions", (None, None))
            return A.Plus(
                self._list(*f["items"], depth, "plus"),
                None if att[0] is None else self.choice(att[0], att[1], A.ATTENTION_POLICIES),
                None if pos[0] is None else self.choice(pos[0], pos[1], A.POSITION_POLICIES),
            )
        return A.Plus(self._list(body, path, depth, "plus"))

    def _message(self, role, body, path):
        if isinstance(body, str):
            return A.Message(role, self.text(body, path))
        if role == "assistant" and isinstance(body, dict):
            spec = {"content": ("content",), "token_ids": ("token_ids", "token-ids")}
            f = self.fields(body, path, spec, required=("content",), what="assistant fields")
            content = self.string(*f["content"])
            ids = None
            if "token_ids" in f:
                raw, p = f["token_ids"]
                if not isinstance(raw, list):
                    self.fail(p, describe(raw), "a list of token ids")
                ids = tuple(self.integer(t, child_path(p, i), 0) for i, t in enumerate(raw))
            return A.Message(role, content, ids)
        what = "a string" + (' or {"content": ..., "token_ids": [...]}' if role == "assistant" else "")
        self.fail(path, describe(body), what)

    def node_system(self, body, path, depth):
        return self._message("system", body, path)

    def node_user(self, body, path, depth):
        return self._message("user", body, path)

    def node_assistant(self, body, path, depth):
        return self._message("assistant", body, path)

    def node_print(self, body, path, depth):
        return A.Print(self.string(body, path))

    def node_monad(self, body, path, depth):
        return A.Monad(self.query(body, path, depth + 1))

    def node_g(self, body, path, depth):
        f = self.fields(body, path, G_FIELDS, required=("model", "input"), what="g fields")
        kw = {}
        kw["model"] = self.string(*f["model"], what="a model name (string)")
        if not kw["model"]:
            self.fail(f["model"][1], "empty string", "a model name")
        kw["input"] = self.query(f["input"][0], f["input"][1], depth + 1)

        def opt(name, conv):
            if name in f and f[name][0] is not None:
                kw[name] = conv(*f[name])

        opt("max_tokens", lambda v, p: self.integer(v, p, 1))
        opt("temperature", lambda v, p: self.number(v, p, lambda x: x >= 0, "a finite number >= 0"))
        opt("top_p", lambda v, p: self.number(v, p, lambda x: 0 < x <= 1, "a number in (0, 1]"))
        opt("seed", lambda v, p: self.integer(v, p, 0, MAX_INT))
        opt("adapter", lambda v, p: self.string(v, p, "an adapter name (string)"))
        opt("attention", lambda v, p: self.choice(v, p, A.ATTENTION_POLICIES))
        opt("positions", lambda v, p: self.choice(v, p, A.POSITION_POLICIES))
        if "stop" in f and f["stop"][0] is not None:
            v, p = f["stop"]
            if isinstance(v, str):
                kw["stop"] = (v,)
            elif isinstance(v, list):
                kw["stop"] = tuple(self.string(s, child_path(p, i), "a stop string") for i, s in enumerate(v))
            else:
                self.fail(p, describe(v), "a string or a list of strings")
            for i, s in enumerate(kw["stop"]):
                if not s:
                    self.fail(child_path(p, i) if isinstance(v, list) else p, "empty string", "a non-empty stop string")
        return A.G(**kw)

    def node_repeat(self, body, path, depth):
        spec = {"n": ("n",), "g": ("g",), "query": ("query",)}
        f = self.fields(body, path, spec, required=("n",), what="repeat fields (n and g or query)")
        n = self.integer(*f["n"], 1, MAX_REPEAT)
        if ("g" in f) == ("query" in f):
            self.fail(
                path, "both 'g' and 'query'" if "g" in f else "neither 'g' nor 'query'", "exactly one of 'g' or 'query'"
            )
        if "g" in f:
            v, p = f["g"]
            # "g": the g's body ({"model": ..., "input": ...}); a whole {"g": {...}} node is accepted too.
            if isinstance(v, dict) and len(v) == 1 and "g" in v:
                q = self.query(v, p, depth + 1)
            else:
                q = self.node_g(v, p, depth + 1)
        else:
            q = self.query(*f["query"], depth + 1)
            if not isinstance(q, A.G):
                self.fail(f["query"][1], f"a {type(q).__name__.lower()} node", 'a g node ({"g": {...}})')
        return A.Repeat(n, q)


def count_generations(q: A.Query) -> int:
    """Number of g's `q` runs, every repeat multiplied out (no expansion needed)."""
    if isinstance(q, A.Repeat):
        return q.n * count_generations(q.query)
    own = 1 if isinstance(q, A.G) else 0
    return own + sum(count_generations(c) for c in A.children(q))


def check_generations(q: A.Query, path: str = "$", locs: dict | None = None) -> A.Query:
    """Raise SpanQueryError when `q` asks for more than MAX_GENERATIONS g's."""
    n = count_generations(q)
    if n > MAX_GENERATIONS:
        line, col = locate(locs, path)
        raise SpanQueryError(
            path,
            f"a query of {n} generations (repeats multiplied out)",
            f"at most {MAX_GENERATIONS} generations (MAX_GENERATIONS)",
            line,
            col,
        )
    return q


def from_data(data, locs: dict | None = None, path: str = "$") -> A.Query:
    """Validate generic JSON-shaped data and build the AST (raises SpanQueryError)."""
    return check_generations(_Validator(locs).query(data, path, 1), path, locs)
