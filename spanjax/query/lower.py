"""Lowering of a g's prompt to a `SpanPlan` (docs/design.md §2-§5).

Spans
-----
The prompt tree is walked in order. Consecutive messages of one cross run
(cross, seq and par all read as ordered content; monad and print contribute
no tokens) pack densely into one span, each message via
`tokenizer.encode_message(role, content)`; an assistant message that carries
`token_ids` (an evaluated inner g, see passes.substitute) lowers to
`generation_prefix_ids() + token_ids` (ids outside the tokenizer's
`vocab_size`, when it has one, are a SpanQueryError). Each child of a plus lowers
recursively, starting a new span; a child that is itself a cross containing a
plus lowers to several spans. Children that produce no tokens (a monad, a
print) are dropped. Messages with empty content are allowed: the chat
template still produces tokens. The prompt's trailing run plus
`generation_prefix_ids()` is always the final `cross` span; it sees every
other span, and generated tokens continue it at the following positions.

Every span starts on a page boundary: `start` is the offset in the padded
sequence, the previous span padded with masked padding up to the next multiple
of `page_size`.

Visibility (`Span.sees`): a cross run sees every span before it in its scope;
a plus child under `prefix` sees what the plus sees, under `isolated` nothing
outside itself; inside a child, later runs also see the child's earlier spans.
Siblings never see each other; what follows a plus sees all of its children.

Positions: `sequential` gives each token its offset among the real tokens of
the flattened prompt; `parallel` starts every child of a plus at the same
position (the end of its prefix) and what follows the plus after the longest
child. The policies come from the g (`attention`, `positions`; defaults
prefix/sequential); a plus may override them for its own children (an
extension; the override is not inherited by plus nodes nested inside).

Recompute (`g.recompute_pages` = R > 0; EPIC, arXiv 2410.15332, and vLLM's span-aware gap
policy): the first R pages of every single-span plus child are encoded a second time
against the context the query actually gives them (what precedes the plus and the
earlier children, in order: an order-dependent key); what follows the plus sees that copy
and the child's cached tail, not its independent head. The tail keeps its cached KV and
page keys (it still sees the independent head it was encoded with), so reuse is unchanged
and the cost is R pages per child. See `_Lowerer.recompute_head`.

Re-weighting (`g.reweight` = (scale, bias); APE, arXiv 2502.05431): a non-plus span (the
final cross span, a cross run after a plus) attends to the keys of plus children with logits
scale * logit + bias; everything else attends as usual (`SpanPlan.logit_weight`). Such a span's
context key gains a ("reweight", scale, bias) group: its KV from layer 1 on depends on the
weights, and so does the KV of every span that sees it (its key chains from this one). Plus
children keep their keys, so documents are shared with queries that re-weight differently or
not at all. The identity (1, 0) is no re-weighting (same plan, same keys).

Known prefix (`lower_known_prefix`): the spans a g's prompt lowers to, whole, before its first
unevaluated inner g. Their tokens, positions, visibility and keys are those of the full
plan's (lowering is a walk in order, and a key chains only what comes before), so encoding
them while the inner g's generate (a prefill request, executor.QueryEvaluation.submit) leaves
exactly the pages the full plan looks up. The run that reaches the g is left out even where
its first pages are known: for a hoisted exchange they are the inner g's own prompt, which
that g is computing in the same wave.

Cache keys: see page_keys.py.

Reuse is exact when the cached pre-RoPE KV depends only on what the key
covers: for `isolated` spans (any position policy; only relative positions
inside the span's own child matter) and for `prefix` spans under `parallel`
positions (their offset from the prefix is fixed by the prefix). A `prefix`
span under `sequential` positions is reused at a shifted offset: its offset
depends on the lengths of unseen siblings before it, which the key ignores
(an approximation, as in spnl's vLLM patch). The adapter is always in the
key, which is conservative for aLoRA (tokens before its invocation carry base
KV but are not shared with base-model entries).

Inner generations (hoisting): the sequence an inner g runs as is its plan
(its prompt lowered alone with the same model, adapter and page size), the
last span extended by the generated ids; `SpanPlan.sequence_page_keys(ids)`
gives that extended span's page keys, which equal the page keys of the
exchange span an outer query re-sends (`cross[input..., assistant(ids)]`
under an isolated plus) for every full page and for the last page when it
covers exactly the same tokens.
"""

