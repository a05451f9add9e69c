"""Optimizer passes (pure AST -> AST) and the evaluation helpers the engine calls.

Passes:
- `flatten`: cross-in-cross, seq-in-seq and plus-in-plus (same overrides) are
  merged; a one-child cross is replaced by its child. Semantics-preserving:
  lowering already treats nested cross as one run, and a plus child that is a
  plus with the same policies has children that see exactly what the outer
  children see.
- `dedup`: identical plus children are kept once (first occurrence). A plus is
  a set of commutative inputs; duplicates would encode the same KV twice.
- `expand_zip`: spnl's `zip {first, second}`, rewritten by what `second`
  evaluates to (zips nested inside are rewritten first): a list node
  L[b1, ..., bn] (cross/plus/seq/par; a repeat or map counts as the par of its
  g's) becomes L[first, b1, first, b2, ..., first, bn], or, when `first` is a
  plus P, L[plus[P's children..., b1], ..., plus[P's children..., bn]];
  anything else (a message, g, monad, print) becomes seq[first, second].
  Copying `first` costs no compute: equal g nodes are one g for
  `evaluation_order`/`substitute` (and every later pass maps equal subtrees to
  equal subtrees), so a g inside `first` runs once, as in spnl, which evaluates
  `first` once.
- `expand_bulk`: `repeat {n, g}` -> n sibling g's with seeds `s + i`
  (i = 0..n-1, s = the g's seed or 0); spnl's `map {metadata, inputs}` -> one
  g per input string (input `user(text)`, settings from metadata), all with the
  metadata's seed unchanged: the inputs differ, so the prompts do (equal
  inputs are equal g's, run once, like equal g's anywhere; with the same seed
  and prompt they would generate the same text anyway). The g's are spliced
  into the enclosing cross/plus/seq/par; elsewhere (a g input, a monad) they
  become a plus; a top-level repeat/map becomes a par (its value is the list
  of generated texts).
- `expand` = expand_bulk(expand_zip(q)): the rewrites every query needs before
  evaluation (`expand_repeat` is its old name, kept for callers).
- `hoist`: every inner g whose value feeds an outer prompt is rewritten into
  its *exchange*, `cross[<inner input>, <inner g>]`, as a child of a plus with
  `attention: isolated` (the enclosing plus itself when all its children are
  g's, e.g. spnl's judge shape; otherwise a one-child isolated plus). After
  evaluation the g becomes `assistant(text, token_ids)`, so the exchange
  lowers to exactly the inner generation's own sequence (its prompt lowered
  alone, then `generation_prefix_ids()`, then the generated ids) and its pages
  hit the cache entries that generation left. Plus nodes inside the copied
  input get the inner g's policies pinned, so they lower as they did there.

`expand` first checks the size of the expanded tree (validate.check_generations:
MAX_GENERATIONS g's and MAX_EXPANDED_NODES nodes, counted without expanding) so
that nested repeats and zips cannot blow up the tree.

`prepare(q)` = expand (zip, then repeat/map) -> flatten -> dedup -> hoist (run once).

`prints(q)`: the messages of the query's `print` nodes, in the order spnl's
executor prints them (see its docstring); the engine logs them.

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


# ---------------------------------------------------------------------------- expand_zip
def expand_zip(q: A.Query) -> A.Query:
    """Rewrite every zip (see the module docstring). Repeats and maps elsewhere stay."""
    check_generations(q)  # bounds the copies before making them
    return _expand_zip(q)


def _expand_zip(q: A.Query) -> A.Query:
    q = _map(q, _expand_zip)  # a nested zip (in first or second) is rewritten first
    if not isinstance(q, A.Zip):
        return q
    first, second = q.first, q.second
    if isinstance(second, (A.Repeat, A.Map)):
        second = A.Par(bulk_siblings(second))
    if isinstance(second, A.LIST_NODES):
        # `first` is repeated by reference: equal g's inside it are evaluated once.
        if isinstance(first, A.Plus):
            items = tuple(dataclasses.replace(first, children=first.children + (b,)) for b in second.children)
        else:
            items = tuple(x for b in second.children for x in (first, b))
        return dataclasses.replace(second, children=items)
    return A.Seq((first, second))


# --------------------------------------------------------------------------- expand_bulk
def repeat_siblings(r: A.Repeat) -> tuple[A.G, ...]:
    base = r.query.seed or 0
    g = _expand_bulk(r.query, True)
    return tuple(dataclasses.replace(g, seed=base + i) for i in range(r.n))


def bulk_siblings(q: A.Repeat | A.Map) -> tuple[A.G, ...]:
    """The g's a repeat or a map expands to (a map's g's share its seed: their inputs differ)."""
    return repeat_siblings(q) if isinstance(q, A.Repeat) else q.generations()


def expand_bulk(q: A.Query, top: bool = True) -> A.Query:
    """Expand every repeat and map (see the module docstring)."""
    # Checked before expanding: ASTs built in Python skip validation's check.
    check_generations(q)
    return _expand_bulk(q, top)


def _expand_bulk(q: A.Query, top: bool) -> A.Query:
    if isinstance(q, (A.Repeat, A.Map)):
        gs = bulk_siblings(q)
        return A.Par(gs) if top else A.Plus(gs)
    if isinstance(q, A.LIST_NODES):
        kids = []
        for c in q.children:
            kids.extend(bulk_siblings(c) if isinstance(c, (A.Repeat, A.Map)) else (_expand_bulk(c, False),))
        return dataclasses.replace(q, children=tuple(kids))
    return _map(q, lambda c: _expand_bulk(c, False))


