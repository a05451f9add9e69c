"""Parsers and printers for the three text forms of a span query.

- JSON (spnl-compatible): externally tagged nodes, see ast.py. g fields are
  `model input max_tokens temperature top_p seed stop adapter attention
  positions recompute_pages reweight` (kebab aliases `max-tokens`, `top-p`,
  `recompute-pages` accepted; `reweight` is `{"scale": s, "bias": b}`). `repeat` takes
  `{"n": k, "g": {g body}}` or `{"n": k, "query": {"g": {...}}}` (printed with
  `query`, as spnl's builtins write it). spnl's bulk `map` is
  `{"map": {"metadata": {"model": M, "max_tokens": k, ...}, "inputs": ["a", ...]}}`
  (metadata: every g field but `input`) and `zip` is
  `{"zip": {"first": Q1, "second": Q2}}`.
- YAML: the same tree (`yaml.safe_*` semantics; anchors allowed, bounded).
- s-expression: `(head arg ...)` with `"strings"` (JSON escapes), numbers,
  bare symbols (`isolated`, `true`, `false`, `nil`) and `:keyword value`
  pairs; `;` starts a comment. Forms:
      (g "model" INPUT [MAX_TOKENS [TEMPERATURE]] [:max-tokens N] [:temperature T]
         [:top-p P] [:seed S] [:stop "s" | :stop ("a" "b")] [:adapter "a"]
         [:attention prefix|isolated] [:positions sequential|parallel]
         [:recompute-pages N] [:reweight-scale S] [:reweight-bias B])
      (cross Q ...) (seq Q ...) (par Q ...)
      (plus [:attention A] [:positions P] Q ...)
      (system "s") (user "s") (assistant "s" [:token-ids (1 2 3)])
      (repeat N (g ...)) (monad Q) (print "s")
      (map (metadata "model" [MAX_TOKENS [TEMPERATURE]] [:key value]...) (inputs "s" ...))
      (zip FIRST SECOND)
  (`metadata` takes the same arguments as a g, less its INPUT.)

Every parser turns text into generic JSON-shaped data plus a path -> (line,
col) map and hands it to `validate.from_data`, so all forms share one set of
checks and one error format. Printing then re-parsing gives the same AST.
Inputs may be `str` or `bytes` (must be UTF-8), at most MAX_QUERY_BYTES of UTF-8.
"""

from __future__ import annotations

import bisect
import json
import os
import re

import yaml

from spanjax.query import ast as A
from spanjax.query.errors import SpanQueryError, describe
from spanjax.query.validate import MAX_DEPTH, NODE_TAGS, child_path, from_data

MAX_TEXT_NESTING = 4 * MAX_DEPTH  # containers in the raw text (a node is ~2 of them)
MAX_YAML_NODES = 200_000  # bounds alias ("billion laughs") expansion
# Nodes PyYAML may compose (before alias expansion): its pure-Python composer does
# ~50k nodes/s, so this keeps a hostile document (a flat 1 MB flow list) near 0.5 s
# (50,000 took 1-3.7 s on a loaded 2-core machine: the fuzz test's bound is 1 s per
# input). libyaml's composer is fast but recursive in C: deep block nesting
# ("- - - ..." on one line) overflows the C stack, so it is not used.
MAX_YAML_COMPOSED = 25_000
# Longest YAML integer scalar converted: PyYAML builds sexagesimal ints (1:59:59...)
# by repeated big-int multiplication, quadratic in the length (~20 s at 1 MB).
MAX_YAML_INT_CHARS = 1000
_YAML_INT_TAG = "tag:yaml.org,2002:int"
# Parsing is linear, but a network-facing parser still bounds its input up front
# (1 MiB is ~250k tokens of text, past any context window; pure-Python YAML is ~2 MB/s).
MAX_QUERY_BYTES = 1024 * 1024


def _too_large(n: int, path: str):
    return SpanQueryError(path, f"a query of {n} bytes", f"at most {MAX_QUERY_BYTES} bytes (MAX_QUERY_BYTES)")


