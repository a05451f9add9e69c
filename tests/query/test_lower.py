"""Lowering vs docs/design.md §3, checked against an independent brute-force reference."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qstrategies import TinyTokenizer, gs, prompts

from spanjax.query import ast as A
from spanjax.query import passes as P
from spanjax.query.errors import SpanQueryError
from spanjax.query.lower import lower, lower_known_prefix


@pytest.fixture
def tok():
    # Kept here, not in a tests/query/conftest.py: a second module named `conftest`
    # would shadow tests/conftest.py, which other test modules import helpers from.
    return TinyTokenizer()


TOK = TinyTokenizer()


def reference(g: A.G, tok):
    """Token-level semantics straight from docs/design.md §3: flattened tokens, positions,
    and a [N, N] visibility mask built from plus ancestry, not from spans."""
    toks = []  # (id, pos, ancestry): ancestry = ((plus uid, child index, isolated), ...)
    uid = itertools.count()

    def walk(n, anc, pos):
        if isinstance(n, A.Message):
            ids = (
                tok.generation_prefix_ids() + list(n.token_ids)
                if n.token_ids is not None
                else tok.encode_message(n.role, n.content)
            )
            for t in ids:
                toks.append((t, pos, anc))
                pos += 1
            return pos
        if isinstance(n, (A.Cross, A.Seq, A.Par)):
            for c in n.children:
                pos = walk(c, anc, pos)
            return pos
        if isinstance(n, A.Plus):
            iso = (n.attention or g.attention) == "isolated"
            par = (n.positions or g.positions) == "parallel"
            me, cur, end = next(uid), pos, pos
            for i, c in enumerate(n.children):
                e = walk(c, anc + ((me, i, iso),), pos if par else cur)
                cur, end = e, max(end, e)
            return end if par else cur
        return pos  # monad, print

    p = walk(g.input, (), 0)
    for t in tok.generation_prefix_ids():
        toks.append((t, p, ()))
        p += 1
    n = len(toks)
    mask = np.zeros((n, n), bool)
    for a in range(n):
        _, pa, anc_a = toks[a]
        for b in range(a + 1):
            _, pb, anc_b = toks[b]
            ok = pb <= pa
            bmap = {u: i for u, i, _ in anc_b}
            for u, i, iso in anc_a:
                if u in bmap:
                    ok &= bmap[u] == i  # plus siblings never see each other
                elif iso:
                    ok = False  # isolated: nothing before the child
            mask[a, b] = ok
    return [t for t, _, _ in toks], [p for _, p, _ in toks], mask


page_sizes = st.sampled_from([1, 2, 3, 4, 16])


@settings(max_examples=250, deadline=None)
@given(gs(prompts()), page_sizes)
def test_lowering_matches_reference(g, ps):
    plan = lower(g, TOK, page_size=ps)
    ids, pos, mask = reference(g, TOK)
    assert [t for s in plan.spans for t in s.token_ids] == ids
    assert [p for s in plan.spans for p in s.positions] == pos
    assert (plan.dense_mask() == mask).all()
    # every span starts on a page boundary, right after the previous one's padded pages
    off = 0
    for i, s in enumerate(plan.spans):
        assert s.index == i and len(s) > 0
        assert s.start % ps == 0 and s.start == off
        off += -(-len(s) // ps) * ps
        assert all(j < i for j in s.sees)
        assert list(s.positions) == list(range(s.positions[0], s.positions[0] + len(s)))
        assert len(s.page_keys) == -(-len(s) // ps)
    last = plan.spans[-1]
    assert last.kind == "cross" and set(last.sees) == set(range(len(plan.spans) - 1))
    assert last.token_ids[-2:] == tuple(TOK.generation_prefix_ids())
    ids_p, pos_p, real = plan.padded_tokens()
    assert real.sum() == plan.num_tokens and list(ids_p[real]) == ids


def _permute_first_plus(q, perm_seed):
    """Permute the children of every plus in q (deterministically by seed)."""
    rng = np.random.default_rng(perm_seed)

    def go(n):
        kids = A.children(n)
        if not kids:
            return n
        new = tuple(go(c) for c in kids)
        if isinstance(n, A.Plus):
            new = tuple(new[i] for i in rng.permutation(len(new)))
        return A.with_children(n, new)

    return go(q)


def _all_parallel(q):
    """The same tree with parallel positions everywhere (g and every plus override)."""
    if isinstance(q, A.G):
        return dataclasses.replace(q, positions="parallel", input=_all_parallel(q.input))
    kids = A.children(q)
    if kids:
        q = A.with_children(q, tuple(_all_parallel(c) for c in kids))
    if isinstance(q, A.Plus):
        q = dataclasses.replace(q, positions="parallel")
    return q


@settings(max_examples=200, deadline=None)
@given(gs(prompts()), page_sizes, st.integers(0, 2**31))
def test_permuting_plus_children_keeps_every_childs_key(g, ps, seed):
    """Any policy: a span that follows no plus (top-level plus children, leading
    cross runs) keys the same after every plus is permuted."""
    a = lower(g, TOK, page_size=ps)
    b = lower(_permute_first_plus(g, seed), TOK, page_size=ps)

    def stable(plan):
        return {
            s.token_ids: (s.cache_key, s.page_keys)
            for s in plan.spans
            if not any(plan.spans[d].kind == "plus" for d in s.sees)
        }

    key_a, key_b = stable(a), stable(b)
    assert key_a.keys() == key_b.keys()
    for toks in key_a:
        if sum(t.token_ids == toks for t in a.spans) == 1:
            assert key_a[toks] == key_b[toks]


@settings(max_examples=200, deadline=None)
@given(gs(prompts()), page_sizes, st.integers(0, 2**31))
def test_permuting_parallel_plus_children_keeps_every_key(g, ps, seed):
    """Parallel positions: every span, the ones after the plus included, keeps its key."""
    g = _all_parallel(g)
    a = lower(g, TOK, page_size=ps)
    b = lower(_permute_first_plus(g, seed), TOK, page_size=ps)
    key_a = {s.token_ids: (s.cache_key, s.page_keys) for s in a.spans}
    assert sorted(s.cache_key for s in a.spans) == sorted(s.cache_key for s in b.spans)
    assert a.spans[-1].cache_key == b.spans[-1].cache_key
    for s in b.spans:  # each child (identified by its tokens) keeps its key
        if s.token_ids in key_a and sum(t.token_ids == s.token_ids for t in b.spans) == 1:
            assert key_a[s.token_ids] == (s.cache_key, s.page_keys)


def test_rag_example(tok):
    g = A.G("m", A.Cross((A.system("S"), A.Plus((A.user("d1"), A.user("dd2"))), A.user("q"))), positions="parallel")
    plan = lower(g, tok, page_size=4)
    assert [s.kind for s in plan.spans] == ["cross", "plus", "plus", "cross"]
    assert [s.sees for s in plan.spans] == [(), (0,), (0,), (0, 1, 2)]
    assert plan.spans[1].positions[0] == plan.spans[2].positions[0] == 3  # parallel children start together
    assert plan.spans[3].positions[0] == 3 + 5  # after the longest child
    iso = lower(dataclasses.replace(g, attention="isolated"), tok, page_size=4)
    assert [s.sees for s in iso.spans] == [(), (), (), (0, 1, 2)]
    # isolated spans key the same whatever precedes them
    other = lower(
        A.G("m", A.Cross((A.system("different"), A.Plus((A.user("dd2"),)), A.user("z"))), attention="isolated"),
        tok,
        page_size=4,
    )
    assert other.spans[1].cache_key == iso.spans[2].cache_key
    # the model and adapter are part of every key
    assert lower(g, tok, page_size=4, model="other").spans[0].cache_key != plan.spans[0].cache_key
    assert lower(g, tok, page_size=4, adapter="lora").spans[0].cache_key != plan.spans[0].cache_key


def test_page_keys_chain_and_partial_last_page(tok):
    plan = lower(A.G("m", A.user("abcdefghij")), tok, page_size=4)
    (s,) = plan.spans
    assert len(s) == 14 and len(s.page_keys) == 4
    from spanjax.query.page_keys import chain_page_key, chain_page_keys

    assert s.page_keys == chain_page_keys(s.base_key, s.token_ids, 4)
    assert s.page_keys[1] == chain_page_key(s.page_keys[0], s.token_ids[4:8])
    # extending the last span (generation) keeps every full page's key
    ext = plan.sequence_page_keys([5, 6, 7])
    assert ext[:3] == s.page_keys[:3] and ext[3] != s.page_keys[3]


@settings(max_examples=60, deadline=None)
@given(gs(prompts(max_leaves=6)), gs(prompts(max_leaves=6)), page_sizes, st.lists(st.integers(0, 999), max_size=9))
def test_hoisted_exchange_hits_inner_generation_pages(inner, outer_shape, ps, generated):
    """The outer query re-sends the inner exchange; its spans' page keys are exactly
    the inner generation's: prompt spans, and the final span extended by the output."""
    inner = dataclasses.replace(inner, seed=1)
    outer = dataclasses.replace(outer_shape, input=A.Cross((A.system("judge"), inner, A.user("pick"))))
    q = P.prepare(outer)
    wave = P.ready(q)
    assert len(wave) == 1
    (ig,) = wave
    inner_plan = lower(ig, TOK, page_size=ps)
    gen = tuple(generated)
    q = P.substitute(q, {ig: P.GenResult("text", gen)})
    (root,) = P.ready(q)
    outer_plan = lower(root, TOK, page_size=ps)
    outer_keys = {k for s in outer_plan.spans for k in s.page_keys}
    for s in inner_plan.spans[:-1]:
        assert set(s.page_keys) <= outer_keys
    assert set(inner_plan.sequence_page_keys(gen)) <= outer_keys