from __future__ import annotations

import dataclasses

from spanjax.query import ast as A
from spanjax.query.errors import SpanQueryError, describe
from spanjax.query.page_keys import chain_page_keys, context_key, digest, root_key
from spanjax.query.plan import Span, SpanPlan
from spanjax.query.validate import child_path


class _Unevaluated(Exception):
    """Raised by a known-prefix walk at the first unevaluated inner g."""


@dataclasses.dataclass(frozen=True)
class _Ctx:
    groups: tuple  # what a new span in this scope sees, as hashable key groups
    sees: tuple[int, ...]  # span indices behind those groups
    pos: int  # next logical position


class _Lowerer:
    def __init__(self, tokenizer, model, adapter, page_size, attention, positions, recompute_pages=0, reweight=None):
        self.tok = tokenizer
        self.reweight = reweight  # (scale, bias) or None
        self.model, self.adapter, self.page_size = model, adapter, page_size
        self.attention, self.positions = attention, positions
        self.recompute = recompute_pages * page_size  # tokens at the head of each plus child
        self.known_prefix = False  # stop at the first unevaluated g (lower_known_prefix)
        self.spans: list[Span] = []
        self.offset = 0  # padded offset of the next span
        # spanjax.tokenizer.Tokenizer and fake.ByteTokenizer have `vocab_size`; test fakes may not.
        self.vocab_size = getattr(tokenizer, "vocab_size", None)

    def emit(self, kind, tokens, ctx: _Ctx) -> _Ctx:
        if not tokens:
            return ctx
        groups = ctx.groups
        if self.reweight is not None and kind != "plus" and any(self.spans[i].kind == "plus" for i in ctx.sees):
            # Its queries attend to the plus children re-weighted, so its KV (from layer 1 on) and
            # everything that sees it depend on the weights: key them in (the children keep theirs).
            groups = groups + (("reweight", *self.reweight),)
        ckey = context_key(groups)
        base = root_key(self.model, self.adapter, ckey)
        keys = chain_page_keys(base, tokens, self.page_size)
        span = Span(
            index=len(self.spans),
            kind=kind,
            token_ids=tuple(tokens),
            start=self.offset,
            positions=tuple(range(ctx.pos, ctx.pos + len(tokens))),
            sees=tuple(sorted(ctx.sees)),
            page_keys=keys,
            context_key=ckey,
            base_key=base,
        )
        self.spans.append(span)
        self.offset += -(-len(tokens) // self.page_size) * self.page_size
        return _Ctx(ctx.groups + (("run", span.cache_key),), ctx.sees + (span.index,), ctx.pos + len(tokens))

    def message_ids(self, m: A.Message, path) -> list[int]:
        if m.token_ids is not None:
            self.check_ids(m.token_ids, child_path(child_path(path, m.role), "token_ids"))
            return list(self.tok.generation_prefix_ids()) + list(m.token_ids)
        return list(self.tok.encode_message(m.role, m.content))

    def check_ids(self, ids, path):
        """Client-supplied ids must be in the vocabulary: out-of-range ids would run
        silently (or crash the engine) rather than fail here, before compute."""
        if self.vocab_size is None:
            return  # the tokenizer does not say its size: nothing to check against
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise SpanQueryError(
                    child_path(path, i), describe(t), f"a token id in 0..{self.vocab_size - 1} (the vocabulary)"
                )

    def items(self, node, path):
        """Ordered content of a cross-like node: messages and plus nodes (with paths)."""
        stack = [(node, path)]
        while stack:
            n, p = stack.pop()
            if isinstance(n, (A.Message, A.Plus)):
                yield n, p
            elif isinstance(n, (A.Cross, A.Seq, A.Par)):
                tag = type(n).__name__.lower()
                stack.extend(reversed([(c, child_path(child_path(p, tag), i)) for i, c in enumerate(n.children)]))
            elif isinstance(n, (A.Monad, A.Print)):
                continue
            elif isinstance(n, A.G):
                if self.known_prefix:
                    raise _Unevaluated
                raise SpanQueryError(
                    p, "an unevaluated inner g", "its result substituted first (passes.ready/substitute)"
                )
            elif isinstance(n, (A.Repeat, A.Map, A.Zip)):
                what = f"an unexpanded {type(n).__name__.lower()}"
                raise SpanQueryError(p, what, "passes.prepare/expand before lowering")
            else:
                raise SpanQueryError(p, type(n).__name__, "a query node")

    def run(self, node, ctx: _Ctx, kind, path, suffix=None) -> _Ctx:
        buf: list[int] = []
        for item, p in self.items(node, path):
            if isinstance(item, A.Message):
                buf.extend(self.message_ids(item, p))
            else:
                ctx = self.emit(kind, buf, dataclasses.replace(ctx))
                buf = []
                ctx = self.plus(item, ctx, p)
        if suffix is not None:
            buf.extend(suffix)
        return self.emit(kind, buf, ctx)

    def plus(self, node: A.Plus, ctx: _Ctx, path) -> _Ctx:
        att = node.attention or self.attention
        par = (node.positions or self.positions) == "parallel"
        # A prefix child's KV depends on its offset from the prefix, which the
        # position policy decides: key the two policies apart so a parallel
        # query never reuses (inexact) pages encoded under sequential positions.
        policy = ("plus-child", "parallel" if par else "sequential")
        base = _Ctx(ctx.groups + (policy,), ctx.sees, ctx.pos) if att == "prefix" else _Ctx((), (), ctx.pos)
        descs, sees, cur, end = [], [], ctx.pos, ctx.pos
        ppath = child_path(path, "plus")
        for i, child in enumerate(node.children):
            start = ctx.pos if par else cur
            n0 = len(self.spans)
            out = self.run(child, _Ctx(base.groups, base.sees, start), "plus", child_path(ppath, i))
            own = out.groups[len(base.groups) :]
            if not own:
                continue  # a child with no tokens (monad, print)
            visible = list(range(n0, len(self.spans)))
            if self.recompute and len(visible) == 1:  # one span: a document (nested pluses are left alone)
                visible, own = self.recompute_head(n0, ctx, descs, sees, own)
            descs.append(digest("child", list(own)))
            sees.extend(visible)
            cur, end = out.pos, max(end, out.pos)
        if not descs:
            return ctx
        # Parallel: the children as a set, so what follows keys the same in any order
        # (its KV is the same: every child sits at the same offset). Sequential: in
        # order, since permuting moves the children's positions relative to what
        # follows; the question after them is recomputed rather than reused inexactly.
        group = ("plus", "parallel", sorted(descs)) if par else ("plus", "sequential", descs)
        return _Ctx(ctx.groups + (group,), ctx.sees + tuple(sees), end if par else cur)

    def recompute_head(self, n0: int, ctx: _Ctx, earlier: list, earlier_sees: list, own: tuple):
        """EPIC-style recompute of plus child span `n0`: its first `self.recompute` tokens are
        encoded again against the context the query gives them (what precedes the plus and the
        earlier children, in order), and what follows the plus sees that copy instead of the
        independent one; the rest of the child (the tail) stays the independently encoded,
        cached span, which still sees its own independent head (the KV it was cached with).

            before: [child: head | tail]                         later spans see child
            after:  [head (indep.)][tail, sees head][head', in context]   later see tail, head'

        Returns (the spans later spans see, the child's key groups)."""
        f, ps = self.spans[n0], self.page_size
        n = min(self.recompute, len(f))
        actual_sees = tuple(sorted(ctx.sees + tuple(earlier_sees)))
        ckey = context_key(ctx.groups + (("recompute", list(earlier)),))  # order-dependent, as its KV
        root = root_key(self.model, self.adapter, ckey)
        if n == len(f):  # the whole child is the head: encode it in context, nothing to reuse
            self.spans[n0] = dataclasses.replace(
                f, sees=actual_sees, page_keys=chain_page_keys(root, f.token_ids, ps), context_key=ckey, base_key=root
            )
            return [n0], (("recompute", self.spans[n0].cache_key),)
        k = n // ps  # n is a whole number of pages: the split keeps every page key
        head = dataclasses.replace(f, token_ids=f.token_ids[:n], positions=f.positions[:n], page_keys=f.page_keys[:k])
        tail = dataclasses.replace(
            f,
            index=n0 + 1,
            token_ids=f.token_ids[n:],
            start=f.start + n,
            positions=f.positions[n:],
            sees=tuple(sorted(f.sees + (n0,))),
            page_keys=f.page_keys[k:],
            base_key=head.cache_key,
        )
        again = Span(
            index=n0 + 2,
            kind="plus",
            token_ids=head.token_ids,
            start=self.offset,
            positions=head.positions,
            sees=actual_sees,
            page_keys=chain_page_keys(root, head.token_ids, ps),
            context_key=ckey,
            base_key=root,
        )
        self.spans[n0:] = [head, tail, again]
        self.offset += n
        return [n0 + 1, n0 + 2], own + (("recompute", again.cache_key),)


def _lowerer(g: A.G, tokenizer, model: str | None, page_size: int, adapter: str | None) -> _Lowerer:
    if not isinstance(g, A.G):
        raise SpanQueryError("$", type(g).__name__, "a g node to lower")
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    model = g.model if model is None else model
    adapter = g.adapter if adapter is None else adapter
    reweight = None if g.reweight in (None, (1.0, 0.0)) else tuple(map(float, g.reweight))  # identity: none
    return _Lowerer(tokenizer, model, adapter, page_size, g.attention, g.positions, g.recompute_pages, reweight)


def _plan(low: _Lowerer, g: A.G) -> SpanPlan:
    spans = low.spans
    reweight = low.reweight
    if not any(s.kind != "plus" and any(spans[d].kind == "plus" for d in s.sees) for s in spans):
        reweight = None  # no span attends to a plus child from outside: nothing to re-weight
    return SpanPlan(
        spans=tuple(spans),
        page_size=low.page_size,
        model=low.model,
        adapter=low.adapter,
        attention_policy=g.attention,
        position_policy=g.positions,
        reweight=reweight,
    )


def lower_known_prefix(
    g: A.G, tokenizer, *, model: str | None = None, page_size: int, adapter: str | None = None
) -> SpanPlan | None:
    """The spans of `g`'s plan that precede its first unevaluated inner g (see the module
    doc), as a plan to prefill; None when nothing whole precedes it or no inner g is left
    (the g is then ready and lowers whole)."""
    low = _lowerer(g, tokenizer, model, page_size, adapter)
    low.known_prefix = True
    try:
        low.run(g.input, _Ctx((), (), 0), "cross", "$.g.input", suffix=[])
    except _Unevaluated:
        return _plan(low, g) if low.spans else None
    return None


def lower(g: A.G, tokenizer, *, model: str | None = None, page_size: int, adapter: str | None = None) -> SpanPlan:
    """Lower the prompt of `g` (inner g's already substituted) to a SpanPlan.

    `model` names the weights in every cache key (default: `g.model`); `adapter`
    defaults to `g.adapter`. The tokenizer needs `encode_message(role, content)`,
    `generation_prefix_ids()` and `encode(text)`.
    """
    low = _lowerer(g, tokenizer, model, page_size, adapter)
    gen = list(tokenizer.generation_prefix_ids())
    if not gen:
        gen = []
    low.run(g.input, _Ctx((), (), 0), "cross", "$.g.input", suffix=gen)
    spans = low.spans
    last = spans[-1] if spans else None
    if last is None or last.kind != "cross":
        # Prompt ends in a plus and the tokenizer has no generation prefix: nothing
        # would continue the plan; every real chat template has an assistant header.
        raise SpanQueryError(
            "$.g.input",
            "a prompt whose final cross span is empty",
            "a tokenizer with a generation prefix or a trailing message",
        )
    return _plan(low, g)
