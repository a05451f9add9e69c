"""Parsers and printers: spnl shapes in three forms, round trips, error reports."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from qstrategies import full_queries

from spanjax.query import ast as A
from spanjax.query import syntax as S
from spanjax.query.errors import SpanQueryError

# spnl's judge builtin shape (email2): a seq whose plus holds repeated inner g's.
JUDGE_JSON = """
{"g": {"model": "granite", "max_tokens": 200, "temperature": 0.0,
  "input": {"seq": [
    {"system": "You compute an evaluation score from 0 to 100."},
    {"print": "Generate 4 candidate emails in parallel"},
    {"plus": [
      {"repeat": {"n": 4, "query": {"g": {
        "model": "granite",
        "input": {"cross": [
          {"system": "You write emails."},
          {"user": "write an introductory email"},
          {"user": "My name is Shiloh."}]},
        "max_tokens": 100, "temperature": 0.7}}}}]}]}}}
"""

JUDGE_YAML = """
g:
  model: granite
  max_tokens: 200
  temperature: 0.0
  input:
    seq:
      - system: You compute an evaluation score from 0 to 100.
      - print: Generate 4 candidate emails in parallel
      - plus:
          - repeat:
              n: 4
              g:                       # "g" (the g's body) is accepted like "query"
                model: granite
                input:
                  cross:
                    - system: You write emails.
                    - user: write an introductory email
                    - user: My name is Shiloh.
                max-tokens: 100        # kebab alias
                temperature: 0.7
"""

JUDGE_SEXPR = """
; spnl judge shape
(g "granite"
   (seq (system "You compute an evaluation score from 0 to 100.")
        (print "Generate 4 candidate emails in parallel")
        (plus (repeat 4 (g "granite"
                           (cross (system "You write emails.")
                                  (user "write an introductory email")
                                  (user "My name is Shiloh."))
                           100 0.7))))
   200 0.0)
"""

RAG_JSON = """{"g": {"model": "smollm2-135m", "input": {"cross": [
  {"system": "Answer from the documents."},
  {"plus": [{"user": "Doc A: Paris is in France."}, {"user": "Doc B: Rome is in Italy."}]},
  {"user": "Where is Paris?"}]}, "max_tokens": 64, "temperature": 0.0}}"""

RAG_YAML = """
g:
  model: smollm2-135m
  input:
    cross:
      - system: Answer from the documents.
      - plus:
          - user: "Doc A: Paris is in France."
          - user: "Doc B: Rome is in Italy."
      - user: Where is Paris?
  max_tokens: 64
  temperature: 0.0
