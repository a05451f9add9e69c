"""Span plan: what one `g`'s prompt lowers to, and what the engine executes.

Lowering (spanjax/query/lower.py) flattens a prompt tree into spans (docs/design.md §2-§3):
a span is a maximal run of tokens that see the same context. Every span starts
on a page boundary, so a KV page belongs to exactly one span. Visibility is a
set of earlier spans; causality inside the visible set follows positions.

The last span of every plan is a `cross` span that sees every other span and
ends with the generation prefix (the assistant header), so decoding continues
it and generated tokens see the whole prompt.

`SpanPlan.reweight` (the g's `reweight`, APE-style) re-weights the attention of
non-plus spans to plus children's keys; `logit_weight` states the rule, the
scheduler writes it into the step's per-entry `block_logit_scale/bias`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from spanjax.query.page_keys import chain_page_keys

AttentionPolicy = Literal["prefix", "isolated"]
PositionPolicy = Literal["sequential", "parallel"]


@dataclasses.dataclass(frozen=True)
class Span:
    index: int  # position in SpanPlan.spans (topological: every seen span comes earlier)
    kind: Literal["cross", "plus"]  # plus = a child of a plus node
    token_ids: tuple[int, ...]  # real tokens (no padding)
    start: int  # offset in the flattened, padded sequence; multiple of page_size
    positions: tuple[int, ...]  # logical (RoPE) position of every token
    sees: tuple[int, ...]  # indices of the earlier spans this span attends to (not itself)
    page_keys: tuple[str, ...]  # content hash of every page of this span (chained; see lower.py)
    context_key: str = ""  # hash of what the span sees (see lower.py)
    base_key: str = ""  # key_{-1} of the page chain: hash(model, adapter, context_key)

    @property
    def cache_key(self) -> str:
        """Key of the whole span: the hash of its last page, which chains all of it."""
        return self.page_keys[-1]

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class SpanPlan:
    spans: tuple[Span, ...]
    page_size: int
    model: str
    adapter: str | None
    attention_policy: AttentionPolicy
    position_policy: PositionPolicy
    # (scale, bias) of the g's `reweight` (None = none): see `logit_weight`
    reweight: tuple[float, float] | None = None

    def logit_weight(self, attending: int, seen: int) -> tuple[float, float]:
        """(scale, bias) of the logits of span `attending`'s queries for the keys of span `seen`:
        the plan's `reweight` when a non-plus span (what follows a plus: the final cross span
        and any cross run after a plus) attends to a plus child's keys, else (1, 0). Plus
        children attending to their own pages or their prefix are never re-weighted."""
        if self.reweight is not None and self.spans[seen].kind == "plus" and self.spans[attending].kind != "plus":
            return self.reweight
        return (1.0, 0.0)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.spans)

    @property
    def padded_length(self) -> int:
        """Length of the flattened sequence with every span padded to whole pages."""
        last = self.spans[-1]
        return last.start + -(-len(last) // self.page_size) * self.page_size

    @property
    def generation_position(self) -> int:
        """Logical position of the first generated token (continues the last span)."""
        return self.spans[-1].positions[-1] + 1

    def padded_tokens(self, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, positions, real mask) over the padded sequence; pads get position -1."""
        n = self.padded_length
        ids = np.full(n, pad_id, np.int32)
        pos = np.full(n, -1, np.int32)
        real = np.zeros(n, bool)
        for s in self.spans:
            ids[s.start : s.start + len(s)] = s.token_ids
            pos[s.start : s.start + len(s)] = s.positions
            real[s.start : s.start + len(s)] = True
        return ids, pos, real

    def sequence_page_keys(self, generated_ids=()) -> tuple[str, ...]:
        """Page keys of the last span extended by generated ids: the keys under which
        the engine stores this generation's sequence, and which an outer query that
        re-sends the exchange (passes.hoist) looks up."""
        last = self.spans[-1]
        return chain_page_keys(last.base_key, tuple(last.token_ids) + tuple(generated_ids), self.page_size)

    def format(self, tokenizer=None, max_tokens_shown: int = 12) -> str:
        """Readable dump: one line per span (kind, start, length, pages, positions,
        visibility, key), with a token preview (decoded when a tokenizer with
        `decode` is given)."""
        rw = "" if self.reweight is None else f" reweight=({self.reweight[0]:g}, {self.reweight[1]:g})"
        lines = [
            f"plan: model={self.model} adapter={self.adapter} attention={self.attention_policy} "
            f"positions={self.position_policy} page_size={self.page_size}{rw}",
            f"      {len(self.spans)} span(s), {self.num_tokens} tokens, {self.padded_length} padded; "
            f"generation continues span {self.spans[-1].index} at position {self.generation_position}",
        ]
        for s in self.spans:
            pages = -(-len(s) // self.page_size)
            sees = ",".join(map(str, s.sees)) if s.sees else "-"
            lines.append(
                f"  span {s.index:>3} {s.kind:<5} start={s.start:<6} len={len(s):<5} pages={pages:<3} "
                f"pos={s.positions[0]}..{s.positions[-1]}  sees=[{sees}]  key={s.cache_key[:12]}"
            )
            ids = list(s.token_ids[:max_tokens_shown])
            more = " ..." if len(s) > max_tokens_shown else ""
            text = None
            if tokenizer is not None and hasattr(tokenizer, "decode"):
                try:
                    text = tokenizer.decode(list(s.token_ids))
                except Exception:  # preview only
                    text = None
            if text is not None:
                lines.append(f"        text: {text[:120]!r}{' ...' if len(text) > 120 else ''}")
            else:
                lines.append(f"        ids: {ids}{more}")
        return "\n".join(lines)

    def dense_mask(self) -> np.ndarray:
        """[N, N] bool over the concatenated real tokens of all spans (in span order):
        token i sees token j iff j's span is i's own span or one it sees, and pos_j <= pos_i.
        This is the brute-force reference the engine is tested against."""
        span_of = np.concatenate([np.full(len(s), s.index) for s in self.spans])
        pos = np.concatenate([np.asarray(s.positions) for s in self.spans])
        visible = np.zeros((len(self.spans), len(self.spans)), bool)
        for s in self.spans:
            visible[s.index, s.index] = True
            visible[s.index, list(s.sees)] = True
        return visible[span_of[:, None], span_of[None, :]] & (pos[None, :] <= pos[:, None])