def _text(src, path="$") -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        raw = bytes(src)
        if len(raw) > MAX_QUERY_BYTES:
            raise _too_large(len(raw), path)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpanQueryError(path, f"invalid UTF-8 byte at offset {e.start}", "UTF-8 text", None, None) from None
    if not isinstance(src, str):
        raise SpanQueryError(path, describe(src), "query text (str or bytes)")
    # A character is 1..4 UTF-8 bytes: count exactly only when the bound is in doubt
    # ("surrogatepass": lone surrogates are reported by validation, with their path).
    if len(src) > MAX_QUERY_BYTES:
        raise _too_large(len(src), path)
    if 4 * len(src) > MAX_QUERY_BYTES and not src.isascii():
        n = len(src.encode("utf-8", "surrogatepass"))
        if n > MAX_QUERY_BYTES:
            raise _too_large(n, path)
    return src


class _Lines:
    def __init__(self, text):
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def __call__(self, i):
        line = bisect.bisect_right(self.starts, i)
        return line, i - self.starts[line - 1] + 1


# ---------------------------------------------------------------------------------- JSON
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_WS = re.compile(r"[ \t\n\r]*")
_scanstring = json.decoder.scanstring


class _JsonParser:
    """Small recursive-descent JSON parser that records where every value starts."""

    def __init__(self, text):
        self.s = text
        self.lines = _Lines(text)
        self.locs = {}

    def fail(self, i, path, found, expected):
        line, col = self.lines(i)
        raise SpanQueryError(path, found, expected, line, col)

    def found_at(self, i):
        return "end of input" if i >= len(self.s) else repr(self.s[i])

    def ws(self, i):
        return _WS.match(self.s, i).end()

    def value(self, i, path, nest):
        i = self.ws(i)
        self.locs[path] = self.lines(i)
        s = self.s
        c = s[i : i + 1]
        if c in ("{", "["):
            if nest >= MAX_TEXT_NESTING:
                self.fail(i, path, f"nesting deeper than {MAX_TEXT_NESTING} containers", "a shallower document")
            return (self.obj if c == "{" else self.arr)(i + 1, path, nest + 1)
        if c == '"':
            return self.string(i, path)
        m = _NUMBER.match(s, i)
        if m and m.end() > i:
            txt = m.group()
            try:
                v = float(txt) if (m.group(1) or m.group(2)) else int(txt)
            except ValueError:
                self.fail(i, path, "a number too long", "a number")
            return v, m.end()
        for lit, v in (("true", True), ("false", False), ("null", None)):
            if s.startswith(lit, i):
                return v, i + len(lit)
        self.fail(i, path, self.found_at(i), "a JSON value")

    def string(self, i, path):
        try:
            return _scanstring(self.s, i + 1, True)
        except ValueError as e:  # JSONDecodeError: unterminated string, bad escape, control char
            pos = getattr(e, "pos", i)
            self.fail(pos, path, getattr(e, "msg", "invalid string"), "a valid JSON string")

    def obj(self, i, path, nest):
        out = {}
        i = self.ws(i)
        if self.s[i : i + 1] == "}":
            return out, i + 1
        while True:
            i = self.ws(i)
            if self.s[i : i + 1] != '"':
                self.fail(i, path, self.found_at(i), "an object key (string)")
            kstart = i
            key, i = self.string(i, path)
            kpath = child_path(path, key)
            if key in out:
                self.fail(kstart, kpath, f"duplicate key {key!r}", "unique keys in an object")
            i = self.ws(i)
            if self.s[i : i + 1] != ":":
                self.fail(i, kpath, self.found_at(i), "':' after an object key")
            out[key], i = self.value(i + 1, kpath, nest)
            i = self.ws(i)
            c = self.s[i : i + 1]
            if c == "}":
                return out, i + 1
            if c != ",":
                self.fail(i, path, self.found_at(i), "',' or '}' in an object")
            i += 1

    def arr(self, i, path, nest):
        out = []
        i = self.ws(i)
        if self.s[i : i + 1] == "]":
            return out, i + 1
        while True:
            v, i = self.value(i, child_path(path, len(out)), nest)
            out.append(v)
            i = self.ws(i)
            c = self.s[i : i + 1]
            if c == "]":
                return out, i + 1
            if c != ",":
                self.fail(i, path, self.found_at(i), "',' or ']' in a list")
            i += 1

    def parse(self):
        v, i = self.value(0, "$", 0)
        i = self.ws(i)
        if i != len(self.s):
            self.fail(i, "$", f"extra text {self.s[i : i + 20]!r}", "end of input after the query")
        return v, self.locs


