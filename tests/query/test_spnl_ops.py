"""spnl compatibility: the `map`, `zip`, `print` and `repeat` operators as spnl 0.22.1's
client serializes them, in all three forms, and what the passes rewrite them to."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from qstrategies import full_queries

from spanjax.query import ast as A
from spanjax.query import passes as P
from spanjax.query import syntax as S
from spanjax.query.errors import SpanQueryError
from spanjax.query.fake import ByteTokenizer
from spanjax.query.lower import lower
from spanjax.query.validate import MAX_GENERATIONS, expansion, from_data

u, s = A.user, A.system


def G(inp, **kw):
    return A.G("m", inp, **kw)


def evaluate(q):
    """Run the evaluation loop with a fake engine: each g answers `<its user text>!`."""
    q = P.prepare(q)
    runs = []
    while wave := P.ready(q):
        runs.extend(wave)
        q = P.substitute(q, {g: P.GenResult(f"{_last_text(g.input)}!", (1,)) for g in wave})
    return P.value(q), runs


def _last_text(q):
    msgs = [n for n in A.walk(q) if isinstance(n, A.Message)]
    return msgs[-1].content if msgs else ""


# --- map ---------------------------------------------------------------------------------
MAP_JSON = '{"map": {"metadata": {"model": "m", "max_tokens": 3, "temperature": 0.5}, "inputs": ["a", "b", "c"]}}'
MAP_YAML = """
map:
  metadata: {model: m, max_tokens: 3, temperature: 0.5}
  inputs: [a, b, c]