def expand(q: A.Query) -> A.Query:
    """expand_zip, then expand_bulk: afterwards only g, cross, plus, seq, par, messages,
    monad and print remain."""
    check_generations(q)
    return _expand_bulk(_expand_zip(q), True)


# The old name (spanjax/cli/plan.py calls it for --no-optimize); it expands zip and map too.
expand_repeat = expand


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
    return hoist(dedup(flatten(expand(q))))


# --------------------------------------------------------------------------------- print
def prints(q: A.Query) -> list[str]:
    """The message of every `print` node of `q`, in the order spnl's executor prints them:
    document order (a g's prompt before the g, the children of seq/cross/plus/par in
    order, a zip's first before its second). Print values are constants, so the
    executor can log them all when it starts the query (par children run
    concurrently in spnl, so their prints have no fixed order there anyway).

    Call it on the parsed query, before `prepare`: then each print written in the query
    is listed once. On a prepared query, the copies that zip and repeat expansion made
    (of a zip's `first`, of a repeated g's prompt) are listed once per copy.
    """
    return [n.message for n in A.walk(q) if isinstance(n, A.Print)]


# ---------------------------------------------------------------------- evaluation order
# The walks below visit each distinct node object once (memoized by id): expansion and
# hoisting share subtrees (a zip's `first`, an inner g's prompt in its exchange), so the
# tree can be far larger than the objects in it (validate.MAX_EXPANDED_NODES bounds it).
def evaluation_order(q: A.Query) -> list[list[A.G]]:
    """Every g of `q` grouped into waves: a g comes after the g's inside its input
    (they feed its prompt) and after every g of earlier `seq` children (seq runs in
    order); g's in one wave are independent and can share an engine batch. Equal
    g nodes appear once. `repeat`, `map` and `zip` must be expanded first (see `prepare`)."""
    by_id: dict[int, tuple[A.G, int]] = {}  # each g object's wave (equal objects merged below)
    memo: dict[tuple[int, int], int] = {}

    def visit(node, floor) -> int:
        """Record the g's under `node`, none before wave `floor`; return 1 + last wave used."""
        key = (id(node), floor)
        if key not in memo:
            memo[key] = _visit(node, floor)
        return memo[key]

    def _visit(node, floor) -> int:
        if isinstance(node, (A.Repeat, A.Map, A.Zip)):
            what = f"an unexpanded {type(node).__name__.lower()}"
            raise SpanQueryError("$", what, "passes.expand/prepare before evaluation_order")
        if isinstance(node, A.G):
            w = max(floor, visit(node.input, floor))
            prev = by_id.get(id(node))
            by_id[id(node)] = (node, w if prev is None else max(prev[1], w))
            return w + 1
        if isinstance(node, A.Seq):
            end = floor
            for c in node.children:
                end = max(end, visit(c, end))
            return end
        return max([floor] + [visit(c, floor) for c in A.children(node)])

    visit(q, 0)
    waves: dict[A.G, int] = {}
    for g, w in by_id.values():
        waves[g] = max(waves.get(g, 0), w)
    out: list[list[A.G]] = [[] for _ in range(max(waves.values(), default=-1) + 1)]
    for g, w in waves.items():
        out[w].append(g)
    return [w for w in out if w]


def feeds_a_prompt(q: A.Query) -> set[A.G]:
    """The g's inside another g's input: their exchange is re-sent in that g's prompt, so the
    engine keeps all of it cached for it (`Engine.submit(..., write_final_token=True)`)."""
    fed: dict[int, A.G] = {}
    seen: set[tuple[int, bool]] = set()

    def visit(node, inside: bool) -> None:
        if (id(node), inside) in seen:
            return
        seen.add((id(node), inside))
        if isinstance(node, A.G):
            if inside:
                fed[id(node)] = node
            visit(node.input, True)
            return
        for c in A.children(node):
            visit(c, inside)

    visit(q, False)
    return set(fed.values())


def ready(q: A.Query) -> list[A.G]:
    """The g's that can run now (the first wave), or [] when everything is evaluated."""
    order = evaluation_order(q)
    return order[0] if order else []


def substitute(q: A.Query, results: Mapping[A.G, GenResult | str]) -> A.Query:
    """Replace every evaluated g (by equality) with `assistant(text, token_ids)`."""
    memo: dict[int, A.Query] = {}

    def sub(node: A.Query) -> A.Query:
        out = memo.get(id(node))
        if out is None:
            out = memo[id(node)] = _sub(node)
        return out

    def _sub(node: A.Query) -> A.Query:
        if isinstance(node, A.G) and node in results:
            r = results[node]
            if isinstance(r, str):
                return A.Message("assistant", r)
            return A.Message("assistant", r.text, tuple(r.token_ids))
        return _map(node, sub)

    return sub(q)


def value(q: A.Query):
    """Value of a fully evaluated query: a message's text; par -> list; seq -> its
    last child's value; monad/print -> ''; cross/plus -> list of child values."""
    if isinstance(q, (A.G, A.Repeat, A.Map, A.Zip)):
        what = "an unevaluated g" if isinstance(q, A.G) else f"an unexpanded {type(q).__name__.lower()}"
        raise SpanQueryError("$", what, "a fully substituted query")
    if isinstance(q, A.Message):
        return q.content
    if isinstance(q, (A.Monad, A.Print)):
        return ""
    if isinstance(q, A.Seq):
        return value(q.children[-1])
    return [value(c) for c in q.children]
