"""Optimizer passes (pure AST -> AST) and the evaluation helpers the engine calls.

Passes:
- `flatten`: cross-in-cross, seq-in-seq and plus-in-plus (same overrides) are
  merged; a one-child cross is replaced by its child. Semantics-preserving:
  lowering already treats nested cross as one run, and a plus child that is a
  plus with the same policies has children that see exactly what the outer
  children see.
- `dedup`: identical plus children are kept once (first occurrence). A plus is
  a set of commutative inputs; duplicates would encode the same KV twice.
- `expand_repeat`: `repeat {n, g}` -> n sibling g's with seeds `s + i`
  (i = 0..n-1, s = the g's seed or 0), spliced into the enclosing
  cross/plus/seq/par; elsewhere (a g input, a monad) they become a plus; a
  top-level repeat becomes a par.
- `hoist`: every inner g whose value feeds an outer prompt is rewritten into
  its *exchange*, `cross[<inner input>, <inner g>]`, as a child of a plus with
  `attention: isolated` (the enclosing plus itself when all its children are
  g's, e.g. spnl's judge shape; otherwise a one-child isolated plus). After
  evaluation the g becomes `assistant(text, token_ids)`, so the exchange
  lowers to exactly the inner generation's own sequence (its prompt lowered
  alone, then `generation_prefix_ids()`, then the generated ids) and its pages
  hit the cache entries that generation left. Plus nodes inside the copied
  input get the inner g's policies pinned, so they lower as they did there.

`expand_repeat` first checks the total number of g's (validate.MAX_GENERATIONS,
repeats multiplied out) so that nested repeats cannot blow up the tree.

`prepare(q)` = expand_repeat -> flatten -> dedup -> hoist (run once).

Evaluation loop (docs/design.md §1) the engine runs:

    q = prepare(parse(text))
    while (wave := ready(q)):                      # independent g's: one engine batch
        plans = [lower(g, tokenizer, model=..., page_size=...) for g in wave]
        results = engine.generate(plans)           # GenResult(text, token_ids) per g
        q = substitute(q, dict(zip(wave, results)))
    answer = value(q)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from spanjax.query import ast as A
from spanjax.query.errors import SpanQueryError
from spanjax.query.validate import check_generations


@dataclasses.dataclass(frozen=True)
class GenResult:
    """Output of one evaluated g: its text and the exact ids it generated."""

    text: str
    token_ids: tuple[int, ...] = ()


def _map(q: A.Query, f) -> A.Query:
    kids = A.children(q)
    if not kids:
        return q
    new = tuple(f(c) for c in kids)
    return q if new == kids else A.with_children(q, new)


# ------------------------------------------------------------------------------- flatten
def flatten(q: A.Query) -> A.Query:
    q = _map(q, flatten)
    if isinstance(q, (A.Cross, A.Seq)):
        kids = []
        for c in q.children:
            kids.extend(c.children if type(c) is type(q) else (c,))
        if isinstance(q, A.Cross) and len(kids) == 1:
            return kids[0]
        return dataclasses.replace(q, children=tuple(kids))
    if isinstance(q, A.Plus):
        kids = []
        for c in q.children:
            same = isinstance(c, A.Plus) and (c.attention, c.positions) == (q.attention, q.positions)
            kids.extend(c.children if same else (c,))
        return dataclasses.replace(q, children=tuple(kids))
    return q


# --------------------------------------------------------------------------------- dedup
def dedup(q: A.Query) -> A.Query:
    q = _map(q, dedup)
    if isinstance(q, A.Plus):
        seen, kids = set(), []
        for c in q.children:
            if c not in seen:
                seen.add(c)
                kids.append(c)
        return dataclasses.replace(q, children=tuple(kids))
    return q


# ------------------------------------------------------------------------- expand_repeat
def repeat_siblings(r: A.Repeat) -> tuple[A.G, ...]:
    base = r.query.seed or 0
    g = _expand_repeat(r.query, True)
    return tuple(dataclasses.replace(g, seed=base + i) for i in range(r.n))


def expand_repeat(q: A.Query, top: bool = True) -> A.Query:
    # Checked before expanding: ASTs built in Python skip validation's check.
    check_generations(q)
    return _expand_repeat(q, top)


def _expand_repeat(q: A.Query, top: bool) -> A.Query:
    if isinstance(q, A.Repeat):
        gs = repeat_siblings(q)
        return A.Par(gs) if top else A.Plus(gs)
    if isinstance(q, A.LIST_NODES):
        kids = []
        for c in q.children:
            kids.extend(repeat_siblings(c) if isinstance(c, A.Repeat) else (_expand_repeat(c, False),))
        return dataclasses.replace(q, children=tuple(kids))
    return _map(q, lambda c: _expand_repeat(c, False))


# --------------------------------------------------------------------------------- hoist
def pin_policies(q: A.Query, attention: str, positions: str) -> A.Query:
    """Make every plus in a prompt carry explicit policies (stops at inner g's)."""
    if isinstance(q, A.G):
        return q
    q = _map(q, lambda c: pin_policies(c, attention, positions))
    if isinstance(q, A.Plus):
        return dataclasses.replace(q, attention=q.attention or attention, positions=q.positions or positions)
    return q


def exchange(g: A.G) -> A.Cross:
    """The inner exchange an outer prompt re-sends: the g's input, then its output."""
    return A.Cross((pin_policies(g.input, g.attention, g.positions), g))


def hoist(q: A.Query) -> A.Query:
    if isinstance(q, A.G):
        inner = hoist(q.input)  # inner g's first hoist their own prompts
        return dataclasses.replace(q, input=_hoist_prompt(inner))
    return _map(q, hoist)


def _hoist_prompt(q: A.Query) -> A.Query:
    if isinstance(q, A.G):
        return A.Plus((exchange(q),), attention="isolated")
    if isinstance(q, A.Plus) and all(isinstance(c, A.G) for c in q.children):
        return dataclasses.replace(q, children=tuple(exchange(c) for c in q.children), attention="isolated")
    if isinstance(q, A.Monad):  # its value is empty: nothing feeds the prompt
        return q
    return _map(q, _hoist_prompt)


def prepare(q: A.Query) -> A.Query:
    return hoist(dedup(flatten(expand_repeat(q))))


# ---------------------------------------------------------------------- evaluation order
def evaluation_order(q: A.Query) -> list[list[A.G]]:
    """Every g of `q` grouped into waves: a g comes after the g's inside its input
    (they feed its prompt) and after every g of earlier `seq` children (seq runs in
    order); g's in one wave are independent and can share an engine batch. Equal
    g nodes appear once. `repeat` must be expanded first (see `prepare`)."""
    waves: dict[A.G, int] = {}

    def visit(node, floor) -> int:
        """Record the g's under `node`, none before wave `floor`; return 1 + last wave used."""
        if isinstance(node, A.Repeat):
            raise SpanQueryError("$", "an unexpanded repeat", "expand_repeat/prepare before evaluation_order")
        if isinstance(node, A.G):
            w = max(floor, visit(node.input, floor))
            waves[node] = max(waves.get(node, 0), w)
            return w + 1
        if isinstance(node, A.Seq):
            end = floor
            for c in node.children:
                end = max(end, visit(c, end))
            return end
        return max([floor] + [visit(c, floor) for c in A.children(node)])

    visit(q, 0)
    out: list[list[A.G]] = [[] for _ in range(max(waves.values(), default=-1) + 1)]
    for g, w in waves.items():
        out[w].append(g)
    return [w for w in out if w]


def feeds_a_prompt(q: A.Query) -> set[A.G]:
    """The g's inside another g's input: their exchange is re-sent in that g's prompt, so the
    engine keeps all of it cached for it (`Engine.submit(..., write_final_token=True)`)."""
    fed: set[A.G] = set()

    def visit(node, inside: bool) -> None:
        if isinstance(node, A.G):
            if inside:
                fed.add(node)
            visit(node.input, True)
            return
        for c in A.children(node):
            visit(c, inside)

    visit(q, False)
    return fed


def ready(q: A.Query) -> list[A.G]:
    """The g's that can run now (the first wave), or [] when everything is evaluated."""
    order = evaluation_order(q)
    return order[0] if order else []


def substitute(q: A.Query, results: Mapping[A.G, GenResult | str]) -> A.Query:
    """Replace every evaluated g (by equality) with `assistant(text, token_ids)`."""
    if isinstance(q, A.G) and q in results:
        r = results[q]
        if isinstance(r, str):
            return A.Message("assistant", r)
        return A.Message("assistant", r.text, tuple(r.token_ids))
    return _map(q, lambda c: substitute(c, results))


def value(q: A.Query):
    """Value of a fully evaluated query: a message's text; par -> list; seq -> its
    last child's value; monad/print -> ''; cross/plus -> list of child values."""
    if isinstance(q, (A.G, A.Repeat)):
        raise SpanQueryError("$", "an unevaluated g", "a fully substituted query")
    if isinstance(q, A.Message):
        return q.content
    if isinstance(q, (A.Monad, A.Print)):
        return ""
    if isinstance(q, A.Seq):
        return value(q.children[-1])
    return [value(c) for c in q.children]