"""
MAP_SEXPR = '(map (metadata "m" 3 0.5) (inputs "a" "b" "c"))'
MAP_AST = A.Map(("a", "b", "c"), A.G("m", A.MAP_INPUT, max_tokens=3, temperature=0.5))


def test_map_spnl_form_in_all_forms():
    for text, fmt in ((MAP_JSON, "json"), (MAP_YAML, "yaml"), (MAP_SEXPR, "sexpr")):
        assert S.parse(text, fmt) == MAP_AST
        assert S.parse(text) == MAP_AST  # sniffed
        assert S.parse(S.dump(MAP_AST, fmt), fmt) == MAP_AST
    # keywords, and the two parts in either order
    assert S.parse('(map (inputs "a" "b" "c") (metadata "m" :temperature 0.5 :max-tokens 3))') == MAP_AST
    assert json.loads(S.to_json(MAP_AST)) == json.loads(MAP_JSON)  # prints spnl's form


def test_map_template_input_is_a_placeholder():
    assert A.Map(["a"], A.G("m", u("ignored"))) == A.Map(("a",), A.G("m", A.MAP_INPUT))
    assert A.children(MAP_AST) == ()


def test_map_metadata_takes_every_g_field():
    meta = {
        "model": "m",
        "max-tokens": 4,
        "temperature": 0.0,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["x", "y"],
        "adapter": "lora",
        "attention": "isolated",
        "positions": "parallel",
    }
    q = from_data({"map": {"metadata": meta, "inputs": ["a"]}})
    t = q.template
    assert (t.max_tokens, t.temperature, t.top_p, t.seed, t.stop, t.adapter) == (4, 0.0, 0.9, 7, ("x", "y"), "lora")
    assert (t.attention, t.positions) == ("isolated", "parallel")
    for fmt in S.FORMATS:
        assert S.parse(S.dump(q, fmt), fmt) == q
    sx = '(map (metadata "m" 4 0.0 :top-p 0.9 :seed 7 :stop ("x" "y") :adapter "lora" :attention isolated'
    assert S.parse(sx + ' :positions parallel) (inputs "a"))') == q


@pytest.mark.parametrize(
    "body,path,found",
    [
        ({"metadata": {"model": "m"}}, "$.map", "no 'inputs'"),
        ({"inputs": ["a"]}, "$.map", "no 'metadata'"),
        ({"metadata": {"model": "m"}, "inputs": [], "x": 1}, "$.map.x", "unknown key"),
        ({"metadata": {"model": "m"}, "inputs": []}, "$.map.inputs", "empty list"),
        ({"metadata": {"model": "m"}, "inputs": "a"}, "$.map.inputs", "string"),
        ({"metadata": {"model": "m"}, "inputs": ["a", 3]}, "$.map.inputs[1]", "number 3"),
        ({"metadata": {"model": "m"}, "inputs": ["\ud800"]}, "$.map.inputs[0]", "surrogate"),
        ({"metadata": {}, "inputs": ["a"]}, "$.map.metadata", "no 'model'"),
        ({"metadata": {"model": ""}, "inputs": ["a"]}, "$.map.metadata.model", "empty"),
        ({"metadata": {"model": "m", "input": {"user": "x"}}, "inputs": ["a"]}, "$.map.metadata.input", "unknown"),
        ({"metadata": {"model": "m", "temperature": -1}, "inputs": ["a"]}, "$.map.metadata.temperature", "-1"),
        ({"metadata": {"model": "m", "top_p": 0}, "inputs": ["a"]}, "$.map.metadata.top_p", "0"),
        ({"metadata": {"model": "m", "max_tokens": 0}, "inputs": ["a"]}, "$.map.metadata.max_tokens", "0"),
        ({"metadata": {"model": "m", "seed": 2**64}, "inputs": ["a"]}, "$.map.metadata.seed", "number"),
        ({"metadata": {"model": "m", "stop": [""]}, "inputs": ["a"]}, "$.map.metadata.stop[0]", "empty"),
        ({"metadata": {"model": "m", "attention": "x"}, "inputs": ["a"]}, "$.map.metadata.attention", "'x'"),
        ({"metadata": [], "inputs": ["a"]}, "$.map.metadata", "empty list"),
        ([], "$.map", "empty list"),
    ],
)
def test_map_errors(body, path, found):
    with pytest.raises(SpanQueryError) as ei:
        from_data({"map": body})
    assert ei.value.path == path and found in ei.value.found, str(ei.value)


@pytest.mark.parametrize(
    "text,path",
    [
        ('(map (metadata "m"))', "$.map"),
        ('(map (inputs "a"))', "$.map"),
        ('(map (metadata "m") (inputs "a") (inputs "b"))', "$.map"),
        ('(map (metadata "m") (inputs "a") (user "b"))', "$.map"),
        ('(map (metadata "m") "a")', "$.map"),
        ('(map (metadata) (inputs "a"))', "$.map.metadata"),
        ('(map (metadata "m" 1 2 3) (inputs "a"))', "$.map.metadata"),
        ('(map (metadata "m" :bogus 1) (inputs "a"))', "$.map.metadata"),
        ('(map (metadata "m") (inputs "a" (user "b")))', "$.map.inputs[1]"),
        ('(map (metadata "m" 0) (inputs "a"))', "$.map.metadata.max_tokens"),
    ],
)
def test_map_sexpr_errors(text, path):
    with pytest.raises(SpanQueryError) as ei:
        S.parse(text, "sexpr")
    assert ei.value.path == path, str(ei.value)
    assert ei.value.line == 1


def test_map_expansion():
    gs = tuple(A.G("m", u(x), max_tokens=3, temperature=0.5) for x in "abc")
    assert P.expand(MAP_AST) == A.Par(gs)  # top level: a par
    assert P.expand(A.Cross((s("x"), MAP_AST))) == A.Cross((s("x"),) + gs)  # spliced into a list
    assert P.expand(G(MAP_AST)) == G(A.Plus(gs))  # elsewhere: a plus
    assert P.expand(A.Monad(MAP_AST)) == A.Monad(A.Plus(gs))
    # seeds: every g keeps the metadata's seed (the inputs differ; repeat's g's get s + i)
    seeded = A.Map(("a", "b"), A.G("m", A.MAP_INPUT, seed=5))
    assert [g.seed for g in P.expand(seeded).children] == [5, 5]
    assert P.expand_repeat(MAP_AST) == P.expand_bulk(MAP_AST) == P.expand(MAP_AST)  # the old name


def test_map_value_is_the_list_of_generations():
    value, runs = evaluate(MAP_AST)
    assert value == ["a!", "b!", "c!"] and len(runs) == 3
    # equal inputs are one g (same prompt, same seed), listed twice
    value, runs = evaluate(A.Map(("a", "b", "a"), A.G("m", A.MAP_INPUT)))
    assert value == ["a!", "b!", "a!"] and len(runs) == 2
    # a map feeding a g: its answers are the g's commutative inputs
    value, runs = evaluate(G(A.Cross((s("judge"), MAP_AST, u("q")))))
    assert value == "q!" and len(runs) == 4


def test_map_counts_toward_max_generations():
    big = {"metadata": {"model": "m"}, "inputs": ["x"] * (MAX_GENERATIONS + 1)}
    with pytest.raises(SpanQueryError) as ei:
        from_data({"map": big})
    assert ei.value.path == "$.map.inputs" and str(MAX_GENERATIONS) in ei.value.expected
    ok = {"map": {"metadata": {"model": "m"}, "inputs": ["x"] * MAX_GENERATIONS}}
    assert len(from_data(ok).inputs) == MAX_GENERATIONS
    # inside a repeat the count multiplies: 3 x (1 + 2) g's
    rep = {"repeat": {"n": 3, "g": {"model": "m", "input": {"plus": [{"map": {**big, "inputs": ["a", "b"]}}]}}}}
    q = from_data(rep)
    assert expansion(q).gens == 9 == sum(isinstance(n, A.G) for n in A.walk(P.expand(q)))
    rep["repeat"]["n"] = 2
    rep["repeat"]["g"]["input"]["plus"][0]["map"]["inputs"] = ["x"] * (MAX_GENERATIONS // 2)
    with pytest.raises(SpanQueryError, match="generations"):
        from_data(rep)
    with pytest.raises(SpanQueryError, match="generations"):  # Python-built: expand checks too
        P.prepare(A.Repeat(2, G(A.Map(["x"] * (MAX_GENERATIONS // 2), A.G("m", A.MAP_INPUT)))))


# --- zip ---------------------------------------------------------------------------------
def test_zip_in_all_forms():
    data = {"zip": {"first": {"system": "f"}, "second": {"par": [{"user": "a"}, {"user": "b"}]}}}
    q = A.Zip(s("f"), A.Par((u("a"), u("b"))))
    assert from_data(data) == q
    assert from_data({"zip": [data["zip"]["first"], data["zip"]["second"]]}) == q  # serde's pair form, as spnl
    assert S.parse(json.dumps(data), "json") == q
    assert S.parse("zip:\n  first: {system: f}\n  second:\n    par: [{user: a}, {user: b}]\n", "yaml") == q
    assert S.parse('(zip (system "f") (par (user "a") (user "b")))', "sexpr") == q
    for fmt in S.FORMATS:
        assert S.parse(S.dump(q, fmt), fmt) == q
    assert A.children(q) == (s("f"), A.Par((u("a"), u("b"))))


@pytest.mark.parametrize(
    "data,path,found",
    [
        ({"zip": {"first": {"user": "a"}}}, "$.zip", "no 'second'"),
        ({"zip": {"second": {"user": "a"}}}, "$.zip", "no 'first'"),
        ({"zip": {"first": {"user": "a"}, "second": {"user": "b"}, "third": 1}}, "$.zip.third", "unknown key"),
        ({"zip": {"first": {"user": "a"}, "second": 3}}, "$.zip.second", "number 3"),
        ({"zip": [{"user": "a"}]}, "$.zip", "a list of 1 items"),
        ({"zip": [{"user": "a"}, 3]}, "$.zip[1]", "number 3"),
        ({"zip": {"first": {"bogus": "a"}, "second": {"user": "b"}}}, "$.zip.first", "unknown node 'bogus'"),
    ],
)
def test_zip_errors(data, path, found):
    with pytest.raises(SpanQueryError) as ei:
        from_data(data)
    assert ei.value.path == path and found in ei.value.found, str(ei.value)


@pytest.mark.parametrize("text", ['(zip (user "a"))', '(zip (user "a") (user "b") (user "c"))', "(zip)"])
def test_zip_sexpr_arity(text):
    with pytest.raises(SpanQueryError) as ei:
        S.parse(text, "sexpr")
    assert ei.value.path == "$.zip" and "(zip FIRST SECOND)" in ei.value.expected


def test_zip_rewrites():
    f, a, b = s("f"), u("a"), u("b")
    g1 = G(u("x"))
    # a single message (or g, monad, print) second: seq[first, second]
    for second in (a, g1, A.Monad(a), A.Print("p")):
        assert P.expand_zip(A.Zip(f, second)) == A.Seq((f, second))
    # a list second: the same kind, first before every item (plus policies kept)
    for kind in (A.Cross, A.Seq, A.Par, A.Plus):
        assert P.expand_zip(A.Zip(f, kind((a, b)))) == kind((f, a, f, b))
    iso = A.Plus((a, b), attention="isolated")
    assert P.expand_zip(A.Zip(f, iso)) == A.Plus((f, a, f, b), attention="isolated")
    # a plus first: each item becomes plus[first's children..., item]
    pf = A.Plus((u("p1"), u("p2")), positions="parallel")
    assert P.expand_zip(A.Zip(pf, A.Cross((a, b)))) == A.Cross(
        (A.Plus((u("p1"), u("p2"), a), positions="parallel"), A.Plus((u("p1"), u("p2"), b), positions="parallel"))
    )
    # a repeat or map second: the par of its g's
    rep = A.Repeat(2, G(u("x"), seed=3))
    assert P.expand_zip(A.Zip(f, rep)) == A.Par((f, G(u("x"), seed=3), f, G(u("x"), seed=4)))
    mp = A.Map(("a", "b"), A.G("m", A.MAP_INPUT))
    assert P.expand_zip(A.Zip(f, mp)) == A.Par((f, G(a), f, G(b)))
    # a zip second is rewritten first (to a seq here, then interleaved)
    assert P.expand_zip(A.Zip(f, A.Zip(u("g"), a))) == A.Seq((f, u("g"), f, a))
    # zips anywhere (a g's input, a zip's first) are rewritten
    assert P.expand_zip(G(A.Zip(A.Zip(f, a), b))) == G(A.Seq((A.Seq((f, a)), b)))
    # repeats and maps outside a zip's second are left to expand_bulk
    assert P.expand_zip(A.Cross((rep, mp))) == A.Cross((rep, mp))


def test_zip_first_is_evaluated_once():
    first = G(u("f"), seed=1)
    q = A.Zip(first, A.Repeat(3, G(u("x"))))
    order = P.evaluation_order(P.prepare(q))
    assert sum(g == first for w in order for g in w) == 1  # copies are one g
    value, runs = evaluate(q)
    assert value == ["f!", "x!", "f!", "x!", "f!", "x!"]
    assert len(runs) == 4  # first once, three samples
    # a message second: the zip's value is the second's
    assert evaluate(A.Zip(G(u("f")), G(u("s"))))[0] == "s!"


def test_zip_in_a_prompt_lowers():
    q = G(A.Zip(s("instructions"), A.Cross((u("a"), u("b")))))
    (g,) = P.ready(P.prepare(q))
    plan = lower(g, ByteTokenizer(), page_size=4)
    text = ByteTokenizer().decode([t for sp in plan.spans for t in sp.token_ids])
    assert text.count("instructions") == 2 and text.index("a") < text.rindex("instructions") < text.index("b")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(full_queries(max_leaves=8))
def test_expansion_counts_match_the_rewritten_tree(q):
    e = expansion(q)
    expanded = P.expand(q)
    assert not any(isinstance(n, (A.Repeat, A.Map, A.Zip)) for n in A.walk(expanded))
    assert e.gens == sum(isinstance(n, A.G) for n in A.walk(expanded))  # exact
    assert sum(1 for _ in A.walk(expanded)) <= e.nodes  # an upper bound ...
    assert sum(1 for _ in A.walk(P.prepare(q))) <= e.nodes  # ... of the hoisted tree too
    assert P.expand(expanded) == expanded


# --- print -------------------------------------------------------------------------------
def test_prints_in_document_order():
    q = S.parse(
        '(seq (print "start") (g "m" (cross (print "in prompt") (user "u")))'
        ' (zip (print "first") (par (user "a") (user "b"))) (monad (print "last")))'
    )
    assert P.prints(q) == ["start", "in prompt", "first", "last"]
    # after prepare, the zip's first is listed once per copy: call prints before prepare
    assert P.prints(P.prepare(q)).count("first") == 2
    assert evaluate(A.Seq((A.Print("p"), G(u("x")))))[0] == "x!"  # value unchanged
    assert P.value(A.Print("p")) == ""


# --- repeat ------------------------------------------------------------------------------
def test_repeat_g_and_query_spellings():
    body = {"model": "m", "input": {"user": "hi"}, "max_tokens": 3, "temperature": 0.5}
    spnl = {"repeat": {"n": 2, "g": body}}
    a = from_data(spnl)
    assert a == from_data({"repeat": {"n": 2, "query": {"g": body}}})
    assert a == from_data({"repeat": {"n": 2, "g": {"g": body}}})
    assert a == A.Repeat(2, A.G("m", u("hi"), max_tokens=3, temperature=0.5))
    assert S.parse(json.dumps(spnl), "json") == a
    assert S.parse("repeat: {n: 2, g: {model: m, input: {user: hi}, max_tokens: 3, temperature: 0.5}}") == a
    assert S.parse('(repeat 2 (g "m" (user "hi") 3 0.5))') == a


# --- operators we do not support ---------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        '{"augment": {"embedding_model": "e", "body": {"user": "q"}}}',
        "augment: {body: {user: q}}",
        '(augment (user "q"))',
        '{"g": {"model": "m", "input": {"cross": [{"augment": {}}]}}}',
        '(g "m" (cross (augment "x")))',
    ],
)
def test_unsupported_operator_is_named(text):
    with pytest.raises(SpanQueryError) as ei:
        S.parse(text)
    assert "augment" in str(ei.value) and "unknown node" in ei.value.found
    assert "map" in ei.value.expected and "zip" in ei.value.expected


def test_unexpanded_map_and_zip_rejected_downstream():
    for node in (MAP_AST, A.Zip(u("a"), u("b"))):
        name = type(node).__name__.lower()
        with pytest.raises(SpanQueryError, match=f"unexpanded {name}"):
            lower(G(A.Cross((u("q"), node))), ByteTokenizer(), page_size=4)
        with pytest.raises(SpanQueryError, match=f"unexpanded {name}"):
            P.evaluation_order(node)
        with pytest.raises(SpanQueryError, match=f"unexpanded {name}"):
            P.value(node)
