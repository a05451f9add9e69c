"""Shared fixtures for the query tests: a tiny fake tokenizer and AST strategies."""

from __future__ import annotations

from hypothesis import strategies as st

from spanjax.query import ast as A


class TinyTokenizer:
    """Char-level fake with the lowering interface (independent of spanjax.tokenizer)."""

    ROLE = {"system": 1000, "user": 1001, "assistant": 1002}
    END = 1003

    def encode(self, text):
        return [ord(c) % 997 for c in text]

    def encode_message(self, role, content):
        return [self.ROLE[role]] + self.encode(content) + [self.END]

    def generation_prefix_ids(self):
        return [self.ROLE["assistant"], 7]


# --- strategies ---------------------------------------------------------------------
short_text = st.text(alphabet="abcdefgh xyz", max_size=6)
any_text = st.text(max_size=12)
roles = st.sampled_from(A.ROLES)
att = st.sampled_from(A.ATTENTION_POLICIES)
pos = st.sampled_from(A.POSITION_POLICIES)


def messages(text=short_text):
    return st.builds(A.Message, roles, text)


def prompts(text=short_text, max_leaves=14):
    """Prompt trees with no g (what lowering sees after substitution)."""
    leaf = st.one_of(
        messages(text),
        messages(text),
        messages(text),
        st.builds(A.Print, text),
        st.builds(A.Monad, messages(text)),
    )

    def extend(sub):
        kids = st.lists(sub, min_size=1, max_size=4).map(tuple)
        return st.one_of(
            st.builds(A.Cross, kids),
            st.builds(A.Seq, kids),
            st.builds(A.Plus, kids, st.none() | att, st.none() | pos),
            st.builds(A.Plus, kids),
        )

    return st.recursive(leaf, extend, max_leaves=max_leaves)


def gs(inp, model=None):
    return st.builds(A.G, st.just("m") if model is None else model, inp, attention=att, positions=pos)


def full_queries(max_leaves=10):
    """Any AST (for printer/parser round trips): every node kind and option."""
    text = any_text
    floats = st.floats(min_value=0, max_value=5, allow_nan=False)
    msg = st.one_of(
        messages(text),
        st.builds(A.Message, st.just("assistant"), text, st.lists(st.integers(0, 5000), max_size=4).map(tuple)),
    )

    def g_of(sub):
        return st.builds(
            A.G,
            st.text(min_size=1, max_size=8),
            sub,
            max_tokens=st.none() | st.integers(1, 4096),
            temperature=st.none() | floats,
            top_p=st.none() | st.floats(min_value=0.01, max_value=1.0),
            seed=st.none() | st.integers(0, 2**40),
            stop=st.lists(st.text(min_size=1, max_size=4), max_size=2).map(tuple),
            adapter=st.none() | st.text(min_size=1, max_size=5),
            attention=att,
            positions=pos,
            recompute_pages=st.integers(0, 3),
            reweight=st.none()
            | st.tuples(st.floats(min_value=0.01, max_value=10), st.floats(min_value=-5, max_value=5)),
        )

    # spnl's map: the template's input is a placeholder (normalized to A.MAP_INPUT).
    maps = st.builds(A.Map, st.lists(text, min_size=1, max_size=3).map(tuple), g_of(st.just(A.MAP_INPUT)))
    leaf = st.one_of(msg, st.builds(A.Print, text), maps)

    def extend(sub):
        kids = st.lists(sub, min_size=1, max_size=3).map(tuple)
        return st.one_of(
            st.builds(A.Cross, kids),
            st.builds(A.Seq, kids),
            st.builds(A.Par, kids),
            st.builds(A.Plus, kids, st.none() | att, st.none() | pos),
            st.builds(A.Monad, sub),
            g_of(sub),
            st.builds(A.Repeat, st.integers(1, 5), g_of(sub)),
            st.builds(A.Zip, sub, sub),
        )

    return st.recursive(leaf, extend, max_leaves=max_leaves)
