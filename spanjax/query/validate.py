"""Validation: generic parsed data (dicts, lists, scalars) -> AST, before any compute.

All three text forms (JSON, YAML, s-expression) are first turned into the same
generic JSON-shaped data plus a map `locs: path -> (line, col)`; this module
is the single place that checks it. Every problem raises `SpanQueryError` with
the JSON path of the node, what was found, what was expected, and the line and
column of the nearest located ancestor.

Limits (documented, enforced): query nesting depth <= MAX_DEPTH (64);
repeat n in 1..MAX_REPEAT (1024); at most MAX_GENERATIONS g's in all (repeats
and maps multiplied out, the copies of a zip's `first` counted) and at most
MAX_EXPANDED_NODES nodes in the tree `passes.prepare` makes (zip, repeat and
map expanded, inner g's hoisted), both computed from the parsed query before
anything is expanded (`expansion`); integers fit in a
signed 64-bit int (MAX_INT); text is valid Unicode (no lone surrogates, which
cannot be encoded for the tokenizer or printed).
"""

from __future__ import annotations

import json
import math
import re
from typing import NamedTuple

from spanjax.query import ast as A
from spanjax.query.errors import SpanQueryError, describe

MAX_DEPTH = 64
MAX_REPEAT = 1024
# Total g's of one query with repeats multiplied out: nested repeats multiply
# (1024 x 1024 from 400 bytes), so one cap bounds the whole tree.
MAX_GENERATIONS = 4096
# Nodes of the prepared tree (bounded from above before any rewriting). A zip copies
# its `first` next to every item of its `second`, so nested zips double the tree per
# level (2**60 nodes from 1 KB); a repeat copies its g's whole prompt n times; hoisting
# copies an inner g's prompt, so nested g's double it per level (2**30 from 1 KB). The
# passes, the evaluation loop and lowering walk the tree, microseconds a node each.
# 1 MiB of text spells at most ~100k nodes without them.
MAX_EXPANDED_NODES = 200_000
MAX_INT = 2**63 - 1
MAX_RECOMPUTE_PAGES = 1024  # every integer field (the engine's widest integer type)

NODE_TAGS = (
    "g",
    "cross",
    "plus",
    "seq",
    "par",
    "system",
    "user",
    "assistant",
    "repeat",
    "map",
    "zip",
    "monad",
    "print",
)
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
    "recompute_pages": ("recompute_pages", "recompute-pages"),
    "reweight": ("reweight",),
}
# A map's metadata: every g field but the input (each input string is one).
MAP_METADATA_FIELDS = {k: v for k, v in G_FIELDS.items() if k != "input"}
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
        return A.G(**self.g_settings(f, lambda: self.query(f["input"][0], f["input"][1], depth + 1)))

    def g_settings(self, f, input_fn=None) -> dict:
        """A g's fields (a g's body; a map's metadata, without `input_fn`), checked in
        order: model, input, the rest."""
        kw = {}
        kw["model"] = self.string(*f["model"], what="a model name (string)")
        if not kw["model"]:
            self.fail(f["model"][1], "empty string", "a model name")
        if input_fn is not None:
            kw["input"] = input_fn()

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
        opt("recompute_pages", lambda v, p: self.integer(v, p, 0, MAX_RECOMPUTE_PAGES))
        opt("reweight", self.reweight)
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
        return kw

    def reweight(self, v, path) -> tuple[float, float]:
        """{"scale": s, "bias": b} (each optional: 1 and 0) -> (s, b); s finite > 0, b finite."""
        spec = {"scale": ("scale",), "bias": ("bias",)}
        f = self.fields(v, path, spec, what="reweight fields (scale, bias)")
        scale, bias = 1.0, 0.0
        if "scale" in f:
            scale = self.number(*f["scale"], lambda x: x > 0, "a finite number > 0")
        if "bias" in f:
            bias = self.number(*f["bias"], lambda x: True, "a finite number")
        return scale, bias

    def node_map(self, body, path, depth):
        spec = {"metadata": ("metadata",), "inputs": ("inputs",)}
        f = self.fields(body, path, spec, required=("metadata", "inputs"), what="map fields (metadata and inputs)")
        mv, mp = f["metadata"]
        meta = self.fields(mv, mp, MAP_METADATA_FIELDS, required=("model",), what="g fields other than input")
        settings = self.g_settings(meta)
        raw, ip = f["inputs"]
        what = "a non-empty list of input strings"
        if not isinstance(raw, list):
            self.fail(ip, describe(raw), what)
        if not raw:
            self.fail(ip, "empty list", what)
        if len(raw) > MAX_GENERATIONS:  # one g each: fail before checking every string
            self.fail(ip, f"a list of {len(raw)} inputs", f"at most {MAX_GENERATIONS} (MAX_GENERATIONS)")
        inputs = tuple(self.string(x, child_path(ip, i), "an input string") for i, x in enumerate(raw))
        return A.Map(inputs, A.G(**settings, input=A.MAP_INPUT))

    def node_zip(self, body, path, depth):
        if isinstance(body, list):  # serde reads spnl's Zip struct from a pair too: [first, second]
            if len(body) != 2:
                self.fail(path, f"a list of {len(body)} items", "[first, second] or {first, second}")
            return A.Zip(
                self.query(body[0], child_path(path, 0), depth + 1), self.query(body[1], child_path(path, 1), depth + 1)
            )
        spec = {"first": ("first",), "second": ("second",)}
        f = self.fields(body, path, spec, required=("first", "second"), what="zip fields (first and second)")
        return A.Zip(self.query(*f["first"], depth + 1), self.query(*f["second"], depth + 1))

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


