"""Fuzz: malformed inputs raise only SpanQueryError (with a path), fast, never hang;
what parses also prepares and lowers with only SpanQueryError."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qstrategies import full_queries

from spanjax.query import passes as P
from spanjax.query import syntax as S
from spanjax.query.errors import SpanQueryError
from spanjax.query.fake import ByteTokenizer
from spanjax.query.lower import lower
from spanjax.query.validate import NODE_TAGS

# A hang guard, not a speed claim: inputs take milliseconds; 2 s once failed on a 2-core
# machine busy with other jobs (5.6 s for one YAML input), so the bound leaves room for load.
PER_INPUT_S = 5.0
FUZZ = settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck), database=None)


TOK = ByteTokenizer()


def check(src, fmt=None):
    t0 = time.perf_counter()
    try:
        q = P.prepare(S.parse(src, fmt))
        for g in P.ready(q)[:4]:  # the first wave lowers (the rest needs their results)
            lower(g, TOK, page_size=4)
    except SpanQueryError as e:
        assert e.path.startswith("$"), e
        assert str(e)
    # any other exception propagates and fails the test
    assert time.perf_counter() - t0 < PER_INPUT_S, src[:200] if isinstance(src, str) else src[:200]


keys = st.sampled_from(
    NODE_TAGS
    + (
        "model",
        "input",
        "n",
        "query",
        "max_tokens",
        "temperature",
        "items",
        "attention",
        "seed",
        "stop",
        "bogus",
        "token_ids",
    )
)
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**30)
    | st.sampled_from([2**64, 260, 10**12])  # past int64 / outside the vocabulary
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "a\udfff"]),  # lone surrogates
    lambda sub: st.lists(sub, max_size=4) | st.dictionaries(keys, sub, max_size=3),
    max_leaves=25,
)


@FUZZ
@given(json_like)
def test_random_json_shaped_data(data):
    try:
        text = json.dumps(data)
    except ValueError:
        return
    check(text, "json")
    check(text, "yaml")


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([None, "json", "yaml", "sexpr"]))
def test_random_bytes(raw, fmt):
    check(raw, fmt)


@FUZZ
@given(
    st.text(alphabet='(){}[]":,; \n\tabcgusplrxy0123456789.-:e\\\x85', max_size=120),
    st.sampled_from([None, "json", "yaml", "sexpr"]),
)
def test_random_text_from_syntax_alphabet(text, fmt):
    check(text, fmt)


@FUZZ
@given(full_queries(max_leaves=6), st.sampled_from(S.FORMATS), st.data())
def test_mutated_valid_documents(q, fmt, data):
    text = S.dump(q, fmt)
    ops = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, max(0, len(text) - 1)),
                st.sampled_from(["del", "dup", "ins", "cut"]),
                st.sampled_from(list('{}[]()":,0 -:a\n')),
            ),
            min_size=1,
            max_size=3,
        )
    )
    for at, op, ch in ops:
        at = min(at, len(text))
        if op == "del":
            text = text[:at] + text[at + 1 :]
        elif op == "dup":
            text = text[:at] + text[at : at + 5] + text[at:]
        elif op == "ins":
            text = text[:at] + ch + text[at:]
        else:
            text = text[:at]
    check(text, fmt)
    check(text.encode("utf-8") + b"\xc3", fmt)


@settings(max_examples=40, deadline=None, database=None)
@given(st.integers(60, 5000), st.sampled_from(["monad", "cross", "plus", "list"]), st.sampled_from(S.FORMATS))
def test_huge_nesting(n, kind, fmt):
    if fmt == "sexpr":
        text = "(monad " * n + '(user "x")' + ")" * n if kind != "list" else "(" * n
    elif kind == "monad":
        text = '{"monad": ' * n + '{"user": "x"}' + "}" * n
    elif kind == "list":
        text = "[" * n + "]" * n
    else:
        text = f'{{"{kind}": [' * n + '{"user": "x"}' + "]}" * n
    check(text, fmt)