"""

RAG_SEXPR = """(g "smollm2-135m" (cross (system "Answer from the documents.")
  (plus (user "Doc A: Paris is in France.") (user "Doc B: Rome is in Italy."))
  (user "Where is Paris?")) 64 0.0)"""


@pytest.mark.parametrize(
    "texts", [(JUDGE_JSON, JUDGE_YAML, JUDGE_SEXPR), (RAG_JSON, RAG_YAML, RAG_SEXPR)], ids=["judge", "rag"]
)
def test_spnl_shapes_same_ast_in_all_forms(texts):
    j, y, s = texts
    qj = S.parse_json(j)
    assert S.parse_yaml(y) == qj
    assert S.parse_sexpr(s) == qj
    # sniffing picks the right parser too
    assert S.parse(j) == S.parse(y) == S.parse(s) == qj
    assert S.parse(j.encode()) == qj


def test_judge_ast_structure():
    q = S.parse_json(JUDGE_JSON)
    assert isinstance(q, A.G) and isinstance(q.input, A.Seq)
    rep = q.input.children[2].children[0]
    assert isinstance(rep, A.Repeat) and rep.n == 4 and rep.query.temperature == 0.7
    assert rep.query.input.children[0] == A.system("You write emails.")


def test_design_example_positional_g():
    q = S.parse_sexpr('(g "model" (cross (system "...") (plus (user "d1") (user "d2")) (user "q")) 64 0.0)')
    assert q.max_tokens == 64 and q.temperature == 0.0
    assert q.input.children[1] == A.Plus((A.user("d1"), A.user("d2")))


def test_extensions_parse():
    q = S.parse_sexpr(
        '(g "m" (plus :attention isolated :positions parallel (user "a") (assistant "b" :token-ids (1 2)))'
        ' :seed 3 :top-p 0.9 :stop ("x" "y") :adapter "rag-lora" :attention isolated :positions parallel)'
    )
    assert q.seed == 3 and q.top_p == 0.9 and q.stop == ("x", "y") and q.adapter == "rag-lora"
    assert (q.attention, q.positions) == ("isolated", "parallel")
    assert q.input == A.Plus((A.user("a"), A.assistant("b", (1, 2))), "isolated", "parallel")
    assert S.parse_json(S.to_json(q)) == q
    j = json.loads(S.to_json(q))
    assert j["g"]["input"]["plus"]["attention"] == "isolated"
    assert S.parse_json('{"g": {"model": "m", "input": {"user": "u"}, "stop": "END"}}').stop == ("END",)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(full_queries())
def test_print_then_parse_is_identity(q):
    for fmt in S.FORMATS:
        text = S.dump(q, fmt)
        assert S.parse(text, fmt) == q, (fmt, text)
    assert S.parse(S.to_json(q)) == q  # sniffed
    assert S.parse(S.to_sexpr(q)) == q


# --- errors: path, found/expected, line/column ----------------------------------------
@pytest.mark.parametrize(
    "text, path, found, at",
    [
        (
            '{"g": {"model": "m", "input": {"cross": [{"user": "a"}, {"user": "b"}, {"plus": [{"usr": "x"}]}]}}}',
            "$.g.input.cross[2].plus[0]",
            "unknown node 'usr'",
            '{"usr"',
        ),
        ('{"g": {"model": "m", "input": {"plus": []}}}', "$.g.input.plus", "empty list", "[]"),
        ('{"g": {"model": "m"}}', "$.g", "no 'input'", '{"model"'),
        ('{"g": {"model": "m", "input": {"user": "u"}, "max_tokens": "64"}}', "$.g.max_tokens", "string '64'", '"64"'),
        ('{"g": {"model": "m", "input": {"user": "u"}, "temperature": -1}}', "$.g.temperature", "number -1", "-1}"),
        ('{"g": {"model": "m", "input": {"user": "u"}, "colour": 1}}', "$.g.colour", "unknown key 'colour'", "1}"),
        ('{"repeat": {"n": 0, "g": {"model": "m", "input": {"user": "u"}}}}', "$.repeat.n", "number 0", "0,"),
        ('{"repeat": {"n": 2, "query": {"user": "u"}}}', "$.repeat.query", "a message node", '{"user"'),
        ('{"cross": [{"user": "a"}, {"user": "b"},]}', "$.cross[2]", "']'", "]}"),
        ('{"user": "a", "system": "b"}', "$", "object with keys 'user', 'system'", '{"user"'),
        ('{"user": "a"} x', "$", "extra text 'x'", "x"),
        ('{"g": {"model": "m", "model": "n"}}', "$.g.model", "duplicate key 'model'", '"model": "n"'),
        (
            '{"g": {"model": "m", "input": {"user": "u"}, "attention": "global"}}',
            "$.g.attention",
            "string 'global'",
            '"global"',
        ),
    ],
)
def test_json_errors(text, path, found, at):
    with pytest.raises(SpanQueryError) as ei:
        S.parse_json(text)
    e = ei.value
    assert e.path == path and e.found.startswith(found), str(e)
    assert e.line == 1 and text[e.col - 1 :].startswith(at), str(e)  # column points at the node
    assert path in str(e) and "expected" in str(e)


def test_yaml_error_locations():
    text = "g:\n  model: m\n  input:\n    cross:\n      - user: a\n      - plus: []\n"
    with pytest.raises(SpanQueryError) as ei:
        S.parse_yaml(text)
    assert ei.value.path == "$.g.input.cross[1].plus" and ei.value.line == 6
    with pytest.raises(SpanQueryError) as ei:
        S.parse_yaml("g: [unclosed\n")
    assert ei.value.path == "$" and ei.value.line is not None


def test_sexpr_error_locations():
    with pytest.raises(SpanQueryError) as ei:
        S.parse_sexpr('(g "m"\n   (cross (user "a")\n          (bogus "x")))')
    e = ei.value
    assert e.path == "$.g.input.cross[1]" and (e.line, e.col) == (3, 12) and "bogus" in e.found
    with pytest.raises(SpanQueryError) as ei:
        S.parse_sexpr('(g "m" (user "a")')
    assert ei.value.found == "'(' never closed" and (ei.value.line, ei.value.col) == (1, 1)
    with pytest.raises(SpanQueryError) as ei:
        S.parse_sexpr('(g "m" (plus) 5)')
    assert ei.value.path == "$.g.input.plus" and ei.value.found == "empty list"
    with pytest.raises(SpanQueryError) as ei:
        S.parse_sexpr('(g "m" (user "a") :temprature 0.5)')
    assert "unknown keyword :temprature" in ei.value.found


def test_depth_limit_is_an_error_not_a_crash():
    deep = '{"monad": ' * 70 + '{"user": "x"}' + "}" * 70
    with pytest.raises(SpanQueryError) as ei:
        S.parse_json(deep)
    assert "nesting deeper" in ei.value.found
    very_deep = "[" * 100_000 + "]" * 100_000
    for fmt in S.FORMATS:
        with pytest.raises(SpanQueryError):
            S.parse(very_deep if fmt != "sexpr" else "(" * 100_000, fmt)


def test_non_utf8_bytes():
    with pytest.raises(SpanQueryError) as ei:
        S.parse(b'{"user": "\xff"}')
    assert ei.value.path == "$" and "UTF-8" in ei.value.found


def test_yaml_alias_bomb_is_bounded():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    with pytest.raises(SpanQueryError):
        S.parse_yaml(bomb)
    with pytest.raises(SpanQueryError):
        S.parse_yaml("&a [*a]")  # self-referential
