"""Synthetic span-structured batches for tests, tuning and benchmarks (numpy).

Each sequence is laid out the way the engine lays out a span query:
a prefix span, optionally a `plus` of children spans (under `parallel` positions
every child starts at the end of the prefix), then the query span whose tokens
are the queries of this step (its keys are already in the cache, written by the
engine before attention). Every span starts on a page boundary, so the last page
of a span is partly filled (block_lens < page_size) and its pad slots hold junk.
"""

import jax.numpy as jnp
import numpy as np

from spanjax.kernels.span_attention.meta import SpanBatchMeta


def make_batch(
    rng,
    seqs,
    *,
    num_q_heads,
    num_kv_heads,
    head_dim,
    page_size,
    dtype=np.float32,
    extra_tokens=0,
    extra_entries=0,
    spare_pages=3,
    rope_theta=10000.0,
    with_kv=True,
):
    """seqs: list of dicts {prefix: int, children: [int], parallel: bool, q_len: int}.

    `q_len` queries end the sequence: they are the last q_len tokens of its query
    span (whose length is max(q_len, given `tail`)). Returns a dict of numpy
    arrays named like span attention's arguments and SpanBatchMeta's fields (+ rope_inv_freq,
    sm_scale); `args_kwargs` turns it into a call's arguments.
    with_kv=False skips the page pool (k_pages/v_pages are None; `num_pages` says
    how many pages to allocate), for benchmarks that fill it on the device.
    """
    P = page_size
    entries = []  # per seq: list of (start_pos, length)
    q_positions = []
    for sd in seqs:
        spans = []  # (start position, length)
        pos = 0
        if sd.get("prefix", 0):
            spans.append((0, sd["prefix"]))
            pos = sd["prefix"]
        children = sd.get("children", [])
        if children:
            if sd.get("parallel", True):
                for c in children:
                    spans.append((pos, c))
                pos += max(children)
            else:
                for c in children:
                    spans.append((pos, c))
                    pos += c
        q_len = sd.get("q_len", 1)
        tail = max(q_len, sd.get("tail", q_len))
        if tail:
            spans.append((pos, tail))
        ents = []
        for start, length in spans:
            for off in range(0, length, P):
                ents.append((start + off, min(P, length - off)))
        entries.append(ents)
        q_positions.append(np.arange(pos + tail - q_len, pos + tail))

    S = len(seqs)
    M = max(1, max(len(e) for e in entries) + extra_entries)
    num_pages = sum(len(e) for e in entries) + spare_pages
    perm = rng.permutation(num_pages)
    tables = rng.integers(0, 10 * num_pages, size=(S, M)).astype(np.int32)  # junk in unused entries
    bpos = rng.integers(0, 1000, size=(S, M)).astype(np.int32)
    blens = np.zeros((S, M), np.int32)
    kv_shape = (num_pages, P, num_kv_heads, head_dim)
    k = rng.standard_normal(kv_shape).astype(np.float32) if with_kv else None
    v = rng.standard_normal(kv_shape).astype(np.float32) if with_kv else None
    nxt = 0
    for s, ents in enumerate(entries):
        # shuffle entry order: visibility is by listing, causality by positions
        order = rng.permutation(len(ents))
        for i, e in enumerate(order):
            start, length = ents[e]
            page = perm[nxt]
            nxt += 1
            tables[s, i], bpos[s, i], blens[s, i] = page, start, length
            if with_kv:
                k[page, length:] = 1e4  # junk in pad slots: must be masked, not merely down-weighted
                v[page, length:] = 1e4
    q_lens = np.array([len(p) for p in q_positions])
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(cu[-1]) + extra_tokens
    q_pos = np.concatenate(q_positions + [rng.integers(0, 50, size=extra_tokens)]).astype(np.int32)
    q = rng.standard_normal((T, num_q_heads, head_dim)).astype(np.float32)
    inv_freq = (1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)
    return dict(
        q=q.astype(dtype),
        k_pages=k.astype(dtype) if with_kv else None,
        v_pages=v.astype(dtype) if with_kv else None,
        num_pages=num_pages,
        block_tables=tables,
        block_pos=bpos,
        block_lens=blens,
        cu_q_lens=cu,
        q_pos=q_pos,
        rope_inv_freq=inv_freq,
        sm_scale=float(head_dim) ** -0.5,
    )


def batch_meta(batch, conv=jnp.asarray) -> SpanBatchMeta:
    """The SpanBatchMeta of a `make_batch` dict (no slot_mapping: attention alone does not write)."""
    names = ("block_tables", "block_pos", "block_lens", "cu_q_lens")
    return SpanBatchMeta(**{n: conv(batch[n]) for n in names})


def args_kwargs(batch, to_jnp=True):
    """(q, k_pages, v_pages, meta, q_pos) and dict(rope_inv_freq, sm_scale) of a `make_batch` dict."""
    conv = jnp.asarray if to_jnp else (lambda x: x)
    args = [conv(batch["q"]), conv(batch["k_pages"]), conv(batch["v_pages"]), batch_meta(batch, conv)]
    args.append(conv(batch["q_pos"]))
    return args, dict(rope_inv_freq=conv(batch["rope_inv_freq"]), sm_scale=batch["sm_scale"])