class Expansion(NamedTuple):
    """Size of a query's tree once `passes.prepare` has rewritten it (computed without
    rewriting). `nodes` is an upper bound, `gens` exact (the g's of `passes.expand(q)`).
    `kind`, `items`, `item_nodes` and `item_gens` describe it as a zip's `second`: the
    node type it becomes after zip rewriting (a zip becomes a list node) and the items
    it contributes (a repeat or map: its g's)."""

    nodes: int
    gens: int
    kind: type
    items: int = 0
    item_nodes: int = 0
    item_gens: int = 0


_ZIP_LISTS = A.LIST_NODES + (A.Repeat, A.Map)


def expansion(q: A.Query, in_prompt: bool = False) -> Expansion:
    """Nodes and g's of `q` with zip, repeat and map expanded (mirrors passes.expand) and
    inner g's hoisted (passes.hoist): a g in another g's prompt (`in_prompt`, not under a
    monad) becomes `plus[cross[<its input>, <it>]]`, a second copy of its prompt, so every
    level of g nesting doubles the tree (the copies are shared objects, but every pass
    and the evaluation loop walk them as a tree)."""
    if isinstance(q, A.LIST_NODES):
        kids = [expansion(c, in_prompt) for c in q.children]
        n, g = sum(k.nodes for k in kids), sum(k.gens for k in kids)
        return Expansion(1 + n, g, type(q), len(kids), n, g)
    if isinstance(q, A.Repeat):
        e = expansion(q.query, in_prompt)
        return Expansion(1 + q.n * e.nodes, q.n * e.gens, A.Repeat, q.n, q.n * e.nodes, q.n * e.gens)
    if isinstance(q, A.Map):
        k, each = len(q.inputs), 5 if in_prompt else 2  # a g and its user message (hoisted: 2 * 2 + 1)
        return Expansion(1 + each * k, k, A.Map, k, each * k, k)
    if isinstance(q, A.Zip):
        f, s = expansion(q.first, in_prompt), expansion(q.second, in_prompt)
        if s.kind in _ZIP_LISTS:  # first next to every item (inside it when first is a plus)
            nodes, gens = s.item_nodes + s.items * f.nodes, s.item_gens + s.items * f.gens
            kind = A.Par if s.kind in (A.Repeat, A.Map) else s.kind
            items = s.items if f.kind is A.Plus else 2 * s.items
            return Expansion(1 + nodes, gens, kind, items, nodes, gens)
        nodes, gens = f.nodes + s.nodes, f.gens + s.gens  # seq[first, second]
        return Expansion(1 + nodes, gens, A.Seq, 2, nodes, gens)
    if isinstance(q, A.G):
        e = expansion(q.input, True)
        nodes = 1 + e.nodes
        return Expansion(2 * nodes + 1 if in_prompt else nodes, 1 + e.gens, A.G)
    if isinstance(q, A.Monad):  # a monad's g's do not feed the prompt: not hoisted
        e = expansion(q.query, False)
        return Expansion(1 + e.nodes, e.gens, A.Monad)
    kids = [expansion(c, in_prompt) for c in A.children(q)]
    return Expansion(1 + sum(k.nodes for k in kids), sum(k.gens for k in kids), type(q))


def count_generations(q: A.Query) -> int:
    """Number of g's `q` runs, repeats and maps multiplied out and the copies of every
    zip's `first` counted (no expansion needed; equal copies are evaluated once, but the
    passes walk each)."""
    return expansion(q).gens


def check_generations(q: A.Query, path: str = "$", locs: dict | None = None) -> A.Query:
    """Raise SpanQueryError when `q`, expanded, has more than MAX_GENERATIONS g's or when,
    prepared, it may have more than MAX_EXPANDED_NODES nodes."""
    e = expansion(q)
    line, col = locate(locs, path)
    if e.gens > MAX_GENERATIONS:
        raise SpanQueryError(
            path,
            f"a query of {e.gens} generations (repeats and maps multiplied out, zip copies counted)",
            f"at most {MAX_GENERATIONS} generations (MAX_GENERATIONS)",
            line,
            col,
        )
    if e.nodes > MAX_EXPANDED_NODES:
        raise SpanQueryError(
            path,
            f"a query of {e.nodes} nodes once zip, repeat and map are expanded and inner g's hoisted",
            f"at most {MAX_EXPANDED_NODES} nodes (MAX_EXPANDED_NODES)",
            line,
            col,
        )
    return q


def from_data(data, locs: dict | None = None, path: str = "$") -> A.Query:
    """Validate generic JSON-shaped data and build the AST (raises SpanQueryError)."""
    return check_generations(_Validator(locs).query(data, path, 1), path, locs)
