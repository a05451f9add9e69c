"""A seeded, plain-Python fuzz generator for span queries in their three text forms.

`Fuzzer(seed).inputs(n)` yields `n` inputs `(src, fmt, kind)`: `src` is a `str` or
`bytes` query text, `fmt` the form to parse it as (`json`, `yaml`, `sexpr`, or None
to sniff), `kind` the recipe that made it. The recipes:

- `valid`: a random well-formed query (every node kind, hostile text in strings);
- `text`: 1-4 text mutations of a valid query's text (truncate, insert/delete/
  duplicate spans, swap brackets, syntax tokens, random Unicode, escapes of lone
  surrogates, huge or odd numbers), sometimes as bytes with invalid UTF-8;
- `struct`: 1-3 structural mutations of a valid query's data (wrong types,
  missing/extra/renamed keys, huge and negative numbers, NaN/inf, wrapping in
  monad/zip/plus/repeat/map), printed in one of the forms;
- `hostile`: huge integers (YAML hex/binary past Python's 4,300-digit limit),
  deep nesting, long escaped-quote runs, random bytes.

Valid queries come from a small corpus (examples/*, every operator, nesting) and
from a random generator. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import pathlib
import random

import yaml

from spanjax.query import ast as A
from spanjax.query import syntax as S
from spanjax.query.validate import NODE_TAGS

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"

# --- corpus --------------------------------------------------------------------------
_G = {"model": "m", "input": {"user": "hi"}, "max_tokens": 3, "temperature": 0.5}
CORPUS = [
    {"user": "hello"},
    {"g": _G},
    {"repeat": {"n": 2, "g": _G}},
    {"repeat": {"n": 3, "query": {"g": {**_G, "seed": 4}}}},
    {"map": {"metadata": {"model": "m", "max_tokens": 3, "temperature": 0.5}, "inputs": ["a", "b", "c"]}},
    {"map": {"metadata": {"model": "m", "top_p": 0.9, "seed": 2, "stop": ["x"]}, "inputs": ["only"]}},
    {"zip": {"first": {"system": "f"}, "second": {"par": [{"user": "a"}, {"user": "b"}]}}},
    {"zip": {"first": {"plus": [{"user": "p"}]}, "second": {"repeat": {"n": 2, "g": _G}}}},
    {"zip": {"first": {"g": _G}, "second": {"zip": {"first": {"user": "x"}, "second": {"user": "y"}}}}},
    {
        "g": {
            "model": "m",
            "input": {
                "cross": [
                    {"system": "s"},
                    {"plus": [{"user": "d1"}, {"user": "d2"}, {"map": {"metadata": {"model": "m"}, "inputs": ["q"]}}]},
                    {"user": "q"},
                ]
            },
            "attention": "isolated",
            "positions": "parallel",
        }
    },
    {
        "seq": [
            {"print": "start"},
            {"monad": {"g": _G}},
            {"par": [{"g": {"model": "m", "input": {"plus": {"items": [{"user": "a"}], "attention": "isolated"}}}}]},
        ]
    },
    {"g": {"model": "m", "input": {"assistant": {"content": "a", "token_ids": [1, 2, 259]}}, "adapter": "lora"}},
    {"g": {"model": "m", "input": {"cross": [{"user": "u"}, {"g": {"model": "m", "input": {"plus": [{"g": _G}]}}}]}}},
]


def example_texts() -> list[tuple[str, str]]:
    """(text, fmt) of every file in examples/ (the forms users write by hand)."""
    out = []
    for path in sorted(EXAMPLES.glob("*")):
        fmt = S.format_for_path(path)
        if fmt:
            out.append((path.read_text(encoding="utf-8"), fmt))
    return out


# --- pieces for mutations ------------------------------------------------------------
_UNICODE = [
    "\x00",
    "\x1f",
    "\x7f",
    "\x85",
    "\u00e9",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ufffe",
    "\U0001f600",
    "\u202e",
    "\t",
    "\r",
    "\r\n",
]
_ESCAPES = ["\\ud800", "\\udc00", "\\udfff\\ud800", "\\u0000", "\\uZZZZ", "\\", '\\"', "\\x41", "\\u12"]
_TOKENS = (
    list("{}[](),:;\"'#&*!|>%@`-? \n\t\\")
    + ["true", "false", "null", "nil", "~", "yes", "NaN", "Infinity", "-Infinity", ".nan", ".inf", "1e999", "-0"]
    + ["0x1F", "0b101", "0o17", "1:30", "1_000", "&a ", "*a", "<<: ", "!!int ", "!!python/object ", "---\n", "..."]
    + [":seed", ":max-tokens", ":attention", ":stop", ":token-ids", ":bogus", "isolated", "parallel"]
    + [f'"{t}"' for t in NODE_TAGS]
    + list(NODE_TAGS)
    + ['"model"', '"input"', '"n"', '"inputs"', '"metadata"', '"first"', '"second"', '"items"', '"query"']
)
_KEYS = list(NODE_TAGS) + [
    "model",
    "input",
    "n",
    "query",
    "max_tokens",
    "max-tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "adapter",
    "attention",
    "positions",
    "items",
    "metadata",
    "inputs",
    "first",
    "second",
    "content",
    "token_ids",
    "augment",
    "bogus",
    "",
]
_BRACKETS = "{}[]()"
HUGE_MARK = "HUGEINTMARK"  # replaced by a huge integer literal after printing


def _weird_values(r: random.Random) -> list:
    return [
        None,
        True,
        False,
        0,
        -1,
        1,
        1024,
        1025,
        4097,
        2**63 - 1,
        2**63,
        2**64,
        -(2**63) - 1,
        10**30,
        1.5,
        -0.0,
        1e308,
        math.nan,
        math.inf,
        -math.inf,
        "",
        "x",
        "\ud800",
        "a\udfff",
        "\x00",
        "x" * r.randint(100, 5000),
        [],
        {},
        [None],
        [1, 2],
        {"user": "x"},
        {"bogus": 1},
        {"g": {}},
        {"user": "a", "system": "b"},
        {"map": {"metadata": {"model": "m"}, "inputs": ["x"] * r.choice([1, 3])}},
        {"zip": {"first": {"user": "a"}, "second": {"user": "b"}}},
        HUGE_MARK,
    ]


# --- a tolerant printer of JSON-shaped data as an s-expression ------------------------
def _sx_val(v) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return HUGE_MARK if v == HUGE_MARK else json.dumps(v)
    if isinstance(v, list):
        return "(" + " ".join(_sx_val(x) for x in v) + ")"
    return data_to_sexpr(v)


def _sx_kw(body: dict, skip=()) -> list[str]:
    return [f":{str(k).replace('_', '-')} {_sx_val(x)}" for k, x in body.items() if k not in skip]


def data_to_sexpr(v) -> str:
    """JSON-shaped data (possibly malformed) as an s-expression, the way a user would
    write it: known shapes in their s-expression form, anything else as best it goes."""
    if not isinstance(v, dict):
        return _sx_val(v)
    if len(v) != 1:
        return "(" + " ".join(_sx_kw(v)) + ")"
    ((tag, body),) = v.items()
    head = str(tag) if tag and " " not in str(tag) and "(" not in str(tag) else json.dumps(str(tag))
    parts = [head]
    if tag == "g" and isinstance(body, dict):
        if "model" in body:
            parts.append(_sx_val(body["model"]))
        if "input" in body:
            parts.append(data_to_sexpr(body["input"]))
        parts += _sx_kw(body, ("model", "input"))
    elif tag == "map" and isinstance(body, dict):
        meta = body.get("metadata")
        if isinstance(meta, dict):
            parts.append("(metadata " + " ".join([_sx_val(meta.get("model"))] + _sx_kw(meta, ("model",))) + ")")
        elif "metadata" in body:
            parts.append("(metadata " + _sx_val(meta) + ")")
        if "inputs" in body:
            ins = body["inputs"]
            parts.append("(inputs " + (" ".join(map(_sx_val, ins)) if isinstance(ins, list) else _sx_val(ins)) + ")")
        parts += _sx_kw(body, ("metadata", "inputs"))
    elif tag == "zip" and isinstance(body, dict):
        parts += [data_to_sexpr(body[k]) for k in ("first", "second") if k in body]
        parts += _sx_kw(body, ("first", "second"))
    elif tag == "repeat" and isinstance(body, dict):
        if "n" in body:
            parts.append(_sx_val(body["n"]))
        for k in ("g", "query"):
            if k in body:
                x = body[k]
                parts.append(data_to_sexpr({"g": x} if k == "g" and isinstance(x, dict) and "g" not in x else x))
    elif tag == "plus" and isinstance(body, dict):
        parts += _sx_kw(body, ("items",))
        items = body.get("items")
        parts += [data_to_sexpr(x) for x in items] if isinstance(items, list) else [_sx_val(items)]
    elif tag == "assistant" and isinstance(body, dict):
        parts.append(_sx_val(body.get("content")))
        parts += _sx_kw(body, ("content",))
    elif isinstance(body, list):
        parts += [data_to_sexpr(x) if isinstance(x, dict) else _sx_val(x) for x in body]
    else:
        parts.append(_sx_val(body))
    return "(" + " ".join(parts) + ")"


# --- the generator ---------------------------------------------------------------------
class Fuzzer:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.seed = seed
        self.corpus_data = [json.loads(json.dumps(d)) for d in CORPUS]
        self.corpus_texts = [(S.dump(S.parse_json(json.dumps(d)), fmt), fmt) for d in CORPUS for fmt in S.FORMATS]
        self.corpus_texts += example_texts()
        for text, fmt in example_texts():
            if fmt == "json":
                self.corpus_data.append(json.loads(text))

    # --- random valid queries ----------------------------------------------------------
    def text(self) -> str:
        r = self.r
        pool = "abc xyz:#-&*!|>'\"\\{}[]()%@`?,\n" + "".join(_UNICODE)
        if r.random() < 0.5:
            return r.choice(["", "x", "hello world", "yes", "null", "1", "- a", "a: b", "#c", "'q'", '"q"'])
        return "".join(r.choice(pool) for _ in range(r.randint(0, 12)))

    def g_fields(self) -> dict:
        r = self.r
        kw = {}
        if r.random() < 0.5:
            kw["max_tokens"] = r.choice([1, 3, 64, 2**63 - 1])
        if r.random() < 0.5:
            kw["temperature"] = r.choice([0.0, 0.5, 1.0, 2.25, 1e-9])
        if r.random() < 0.2:
            kw["top_p"] = r.choice([0.5, 1.0, 1e-6])
        if r.random() < 0.3:
            kw["seed"] = r.choice([0, 7, 2**62])
        if r.random() < 0.2:
            kw["stop"] = tuple(r.choice(["x", "\n", "END", "é"]) for _ in range(r.randint(1, 2)))
        if r.random() < 0.1:
            kw["adapter"] = r.choice(["lora", "a b"])
        if r.random() < 0.2:
            kw["attention"] = r.choice(A.ATTENTION_POLICIES)
        if r.random() < 0.2:
            kw["positions"] = r.choice(A.POSITION_POLICIES)
        return kw

    def query(self, depth: int = 0) -> A.Query:
        r = self.r
        if depth > 3 or r.random() < 0.3:
            c = r.random()
            if c < 0.6:
                return A.Message(r.choice(A.ROLES), self.text())
            if c < 0.7:
                return A.assistant(self.text(), [r.randrange(260) for _ in range(r.randint(0, 3))])
            if c < 0.8:
                return A.Print(self.text())
            n = r.randint(1, 3)
            return A.Map(
                tuple(self.text() for _ in range(n)), A.G(r.choice(["m", "é"]), A.MAP_INPUT, **self.g_fields())
            )
        kind = r.choice(["cross", "plus", "seq", "par", "g", "g", "repeat", "monad", "zip", "zip"])
        if kind in ("cross", "seq", "par", "plus"):
            kids = tuple(self.query(depth + 1) for _ in range(r.randint(1, 3)))
            if kind == "plus" and r.random() < 0.3:
                return A.Plus(kids, r.choice([None, *A.ATTENTION_POLICIES]), r.choice([None, *A.POSITION_POLICIES]))
            return {"cross": A.Cross, "seq": A.Seq, "par": A.Par, "plus": A.Plus}[kind](kids)
        if kind == "g":
            return A.G("m", self.query(depth + 1), **self.g_fields())
        if kind == "repeat":
            return A.Repeat(r.randint(1, 4), A.G("m", self.query(depth + 1), **self.g_fields()))
        if kind == "monad":
            return A.Monad(self.query(depth + 1))
        return A.Zip(self.query(depth + 1), self.query(depth + 1))

    def valid(self) -> tuple[A.Query, str]:
        return self.query(), self.r.choice(S.FORMATS)

    # --- text mutations ----------------------------------------------------------------
    def source_text(self) -> tuple[str, str]:
        if self.r.random() < 0.6:
            return self.r.choice(self.corpus_texts)
        q, fmt = self.valid()
        return S.dump(q, fmt), fmt

    def mutate_text(self, t: str) -> str:
        r = self.r
        at = r.randint(0, len(t))
        op = r.randrange(10)
        if op == 0:  # truncate
            return t[:at]
        if op == 1:  # delete a span
            return t[:at] + t[at + r.randint(1, 8) :]
        if op == 2:  # duplicate a span
            return t[:at] + t[at : at + r.randint(1, 30)] + t[at:]
        if op == 3:  # swap a bracket for another
            spots = [i for i, c in enumerate(t) if c in _BRACKETS]
            if spots:
                i = r.choice(spots)
                return t[:i] + r.choice(_BRACKETS) + t[i + 1 :]
            return t + r.choice(_BRACKETS)
        if op == 4:  # a syntax token
            return t[:at] + r.choice(_TOKENS) + t[at:]
        if op == 5:  # random Unicode (incl. astral, controls, line separators)
            ch = r.choice(_UNICODE) if r.random() < 0.6 else chr(r.choice([r.randrange(0x20, 0xD800), 0x10FFFF]))
            return t[:at] + ch + t[at:]
        if op == 6:  # an escape inside a string (lone surrogates, bad escapes)
            q = t.find('"', at)
            if q >= 0:
                return t[: q + 1] + r.choice(_ESCAPES) + t[q + 1 :]
            return t[:at] + r.choice(_ESCAPES) + t[at:]
        if op == 7:  # a number replaced by an odd or huge one
            digits = [i for i, c in enumerate(t) if c.isdigit()]
            num = r.choice(["-1", "0", "1e999", "-0.0", "1.", ".5", "2e-400", "9" * r.randint(19, 30), "1e5", "0x10"])
            if digits:
                i = r.choice(digits)
                return t[:i] + num + t[i + 1 :]
            return t[:at] + num + t[at:]
        if op == 8:  # a random character from the whole syntax alphabet
            return t[:at] + r.choice('{}[]()":,; \n\t\\-#&*!|>') + t[at:]
        # swap two spans
        b = r.randint(0, len(t))
        i, j = sorted((at, b))
        k = r.randint(j, len(t))
        return t[:i] + t[j:k] + t[i:j] + t[k:]

    def text_input(self):
        r = self.r
        t, fmt = self.source_text()
        for _ in range(r.randint(1, 4)):
            t = self.mutate_text(t)
        if r.random() < 0.1:  # bytes, sometimes not UTF-8
            b = t.encode("utf-8", "surrogatepass")
            if r.random() < 0.5 and b:
                i = r.randrange(len(b))
                b = b[:i] + bytes([r.choice([0x80, 0xC3, 0xED, 0xFF, 0xF4])]) + b[i:]
            return b, r.choice([fmt, None])
        return t, r.choice([fmt, fmt, fmt, None])

    # --- structural mutations ----------------------------------------------------------
    def _slots(self, data, out, parent=None, key=None):
        """Every (container, key) slot in `data` (iterative: the data may be deep)."""
        stack = [(data, parent, key)]
        while stack:
            v, p, k = stack.pop()
            out.append((p, k, v))
            if isinstance(v, dict):
                stack.extend((x, v, kk) for kk, x in v.items())
            elif isinstance(v, list):
                stack.extend((x, v, i) for i, x in enumerate(v))
        return out

    def mutate_data(self, data):
        r = self.r
        box = [data]
        slots = self._slots(data, [], box, 0)
        parent, key, v = r.choice(slots)
        op = r.randrange(8)
        if op == 0 or op == 1:  # a wrong or extreme value
            parent[key] = r.choice(_weird_values(r))
        elif op == 2 and isinstance(v, dict) and v:  # a key removed
            del v[r.choice(list(v))]
        elif op == 3 and isinstance(v, dict):  # an extra key
            v[r.choice(_KEYS)] = r.choice(_weird_values(r))
        elif op == 4 and isinstance(v, dict) and v:  # a key renamed
            k = r.choice(list(v))
            v[r.choice(_KEYS)] = v.pop(k)
        elif op == 5 and isinstance(v, list):  # list surgery
            c = r.randrange(3)
            if c == 0:
                v.clear()
            elif c == 1 and v:
                v.extend(v[: r.randint(1, 3)] * r.randint(1, 3))
            else:
                v.insert(r.randint(0, len(v)), r.choice(_weird_values(r)))
        elif op == 6:  # wrapped in another node
            w = r.randrange(6)
            if w == 0:
                parent[key] = {"monad": v}
            elif w == 1:
                parent[key] = {"zip": {"first": v, "second": v}}
            elif w == 2:
                parent[key] = {"plus": [v, v]}
            elif w == 3:
                parent[key] = {"repeat": {"n": r.choice([1, 2, 1024, 1025, 0, -3, 2**70]), "query": v}}
            elif w == 4:
                parent[key] = {"g": {"model": "m", "input": v}}
            else:
                parent[key] = {"cross": [v] * r.randint(1, 4)}
        else:  # a number field set to an odd value
            nums = [(p, k) for p, k, x in slots if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if nums:
                p, k = r.choice(nums)
                p[k] = r.choice([-1, 0, 2**63, 2**64, 10**400, -(10**30), math.nan, math.inf, 0.5, HUGE_MARK])
            else:
                parent[key] = r.choice(_weird_values(r))
        return box[0]

    def huge_int(self, fmt) -> str:
        r = self.r
        n = r.choice([20, 400, 4301, r.randint(3600, 20000)])
        if fmt == "yaml" and r.random() < 0.6:
            return r.choice(["0x" + "f" * n, "0b" + "1" * n, "0o" + "7" * n, "1" + ":59" * min(n, 3000)])
        return r.choice(["", "-"]) + "9" * n

    def render(self, data, fmt) -> str:
        r = self.r
        if fmt == "json":
            text = json.dumps(data, ensure_ascii=r.random() < 0.5, indent=r.choice([None, 1]))
        elif fmt == "yaml":
            if r.random() < 0.5:
                text = json.dumps(data)  # flow style (JSON is YAML)
            else:
                try:
                    text = yaml.safe_dump(data, allow_unicode=r.random() < 0.5, sort_keys=False)
                except Exception:  # PyYAML cannot print some strings (lone surrogates)
                    text = json.dumps(data)
        else:
            text = data_to_sexpr(data)
        while HUGE_MARK in text:
            big = self.huge_int(fmt)
            for form in (f'"{HUGE_MARK}"', f"'{HUGE_MARK}'", HUGE_MARK):
                if form in text:
                    text = text.replace(form, big, 1)
                    break
        return text

    def struct_input(self):
        r = self.r
        if r.random() < 0.7:
            data = json.loads(json.dumps(r.choice(self.corpus_data)))
        else:
            data = S.to_data(self.query())
        for _ in range(r.randint(1, 3)):
            data = self.mutate_data(data)
        fmt = r.choice(S.FORMATS)
        return self.render(data, fmt), fmt

    # --- hostile inputs ----------------------------------------------------------------
    def hostile_input(self):
        r = self.r
        op = r.randrange(6)
        fmt = r.choice(S.FORMATS)
        if op == 0:  # a huge integer in a number field
            field = r.choice(["max_tokens", "seed", "temperature", "top_p", "n", "token_ids"])
            if field == "n":
                data = {"repeat": {"n": HUGE_MARK, "g": _G}}
            elif field == "token_ids":
                data = {"g": {**_G, "input": {"assistant": {"content": "a", "token_ids": [1, HUGE_MARK]}}}}
            elif r.random() < 0.5:
                data = {"map": {"metadata": {"model": "m", field: HUGE_MARK}, "inputs": ["a"]}}
            else:
                data = {"g": {**_G, field: HUGE_MARK}}
            return self.render(data, fmt), fmt
        if op == 1:  # deep nesting of one node kind, or of raw brackets
            n = r.choice([r.randint(30, 70), r.randint(100, 400), r.randint(1000, 3000)])
            kind = r.choice(["monad", "cross", "plus", "zip", "g", "brackets"])
            return _deep(kind, n, fmt), fmt
        if op == 2:  # a long run of escaped quotes (and backslashes)
            n = r.randint(100, 5000)
            unit = r.choice(['\\"', '"\\', "'\\\"", '\\\n"', "\\\\"])
            head = r.choice(["", '"', "user: ", '{"user": "', '(user "'])
            return head + unit * n, r.choice([fmt, "yaml"])
        if op == 3:  # random bytes
            return r.randbytes(r.randint(0, 300)), r.choice([None, *S.FORMATS])
        if op == 4:  # a lone surrogate (as an escape, or in the str itself) somewhere in a query
            q, fmt = self.valid()
            t = S.dump(q, fmt)
            s = r.choice(["\\ud800", "\\udfff", "\ud800", "\udc00x"])
            i = t.find('"', r.randint(0, len(t)))
            if i < 0:
                return '{"user": "' + s + '"}', "json"
            return t[: i + 1] + s + t[i + 1 :], fmt
        # caps on the expanded query: generations and nodes (multiplied by repeat, map,
        # zip and g nesting, so a small document reaches them; wide ones are slow to
        # parse in pure-Python YAML and are left to test_untrusted.py)
        # (4097 strings are 0.2 s of pure-Python YAML: fewer, more times, in YAML)
        big = r.choice([3, 300, 1025] if fmt == "yaml" else [3, 1025, 4097])
        big_map = {"map": {"metadata": {"model": "m"}, "inputs": ["x"] * big}}
        item = r.choice([{"g": _G}, {"user": "x"}, {"repeat": {"n": r.choice([5, 1024]), "g": _G}}, big_map])
        if r.random() < 0.3:
            k = r.randint(1, 3 if fmt == "yaml" else 8)
            item = {"zip": {"first": {"plus": [{"g": _G}, item]}, "second": {"cross": [item] * k}}}
        n = r.choice([2, 5]) if item is big_map or "zip" in item else r.choice([2, 5, 50, 50 if fmt == "yaml" else 300])
        data = {r.choice(["par", "plus", "cross", "seq"]): [item] * n}
        if r.random() < 0.3:
            data = {"g": {"model": "m", "input": data}}
        return self.render(data, fmt), fmt

    # --- the stream --------------------------------------------------------------------
    def inputs(self, n: int):
        r = self.r
        for _ in range(n):
            c = r.random()
            if c < 0.12:
                q, fmt = self.valid()
                yield S.dump(q, fmt), fmt, "valid"
            elif c < 0.52:
                src, fmt = self.text_input()
                yield src, fmt, "text"
            elif c < 0.88:
                src, fmt = self.struct_input()
                yield src, fmt, "struct"
            else:
                src, fmt = self.hostile_input()
                yield src, fmt, "hostile"


def _deep(kind: str, n: int, fmt: str) -> str:
    if kind == "brackets":
        return {"json": "[" * n + "]" * n, "yaml": "[" * n + "]" * n, "sexpr": "(" * n + ")" * n}[fmt]
    leaf = {"json": '{"user": "x"}', "yaml": "{user: x}", "sexpr": '(user "x")'}[fmt]
    if fmt == "sexpr":
        head = {"monad": "(monad ", "cross": "(cross ", "plus": "(plus ", "zip": '(zip (user "f") ', "g": '(g "m" '}
        return head[kind] * n + leaf + ")" * n
    q = '"' if fmt == "json" else ""
    head = {
        "monad": f"{{{q}monad{q}: ",
        "cross": f"{{{q}cross{q}: [",
        "plus": f"{{{q}plus{q}: [",
        "zip": f"{{{q}zip{q}: {{{q}first{q}: {leaf}, {q}second{q}: ",
        "g": f"{{{q}g{q}: {{{q}model{q}: m, {q}input{q}: ".replace(": m,", ': "m",' if q else ": m,"),
    }[kind]
    tail = {"monad": "}", "cross": "]}", "plus": "]}", "zip": "}}", "g": "}}"}[kind]
    return head * n + leaf + tail * n
