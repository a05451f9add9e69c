"""Optimizer passes and evaluation helpers."""

from __future__ import annotations

from hypothesis import given, settings
from qstrategies import TinyTokenizer, full_queries, gs, prompts

from spanjax.query import ast as A
from spanjax.query import passes as P
from spanjax.query.lower import lower
from spanjax.query.syntax import parse

u, s = A.user, A.system


def G(inp, **kw):
    return A.G("m", inp, **kw)


def test_flatten():
    q = A.Cross((s("a"), A.Cross((u("b"), A.Cross((u("c"),)))), A.Plus((A.Plus((u("d"), u("e"))), u("f")))))
    assert P.flatten(q) == A.Cross((s("a"), u("b"), u("c"), A.Plus((u("d"), u("e"), u("f")))))
    # plus nodes with different policies do not merge (their children see different things)
    iso = A.Plus((A.Plus((u("d"),), attention="isolated"), u("f")))
    assert P.flatten(iso) == iso
    assert P.flatten(A.Cross((u("x"),))) == u("x")


def test_dedup():
    q = A.Cross((s("a"), A.Plus((u("d1"), u("d2"), u("d1"), u("d2"), u("d3")))))
    assert P.dedup(q) == A.Cross((s("a"), A.Plus((u("d1"), u("d2"), u("d3")))))


def test_expand_repeat_seeds():
    inner = G(u("x"), temperature=0.7, seed=10)
    q = G(A.Plus((A.Repeat(3, inner), u("d"))))
    out = P.expand_repeat(q)
    assert out.input.children[:3] == tuple(G(u("x"), temperature=0.7, seed=10 + i) for i in range(3))
    assert out.input.children[3] == u("d")
    assert P.expand_repeat(A.Repeat(2, G(u("x")))) == A.Par((G(u("x"), seed=0), G(u("x"), seed=1)))
    assert P.expand_repeat(G(A.Repeat(2, G(u("x"))))).input == A.Plus((G(u("x"), seed=0), G(u("x"), seed=1)))


def test_hoist_judge_shape():
    inner = G(A.Cross((s("s"), u("write"))), seed=0)
    q = G(A.Seq((s("judge"), A.Plus((inner, inner.__class__(**{**inner.__dict__, "seed": 1}))))))
    h = P.hoist(q)
    plus = h.input.children[1]
    assert plus.attention == "isolated"
    assert plus.children[0] == A.Cross((inner.input, inner))
    # a g directly in a cross becomes a one-child isolated plus
    h2 = P.hoist(G(A.Cross((s("a"), inner, u("q")))))
    assert h2.input.children[1] == A.Plus((A.Cross((inner.input, inner)),), attention="isolated")
    # a monad's g does not feed the prompt: untouched
    assert P.hoist(G(A.Cross((A.Monad(inner), u("q"))))) == G(A.Cross((A.Monad(inner), u("q"))))


def test_hoist_pins_inner_policies():
    inner = G(A.Cross((s("s"), A.Plus((u("a"), u("b"))))), attention="isolated", positions="parallel")
    ex = P.hoist(G(A.Plus((inner,)))).input.children[0]
    assert ex.children[0].children[1] == A.Plus((u("a"), u("b")), "isolated", "parallel")


def test_evaluation_order_waves():
    g1, g2 = G(u("a"), seed=1), G(u("b"), seed=2)
    mid = G(A.Plus((g1, g2)))
    top = G(A.Cross((mid, G(u("c")))))
    order = P.evaluation_order(top)
    assert [set(w) for w in order] == [{g1, g2, G(u("c"))}, {mid}, {top}]
    # seq runs in order: the second child's g waits for the first's
    sq = A.Seq((A.Monad(g1), g2))
    assert P.evaluation_order(sq) == [[g1], [g2]]
    assert P.evaluation_order(A.Par((g1, g2))) == [[g1, g2]]


def test_evaluation_loop_end_to_end():
    q = P.prepare(parse('(g "m" (seq (system "judge") (plus (repeat 3 (g "m" (user "write") 8 0.7)))) 16)'))
    steps = 0
    while wave := P.ready(q):
        q = P.substitute(q, {g: P.GenResult(f"out{g.seed}", (1, 2, g.seed or 0)) for g in wave})
        steps += 1
    assert steps == 2
    assert isinstance(q, A.Message) and q.content == "outNone"


def test_substitute_accepts_text():
    g = G(u("x"))
    assert P.substitute(A.Cross((g, u("q"))), {g: "hi"}) == A.Cross((A.assistant("hi"), u("q")))


@settings(max_examples=60, deadline=None)
@given(full_queries(max_leaves=8))
def test_passes_are_pure_and_stable(q):
    for f in (P.flatten, P.dedup, P.expand_repeat):
        out = f(q)
        assert f(q) == out  # deterministic
    e = P.expand_repeat(q)
    assert not any(isinstance(n, A.Repeat) for n in A.walk(e))
    assert P.flatten(P.flatten(e)) == P.flatten(e)
    assert P.dedup(P.dedup(e)) == P.dedup(e)
    P.evaluation_order(P.prepare(q))


@settings(max_examples=80, deadline=None)
@given(gs(prompts()))
def test_flatten_and_dedup_preserve_lowering_semantics(g):
    """flatten keeps the token stream and the visibility mask (it is a no-op for lowering)."""
    tok = TinyTokenizer()
    a, b = lower(g, tok, page_size=4), lower(P.flatten(g), tok, page_size=4)
    assert [t for s in a.spans for t in s.token_ids] == [t for s in b.spans for t in s.token_ids]
    assert (a.dense_mask() == b.dense_mask()).all()
    assert [p for s in a.spans for p in s.positions] == [p for s in b.spans for p in s.positions]
