"""Adapters in the engine: which tokens use which adapter, and aLoRA cache keys.

An aLoRA's tokens before its invocation carry the base model's KV, so their
pages should key as base-model pages (adapter None) and hit whatever a base
query cached; the invocation and everything after it is adapted and keys
with the adapter. `lower_for_engine` lowers an aLoRA `g` with adapter=None and
`split_at_invocation` then cuts the span holding the invocation's last
occurrence in two, so no page mixes base and adapted tokens:

    [... base spans ...][span j: tokens before the invocation | base keys]
                        [span j': invocation onward           | adapter keys]
    [later spans: re-keyed with the adapter, they see adapted KV]

The cut adds at most one partially filled page; positions are unchanged, so
the computation is exactly the unsplit one. A LoRA adapts every token and
keeps the adapter in every key (lowered as before).
"""

from __future__ import annotations

import dataclasses

from spanjax.adapters import Adapter, invocation_start
from spanjax.query import ast as A
from spanjax.query.lower import lower, lower_known_prefix
from spanjax.query.page_keys import chain_page_keys, digest, root_key
from spanjax.query.plan import Span, SpanPlan


class AdapterError(ValueError):
    """A g names an adapter the engine does not have, or its prompt lacks the invocation."""


def _locate(plan: SpanPlan, invocation) -> tuple[int, int]:
    """(span index, offset) of the last occurrence of `invocation` in the prompt (spans in order)."""
    flat, owner = [], []
    for s in plan.spans:
        flat.extend(s.token_ids)
        owner.extend((s.index, i) for i in range(len(s)))
    start = invocation_start(flat, invocation)
    if start is None:
        raise AdapterError(
            f"the prompt does not contain the aLoRA invocation sequence of adapter {plan.adapter!r} "
            f"({len(invocation)} tokens); end the prompt with the invocation message"
        )
    j, off = owner[start]
    end_j, _ = owner[start + len(invocation) - 1]
    if end_j != j:
        raise AdapterError("the aLoRA invocation sequence straddles two spans; put it in one message")
    return j, off


def split_at_invocation(plan: SpanPlan, adapter_name: str, invocation) -> tuple[SpanPlan, int]:
    """The plan with base keys before the invocation and adapter keys from it on, and the
    index of the first adapted span (every span from it on is adapted)."""
    j, off = _locate(plan, invocation)
    ps, model = plan.page_size, plan.model
    pages = lambda n: -(-n // ps)  # noqa: E731
    old = plan.spans
    new: list[Span] = list(old[:j])
    remap = {i: i for i in range(j)}
    span = old[j]
    if off > 0:
        a = dataclasses.replace(
            span,
            token_ids=span.token_ids[:off],
            positions=span.positions[:off],
            page_keys=chain_page_keys(span.base_key, span.token_ids[:off], ps),
        )
        new.append(a)
        first, sees_extra, ctx = j + 1, (j,), digest("alora", span.context_key, a.cache_key)
        start = a.start + pages(off) * ps
    else:
        first, sees_extra, ctx, start = j, (), digest("alora", span.context_key), span.start
    remap[j] = first  # later spans that saw span j see both halves (below)
    base = root_key(model, adapter_name, ctx)
    toks = span.token_ids[off:]
    b = dataclasses.replace(
        span,
        index=first,
        token_ids=toks,
        positions=span.positions[off:],
        start=start,
        sees=tuple(sorted(span.sees + sees_extra)),
        page_keys=chain_page_keys(base, toks, ps),
        context_key=ctx,
        base_key=base,
    )
    new.append(b)
    shift = first - j
    offset = b.start + pages(len(toks)) * ps
    for s in old[j + 1 :]:
        sees = set()
        for d in s.sees:
            sees.add(d if d < j else d + shift)
            if d == j and off > 0:
                sees.add(j)
        base = root_key(model, adapter_name, digest("alora-after", s.context_key, b.cache_key))
        new.append(
            dataclasses.replace(
                s,
                index=s.index + shift,
                start=offset,
                sees=tuple(sorted(sees)),
                page_keys=chain_page_keys(base, s.token_ids, ps),
                base_key=base,
                context_key=digest("alora-after", s.context_key, b.cache_key),
            )
        )
        offset += pages(len(s)) * ps
    out = dataclasses.replace(plan, spans=tuple(new), adapter=adapter_name)
    return out, first


def span_adapter_ids(plan: SpanPlan, adapter: Adapter | None, index: int) -> tuple[SpanPlan, tuple[int, ...] | None]:
    """(plan to run, per-span adapter index or None for a base plan).

    aLoRA plans are split here if their lowering did not already cut at the
    invocation (keys then stay whatever the lowering gave: correct, just not
    shared with base queries; use `lower_for_engine` to share)."""
    if plan.adapter is None:
        return plan, None
    if adapter is None:
        raise AdapterError(f"adapter {plan.adapter!r} is not registered with the engine (Engine.register_adapter)")
    n = len(plan.spans)
    if adapter.config.kind == "lora":
        return plan, (index,) * n
    j, off = _locate(plan, adapter.config.invocation_tokens)
    if off != 0:
        plan, j = split_at_invocation(plan, plan.adapter, adapter.config.invocation_tokens)
    return plan, tuple(index if s.index >= j else -1 for s in plan.spans)


def lower_for_engine(g: A.G, tokenizer, *, model: str, page_size: int, adapters: dict[str, Adapter]) -> SpanPlan:
    """Lower `g` for an engine holding `adapters`: an aLoRA g keys its pre-invocation pages as base."""
    if g.adapter is None:
        return lower(g, tokenizer, model=model, page_size=page_size)
    ad = adapters.get(g.adapter)
    if ad is None:
        raise AdapterError(f"g names adapter {g.adapter!r}, but the engine has {sorted(adapters) or 'none'} registered")
    if ad.config.kind == "lora":
        return lower(g, tokenizer, model=model, page_size=page_size)
    base_plan = lower(dataclasses.replace(g, adapter=None), tokenizer, model=model, page_size=page_size)
    base_plan = dataclasses.replace(base_plan, adapter=g.adapter)
    plan, _ = split_at_invocation(base_plan, g.adapter, ad.config.invocation_tokens)
    return plan


def known_prefix_for_engine(
    g: A.G, tokenizer, *, model: str, page_size: int, adapters: dict[str, Adapter]
) -> SpanPlan | None:
    """The spans of a waiting `g`'s prompt before its first unevaluated inner g, keyed as
    `lower_for_engine` keys them (an aLoRA g's prompt before its invocation is base), to
    prefill; None when there are none or `g`'s adapter is not registered (its own wave
    reports that)."""
    if g.adapter is not None:
        ad = adapters.get(g.adapter)
        if ad is None:
            return None
        if ad.config.kind != "lora":  # aLoRA: base before the invocation (pages after one stay base, unused)
            g = dataclasses.replace(g, adapter=None)
    return lower_known_prefix(g, tokenizer, model=model, page_size=page_size)