def json_data(src) -> tuple[object, dict]:
    """Parse JSON text into (data, locs) without validating it as a query."""
    return _JsonParser(_text(src)).parse()


def parse_json(src) -> A.Query:
    """JSON text (str/bytes) -> AST. Also accepts already-decoded data (dict)."""
    if isinstance(src, dict):
        return from_data(src)
    data, locs = json_data(src)
    return from_data(data, locs)


# ---------------------------------------------------------------------------------- YAML
_YAML_FLOW_CHAR = re.compile(r"[\[\]{}\"']")
_YAML_DQ_BODY = re.compile(r'(?:[^"\\]|\\.)*')  # after an opening '"'
_YAML_SQ = re.compile(r"'(?:[^']|'')*'")


def _yaml_flow_depth_check(text: str) -> None:
    """Reject deep flow nesting before PyYAML (whose parser is recursive and slow there).

    Brackets count outside quoted strings. Linear time: a '"' whose string never
    closes is not retried at every later '"' (the old regex scan was quadratic on
    an unterminated run of escaped quotes). Every '"' up to where that scan
    stopped is escaped, so a scan from it would stop there too: those quotes
    count as plain characters. A "'" string closes at any later "'", so one that
    does not close means there is no later "'"."""
    depth, i, n = 0, 0, len(text)
    plain_dq_until = 0  # '"' before this offset cannot open a string
    no_sq = False  # no "'" can open a string any more
    while (m := _YAML_FLOW_CHAR.search(text, i)) is not None:
        at, c = m.start(), m.group()
        i = at + 1
        if c == '"' and at >= plain_dq_until:
            end = _YAML_DQ_BODY.match(text, at + 1).end()
            if end < n and text[end] == '"':
                i = end + 1
            else:
                plain_dq_until = end
        elif c == "'" and not no_sq:
            sq = _YAML_SQ.match(text, at)
            if sq:
                i = sq.end()
            else:
                no_sq = True
        elif c in "[{":
            depth += 1
            if depth > MAX_TEXT_NESTING:
                line, col = _Lines(text)(at)
                raise SpanQueryError(
                    "$", f"nesting deeper than {MAX_TEXT_NESTING} containers", "a shallower document", line, col
                )
        elif c in "]}":
            depth = max(0, depth - 1)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing after MAX_YAML_COMPOSED nodes (PyYAML builds
    the whole node graph before `_YamlWalk` can count it)."""

    def __init__(self, text):
        super().__init__(text)
        self.composed = 0

    def compose_node(self, parent, index):
        self.composed += 1
        if self.composed > MAX_YAML_COMPOSED:
            mark = self.peek_event().start_mark
            raise SpanQueryError(
                "$", f"more than {MAX_YAML_COMPOSED} YAML nodes", "a smaller query", mark.line + 1, mark.column + 1
            )
        return super().compose_node(parent, index)


def yaml_data(src) -> tuple[object, dict]:
    text = _text(src)
    _yaml_flow_depth_check(text)
    try:
        loader = _BoundedLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpanQueryError("$", "an empty document", "a query", 1, 1)
            return _YamlWalk(loader).walk(node)
        finally:
            loader.dispose()
    except SpanQueryError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise SpanQueryError("$", f"YAML error: {e.problem or e.context}", "valid YAML", line, col) from None
    except RecursionError:
        raise SpanQueryError("$", "YAML nested too deeply", "a shallower document") from None
    except Exception as e:  # PyYAML raises assorted errors on hostile input; report uniformly
        raise SpanQueryError("$", f"YAML error: {type(e).__name__}: {str(e)[:80]}", "valid YAML") from None


class _YamlWalk:
    def __init__(self, loader):
        self.loader = loader
        self.locs = {}
        self.count = 0

    def walk(self, root):
        out_root = [None]
        # Iterative walk: PyYAML documents may alias themselves (cycles) or nest deeply.
        stack = [(root, "$", 0, out_root, 0)]
        while stack:
            node, path, nest, parent, slot = stack.pop()
            self.count += 1
            line, col = node.start_mark.line + 1, node.start_mark.column + 1
            self.locs.setdefault(path, (line, col))
            if nest > MAX_TEXT_NESTING or self.count > MAX_YAML_NODES:
                raise SpanQueryError(
                    path, "a document nested too deeply or too large (aliases?)", "a smaller query", line, col
                )
            if isinstance(node, yaml.ScalarNode):
                parent[slot] = self.scalar(node, path, line, col)
            elif isinstance(node, yaml.SequenceNode):
                lst = [None] * len(node.value)
                parent[slot] = lst
                for i, child in enumerate(node.value):
                    stack.append((child, child_path(path, i), nest + 1, lst, i))
            elif isinstance(node, yaml.MappingNode):
                self.loader.flatten_mapping(node)  # merge keys (<<)
                d = {}
                parent[slot] = d
                for knode, vnode in node.value:
                    if not isinstance(knode, yaml.ScalarNode):
                        raise SpanQueryError(path, "a non-scalar mapping key", "string keys", line, col)
                    key = self.scalar(knode, path, line, col)
                    if not isinstance(key, str):
                        raise SpanQueryError(
                            path,
                            f"key {describe(key)}",
                            "string keys",
                            knode.start_mark.line + 1,
                            knode.start_mark.column + 1,
                        )
                    if key in d:
                        kp = child_path(path, key)
                        raise SpanQueryError(
                            kp,
                            f"duplicate key {key!r}",
                            "unique keys",
                            knode.start_mark.line + 1,
                            knode.start_mark.column + 1,
                        )
                    d[key] = None
                    stack.append((vnode, child_path(path, key), nest + 1, d, key))
        return out_root[0], self.locs

    def scalar(self, node, path, line, col):
        if node.tag == _YAML_INT_TAG and len(node.value) > MAX_YAML_INT_CHARS:
            found = f"an integer of {len(node.value)} characters"
            raise SpanQueryError(path, found, f"at most {MAX_YAML_INT_CHARS} characters", line, col)
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, OverflowError) as e:  # e.g. a decimal past Python's 4,300-digit limit
            found = f"a scalar YAML cannot convert ({str(e)[:60]})"
            raise SpanQueryError(path, found, "a valid value", line, col) from None


def parse_yaml(src) -> A.Query:
    data, locs = yaml_data(src)
    return from_data(data, locs)


# ---------------------------------------------------------------------------- s-expressions
_SX_TOKEN = re.compile(r'\s+|;[^\n]*|\(|\)|"|[^\s()";]+')
_SX_NUMBER = re.compile(r"[-+]?(?:[0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")


class _Atom:
    __slots__ = ("kind", "value", "at")

    def __init__(self, kind, value, at):
        self.kind, self.value, self.at = kind, value, at  # kind: str num sym kw


class _List:
    __slots__ = ("items", "at")

    def __init__(self, items, at):
        self.items, self.at = items, at


class _SexprReader:
    def __init__(self, text):
        self.s = text
        self.lines = _Lines(text)

    def fail(self, i, found, expected, path="$"):
        line, col = self.lines(i)
        raise SpanQueryError(path, found, expected, line, col)

    def read(self):
        s, i = self.s, 0
        stack = [[]]
        opens = []
        while i < len(s):
            m = _SX_TOKEN.match(s, i)
            tok = m.group()
            if tok[0].isspace() or tok[0] == ";":
                i = m.end()
                continue
            if tok == "(":
                if len(stack) > MAX_TEXT_NESTING:
                    self.fail(i, f"nesting deeper than {MAX_TEXT_NESTING} lists", "a shallower query")
                stack.append([])
                opens.append(i)
            elif tok == ")":
                if not opens:
                    self.fail(i, "')' without a matching '('", "balanced parentheses")
                items = stack.pop()
                stack[-1].append(_List(items, opens.pop()))
            elif tok == '"':
                try:
                    val, end = _scanstring(s, i + 1, True)
                except ValueError as e:
                    self.fail(getattr(e, "pos", i), getattr(e, "msg", "invalid string"), "a valid string")
                stack[-1].append(_Atom("str", val, i))
                i = end
                continue
            else:
                stack[-1].append(self.atom(tok, i))
            i = m.end()
        if opens:
            self.fail(opens[-1], "'(' never closed", "balanced parentheses")
        top = stack[0]
        if len(top) != 1:
            self.fail(
                top[1].at if len(top) > 1 else 0,
                "end of input" if not top else "a second top-level form",
                "exactly one query form",
            )
        return top[0]

    def atom(self, tok, i):
        if _SX_NUMBER.match(tok):
            try:
                v = float(tok) if any(c in tok for c in ".eE") else int(tok)
            except ValueError:
                self.fail(i, f"number {tok[:20]!r}", "a number")
            return _Atom("num", v, i)
        if tok.startswith(":") and len(tok) > 1:
            return _Atom("kw", tok[1:], i)
        return _Atom("sym", tok, i)


_SX_LITERALS = {"true": True, "false": False, "nil": None, "null": None}
_SX_G_KEYS = {
    "max-tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top-p": "top_p",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "adapter": "adapter",
    "attention": "attention",
    "positions": "positions",
    "recompute-pages": "recompute_pages",
    "recompute_pages": "recompute_pages",
    # the two fields of the g's `reweight` object
    "reweight-scale": "reweight.scale",
    "reweight_scale": "reweight.scale",
    "reweight-bias": "reweight.bias",
    "reweight_bias": "reweight.bias",
}
_SX_MAP_FORM = '(map (metadata "model" ...) (inputs "text" ...))'


class _SexprToData:
    """s-expression tree -> generic JSON-shaped data with the JSON paths as loc keys."""

    def __init__(self, reader):
        self.r = reader
        self.locs = {}

    def fail(self, x, path, found, expected):
        self.r.fail(x.at, found, expected, path)

    def mark(self, x, path):
        self.locs[path] = self.r.lines(x.at)

    def value(self, x, path):
        """A plain argument value (string, number, symbol, or a list of those)."""
        self.mark(x, path)
        if isinstance(x, _List):
            return [self.value(y, child_path(path, i)) for i, y in enumerate(x.items)]
        if x.kind == "kw":
            self.fail(x, path, f"keyword :{x.value}", "a value")
        if x.kind == "sym":
            return _SX_LITERALS.get(x.value, x.value)
        return x.value

    def split(self, items, path, allowed: dict):
        pos, kw = [], {}
        it = iter(items)
        for x in it:
            if isinstance(x, _Atom) and x.kind == "kw":
                name = allowed.get(x.value)
                if name is None:
                    exp = ("one of " + ", ".join(":" + k for k in allowed)) if allowed else "no keyword arguments here"
                    self.fail(x, path, f"unknown keyword :{x.value}", exp)
                if name in kw:
                    self.fail(x, path, f":{x.value} given twice", "each keyword once")
                val = next(it, None)
                if val is None:
                    self.fail(x, path, f"nothing after :{x.value}", "a value")
                kw[name] = val
            else:
                pos.append(x)
        return pos, kw

    def query(self, x, path, depth):
        self.mark(x, path)
        if depth > MAX_DEPTH:
            self.fail(x, path, f"nesting deeper than {MAX_DEPTH} levels", "a shallower query")
        if not isinstance(x, _List):
            self.fail(x, path, f"atom {x.value!r}", 'a query form such as (user "...")')
        if not x.items or not (isinstance(x.items[0], _Atom) and x.items[0].kind == "sym"):
            self.fail(x, path, "a list without a head symbol", "(g ...), (cross ...), (plus ...), (user ...), ...")
        head, args = x.items[0].value, x.items[1:]
        p = child_path(path, head)
        if head in ("cross", "seq", "par"):
            pos, _ = self.split(args, p, {})
            return {head: [self.query(c, child_path(p, i), depth + 1) for i, c in enumerate(pos)]}
        if head == "plus":
            pos, kw = self.split(args, p, {"attention": "attention", "positions": "positions"})
            if not kw:
                return {"plus": [self.query(c, child_path(p, i), depth + 1) for i, c in enumerate(pos)]}
            ip = child_path(p, "items")
            body = {"items": [self.query(c, child_path(ip, i), depth + 1) for i, c in enumerate(pos)]}
            for k, v in kw.items():
                body[k] = self.value(v, child_path(p, k))
            return {"plus": body}
        if head in ("system", "user", "assistant", "print"):
            pos, kw = self.split(
                args, p, {"token-ids": "token_ids", "token_ids": "token_ids"} if head == "assistant" else {}
            )
            if len(pos) != 1:
                self.fail(x, p, f"{len(pos)} positional arguments", f'exactly one string: ({head} "...")')
            content = self.value(pos[0], p)
            if kw:
                return {
                    head: {"content": content, "token_ids": self.value(kw["token_ids"], child_path(p, "token_ids"))}
                }
            return {head: content}
        if head == "monad":
            pos, _ = self.split(args, p, {})
            if len(pos) != 1:
                self.fail(x, p, f"{len(pos)} arguments", "exactly one query: (monad Q)")
            return {"monad": self.query(pos[0], p, depth + 1)}
        if head == "repeat":
            pos, _ = self.split(args, p, {})
            if len(pos) != 2:
                self.fail(x, p, f"{len(pos)} arguments", "(repeat N (g ...))")
            return {
                "repeat": {
                    "n": self.value(pos[0], child_path(p, "n")),
                    "query": self.query(pos[1], child_path(p, "query"), depth + 1),
                }
            }
        if head == "g":
            return {"g": self.g_body(x, args, p, depth)}
        if head == "zip":
            pos, _ = self.split(args, p, {})
            if len(pos) != 2:
                self.fail(x, p, f"{len(pos)} arguments", "(zip FIRST SECOND)")
            return {
                "zip": {
                    "first": self.query(pos[0], child_path(p, "first"), depth + 1),
                    "second": self.query(pos[1], child_path(p, "second"), depth + 1),
                }
            }
        if head == "map":
            return {"map": self.map_body(x, args, p)}
        self.fail(
            x.items[0],
            path,
            f"unknown node {head!r}",
            "one of " + ", ".join(NODE_TAGS),
        )

    def g_body(self, x, args, p, depth, head="g", has_input=True):
        """A g's arguments, or (`has_input` false) a map's metadata: the same, less INPUT."""
        pos, kw = self.split(args, p, _SX_G_KEYS)
        lo = 2 if has_input else 1
        if not lo <= len(pos) <= lo + 2:
            inp = " INPUT" if has_input else ""
            self.fail(
                x,
                p,
                f"{len(pos)} positional arguments",
                f'({head} "model"{inp} [MAX_TOKENS [TEMPERATURE]] [:key value]...)',
            )
        body = {"model": self.value(pos[0], child_path(p, "model"))}
        if has_input:
            body["input"] = self.query(pos[1], child_path(p, "input"), depth + 1)
        for name, y in zip(("max_tokens", "temperature"), pos[lo:]):
            if name in kw:
                self.fail(y, p, f"{name} given both positionally and as :{name}", "one of them")
            body[name] = self.value(y, child_path(p, name))
        for name, y in kw.items():
            if name.startswith("reweight."):  # :reweight-scale / :reweight-bias -> {"reweight": {...}}
                sub = name.split(".")[1]
                rp = child_path(p, "reweight")
                self.mark(y, rp)
                body.setdefault("reweight", {})[sub] = self.value(y, child_path(rp, sub))
            else:
                body[name] = self.value(y, child_path(p, name))
        return body

    def map_body(self, x, args, p):
        """(map (metadata ...) (inputs "a" ...)): the two parts in either order."""
        pos, _ = self.split(args, p, {})
        body = {}
        for y in pos:
            part = y.items[0].value if isinstance(y, _List) and y.items and isinstance(y.items[0], _Atom) else None
            if part not in ("metadata", "inputs") or y.items[0].kind != "sym":
                self.fail(y, p, "an argument that is not (metadata ...) or (inputs ...)", _SX_MAP_FORM)
            if part in body:
                self.fail(y, p, f"({part} ...) given twice", _SX_MAP_FORM)
            pp = child_path(p, part)
            self.mark(y, pp)
            if part == "metadata":
                body[part] = self.g_body(y, y.items[1:], pp, 0, head="metadata", has_input=False)
            else:
                body[part] = [self.value(v, child_path(pp, i)) for i, v in enumerate(y.items[1:])]
        for part in ("metadata", "inputs"):
            if part not in body:
                self.fail(x, p, f"no ({part} ...)", _SX_MAP_FORM)
        return body


def sexpr_data(src) -> tuple[object, dict]:
    reader = _SexprReader(_text(src))
    conv = _SexprToData(reader)
    return conv.query(reader.read(), "$", 1), conv.locs


def parse_sexpr(src) -> A.Query:
    data, locs = sexpr_data(src)
    return from_data(data, locs)


# ------------------------------------------------------------------------------ dispatch
FORMATS = ("json", "yaml", "sexpr")
_EXTENSIONS = {
    ".json": "json",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".sexp": "sexpr",
    ".sexpr": "sexpr",
    ".lisp": "sexpr",
    ".scm": "sexpr",
    ".spnl": "sexpr",
}


def sniff(text: str) -> str:
    """Guess the form from the first meaningful character: '{' JSON, '(' s-expr, else YAML."""
    for line in text.splitlines():
        t = line.strip()
        if not t or t.startswith(";") or t.startswith("#"):
            continue
        return {"{": "json", "(": "sexpr"}.get(t[0], "yaml")
    return "yaml"


def format_for_path(path: str) -> str | None:
    return _EXTENSIONS.get(os.path.splitext(str(path))[1].lower())


def parse(src, fmt: str | None = None) -> A.Query:
    """Parse a query in any form (`fmt` one of json/yaml/sexpr, or None to sniff)."""
    text = _text(src)
    fmt = fmt or sniff(text)
    if fmt not in FORMATS:
        raise SpanQueryError("$", f"format {fmt!r}", "one of " + ", ".join(FORMATS))
    return {"json": parse_json, "yaml": parse_yaml, "sexpr": parse_sexpr}[fmt](text)


# ------------------------------------------------------------------------------ printers
def to_data(q: A.Query):
    """AST -> generic JSON-shaped data (the canonical spnl-compatible form)."""
    if isinstance(q, A.Message):
        if q.token_ids is not None:
            return {q.role: {"content": q.content, "token_ids": list(q.token_ids)}}
        return {q.role: q.content}
    if isinstance(q, A.Plus):
        items = [to_data(c) for c in q.children]
        if q.attention is None and q.positions is None:
            return {"plus": items}
        body = {"items": items}
        if q.attention is not None:
            body["attention"] = q.attention
        if q.positions is not None:
            body["positions"] = q.positions
        return {"plus": body}
    if isinstance(q, (A.Cross, A.Seq, A.Par)):
        return {type(q).__name__.lower(): [to_data(c) for c in q.children]}
    if isinstance(q, A.G):
        return {"g": _g_body(q)}
    if isinstance(q, A.Repeat):
        return {"repeat": {"n": q.n, "query": to_data(q.query)}}
    if isinstance(q, A.Monad):
        return {"monad": to_data(q.query)}
    if isinstance(q, A.Print):
        return {"print": q.message}
    if isinstance(q, A.Map):
        return {"map": {"metadata": _g_settings(q.template), "inputs": list(q.inputs)}}
    if isinstance(q, A.Zip):
        return {"zip": {"first": to_data(q.first), "second": to_data(q.second)}}
    raise TypeError(f"not a query node: {q!r}")


def _g_body(q: A.G) -> dict:
    body = _g_settings(q)
    return {"model": body.pop("model"), "input": to_data(q.input), **body}


def _g_settings(q: A.G) -> dict:
    """A g's fields other than its input (a map's metadata)."""
    body = {"model": q.model}
    for name in ("max_tokens", "temperature", "top_p", "seed", "adapter"):
        v = getattr(q, name)
        if v is not None:
            body[name] = v
    if q.stop:
        body["stop"] = list(q.stop)
    if q.attention != "prefix":
        body["attention"] = q.attention
    if q.positions != "sequential":
        body["positions"] = q.positions
    if q.recompute_pages:
        body["recompute_pages"] = q.recompute_pages
    if q.reweight is not None:
        body["reweight"] = {"scale": q.reweight[0], "bias": q.reweight[1]}
    return body


def to_json(q: A.Query, indent: int | None = 2) -> str:
    return json.dumps(to_data(q), indent=indent, ensure_ascii=False)


_YAML_PLAIN_OK = re.compile(r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff]*$")


def _yaml_dumper():
    class Dumper(yaml.SafeDumper):
        pass

    def str_repr(dumper, s):
        # PyYAML mangles line-break-like characters (NEL, LS, PS, CR) in plain and
        # single-quoted scalars; double quotes escape them exactly.
        style = None if _YAML_PLAIN_OK.match(s) else '"'
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)

    Dumper.add_representer(str, str_repr)
    return Dumper


def to_yaml(q: A.Query) -> str:
    return yaml.dump(to_data(q), Dumper=_yaml_dumper(), sort_keys=False, allow_unicode=True, width=100)


def _sx_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _sx_num(v) -> str:
    return repr(v)


def _sx_g_tail(q: A.G) -> list[str]:
    """A g's arguments after its model and input (also a map's metadata after the model)."""
    tail = []
    if q.max_tokens is not None:
        tail.append(str(q.max_tokens))
        if q.temperature is not None:
            tail.append(_sx_num(q.temperature))
    elif q.temperature is not None:
        tail += [":temperature", _sx_num(q.temperature)]
    if q.top_p is not None:
        tail += [":top-p", _sx_num(q.top_p)]
    if q.seed is not None:
        tail += [":seed", str(q.seed)]
    if q.stop:
        tail += [":stop", "(" + " ".join(map(_sx_str, q.stop)) + ")"]
    if q.adapter is not None:
        tail += [":adapter", _sx_str(q.adapter)]
    if q.attention != "prefix":
        tail += [":attention", q.attention]
    if q.positions != "sequential":
        tail += [":positions", q.positions]
    if q.recompute_pages:
        tail += [":recompute-pages", str(q.recompute_pages)]
    if q.reweight is not None:
        tail += [":reweight-scale", _sx_num(q.reweight[0]), ":reweight-bias", _sx_num(q.reweight[1])]
    return tail


def to_sexpr(q: A.Query, indent: int = 0) -> str:
    pad = "\n" + "  " * (indent + 1)

    def block(head, kws, kids):
        parts = [head] + kws
        if not kids:
            return "(" + " ".join(parts) + ")"
        return "(" + " ".join(parts) + "".join(pad + to_sexpr(k, indent + 1) for k in kids) + ")"

    if isinstance(q, A.Message):
        extra = "" if q.token_ids is None else " :token-ids (" + " ".join(map(str, q.token_ids)) + ")"
        return f"({q.role} {_sx_str(q.content)}{extra})"
    if isinstance(q, A.Plus):
        kws = []
        if q.attention is not None:
            kws += [":attention", q.attention]
        if q.positions is not None:
            kws += [":positions", q.positions]
        return block("plus", kws, q.children)
    if isinstance(q, (A.Cross, A.Seq, A.Par)):
        return block(type(q).__name__.lower(), [], q.children)
    if isinstance(q, A.G):
        tail = _sx_g_tail(q)
        return f"(g {_sx_str(q.model)}{pad}{to_sexpr(q.input, indent + 1)}" + "".join(" " + t for t in tail) + ")"
    if isinstance(q, A.Map):
        meta = " ".join([_sx_str(q.template.model)] + _sx_g_tail(q.template))
        inputs = "".join(" " + _sx_str(x) for x in q.inputs)
        return f"(map{pad}(metadata {meta}){pad}(inputs{inputs}))"
    if isinstance(q, A.Zip):
        return f"(zip{pad}{to_sexpr(q.first, indent + 1)}{pad}{to_sexpr(q.second, indent + 1)})"
    if isinstance(q, A.Repeat):
        return f"(repeat {q.n}{pad}{to_sexpr(q.query, indent + 1)})"
    if isinstance(q, A.Monad):
        return f"(monad{pad}{to_sexpr(q.query, indent + 1)})"
    if isinstance(q, A.Print):
        return f"(print {_sx_str(q.message)})"
    raise TypeError(f"not a query node: {q!r}")


def dump(q: A.Query, fmt: str = "json") -> str:
    return {"json": to_json, "yaml": to_yaml, "sexpr": to_sexpr}[fmt](q)