@settings(max_examples=60, deadline=None)
@given(gs(prompts(max_leaves=6)), prompts(max_leaves=6), st.booleans(), page_sizes)
def test_known_prefix_is_the_head_of_the_plan_after_substitution(inner, front, in_plus, ps):
    """The spans a waiting g's prompt lowers to before its inner g are exactly the first spans
    of its plan once the inner g is substituted (tokens, positions, visibility, keys)."""
    inner = dataclasses.replace(inner, seed=1)
    middle = A.Plus((inner,)) if in_plus else inner
    outer = dataclasses.replace(inner, input=A.Cross((front, middle, A.user("pick"))), seed=None)
    q = P.prepare(outer)
    (waiting,) = P.evaluation_order(q)[1]
    prefix = lower_known_prefix(waiting, TOK, page_size=ps)
    (ig,) = P.ready(q)
    assert lower_known_prefix(ig, TOK, page_size=ps) is None  # ready: nothing unevaluated in it
    (root,) = P.ready(P.substitute(q, {ig: P.GenResult("text", (5, 6))}))
    full = lower(root, TOK, page_size=ps)
    if prefix is None:
        return
    assert prefix.spans == full.spans[: len(prefix.spans)]
    assert prefix.reweight == full.reweight or prefix.reweight is None


def test_known_prefix_of_a_nested_outer_g_is_its_system_prompt(tok):
    inner = [A.G("m", A.Cross((A.system("brief"), A.user(q))), max_tokens=3) for q in ("ab", "cd")]
    outer = A.G("m", A.Cross((A.system("judge them"), A.Plus(tuple(inner)), A.user("pick"))), positions="parallel")
    q = P.prepare(outer)
    (waiting,) = P.evaluation_order(q)[1]
    prefix = lower_known_prefix(waiting, tok, page_size=4)
    assert [s.token_ids for s in prefix.spans] == [tuple(tok.encode_message("system", "judge them"))]
    # a prompt that starts with the inner g has nothing known before it
    flat = P.prepare(A.G("m", A.Cross((inner[0], A.user("judge")))))
    assert lower_known_prefix(P.evaluation_order(flat)[1][0], tok, page_size=4) is None


def test_unevaluated_inner_g_is_an_error(tok):
    g = A.G("m", A.Cross((A.user("a"), A.G("m", A.user("b")))))
    with pytest.raises(SpanQueryError) as ei:
        lower(g, tok, page_size=4)
    assert ei.value.path == "$.g.input.cross[1]"


def test_cli_plan_prints(tmp_path):
    f = tmp_path / "q.sexp"
    f.write_text('(g "m" (cross (system "s") (plus (user "d1") (user "d2")) (user "q")) 8 :positions parallel)')
    r = subprocess.run(
        [sys.executable, "-m", "spanjax.cli.plan", str(f), "--fake-tokenizer", "--page-size", "4", "--mask"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "span   1 plus" in r.stdout and "sees=[0,1,2]" in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"g": {"model": "m", "input": {"plus": []}}}')
    r = subprocess.run(
        [sys.executable, "-m", "spanjax.cli.plan", str(bad), "--fake-tokenizer"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "$.g.input.plus" in r.stderr
