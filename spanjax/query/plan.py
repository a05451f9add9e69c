"""Span plan: what one `g`'s prompt lowers to, and what the engine executes.

Lowering (spanjax/query/lower.py) flattens a prompt tree into spans (DESIGN 2.3):
a span is a maximal run of tokens that see the same context. Every span starts
on a page boundary, so a KV page belongs to exactly one span. Visibility is a
set of earlier spans; causality inside the visible set follows positions.

The last span of every plan is a `cross` span that sees every other span and
ends with the generation prefix (the assistant header), so decoding continues
it and generated tokens see the whole prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

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

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.spans)

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
