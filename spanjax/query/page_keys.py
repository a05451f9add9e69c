"""Content keys of spans and pages: what the planner writes into a plan and the engine's
page cache looks pages up by (one module both import).

Cache keys
----------
All hashes are blake2b (16-byte digest, hex).

    root          = H("spanjax-span-v1", model, adapter, context_key)
    page_keys[0]  = H(root, tokens of page 0)          # root = Span.base_key
    page_keys[j]  = H(page_keys[j-1], tokens of page j)   # last page may be partial
    cache_key     = page_keys[-1]

`context_key` = H(the ordered groups the span sees), where a group is a cross
run's cache key, or a plus group = (its position policy, its non-empty
children's descriptors: *sorted* under `parallel`, in order under
`sequential`); a child's descriptor = H(its own groups in order). A plus
child never sees its siblings, so permuting a plus leaves every child's key
unchanged; under `parallel` the spans after the plus keep their keys too
(their KV is identical), under `sequential` they change (the children moved
relative to them, so their KV differs). An isolated span's context is only what is
inside its own child, so it keys identically wherever it appears.

In a key: the tokens of the span (ids), the structure and tokens of everything
it sees, the position policies of the plus groups it sees (and, for a `prefix`
plus child, the position policy of its own plus), the model and the adapter.
Not in a key: absolute positions, the span's kind or index, the page size of the
plan other than through page boundaries (keys of plans with different page sizes
differ), sampling settings.
"""

from __future__ import annotations

import functools
import hashlib
import json


def digest(*parts) -> str:
    """blake2b (16-byte digest, hex) of the JSON of `parts`: every key below is one."""
    data = json.dumps(parts, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def root_key(model: str, adapter: str | None, context_key: str) -> str:
    return digest("spanjax-span-v1", model, adapter, context_key)


def chain_page_key(prev: str, page_tokens) -> str:
    """key_j = H(key_{j-1}, tokens of page j); the engine extends chains with it."""
    return digest(prev, [int(t) for t in page_tokens])


def chain_page_keys(root: str, tokens, page_size: int) -> tuple[str, ...]:
    """Chained page keys of `tokens` (one per page; the last may be partial)."""
    return _chain_page_keys(root, tuple(int(t) for t in tokens), page_size)


# Lowering keys every span of every query, and queries repeat their spans (a RAG query's
# documents: ~2 ms of digests a query at k = 16); a hit costs hashing the token tuple.
@functools.lru_cache(maxsize=8192)
def _chain_page_keys(root: str, toks: tuple[int, ...], page_size: int) -> tuple[str, ...]:
    keys, k = [], root
    for j in range(0, len(toks), page_size):
        k = chain_page_key(k, toks[j : j + page_size])
        keys.append(k)
    return tuple(keys)


def context_key(groups) -> str:
    return digest("ctx", list(groups))
