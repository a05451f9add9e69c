"""Block-size selection: the versioned tuned table, shape buckets, and the heuristic.

Table (`tuned_blocks.json`), written by `python -m spanjax.kernels.span_attention.tune`:

    {"format": 1,                       # bump when keys/fields change meaning
     "kernel": "span_attention",
     "entries": {"<device kind>": {"<bucket>": {"block_q": 8, "pages_per_block": 4,
                                                "num_splits": 1, "num_warps": 4,
                                                "num_stages": 2, "us": 123.4,
                                                "tuned_at": "..."}}}}

Device kind: `"<platform>:<jax device_kind>"`, e.g. "gpu:NVIDIA H100 80GB HBM3".
Bucket: `"<variant>/d<D>/g<G>/p<page>/<dtype>/t<T>/s<S>/c<ctx>"` with T (query
tokens), S (sequences) and ctx (block-table capacity M * page_size) rounded up to
powers of two, so one entry serves a whole shape bucket of the engine.
"""

import json
import os
from pathlib import Path

import jax
import numpy as np

from spanjax.kernels.span_attention.tiling import cdiv, max_num_tiles, next_pow2

TABLE_FORMAT = 1
TABLE_PATH = Path(__file__).with_name("tuned_blocks.json")
PARAM_KEYS = ("block_q", "pages_per_block", "num_splits", "num_warps", "num_stages")


def device_kind(device=None) -> str:
    d = device or jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def bucket_key(
    variant, num_tokens, num_seqs, max_entries, page_size, num_q_heads, num_kv_heads, head_dim, dtype
) -> str:
    G = num_q_heads // num_kv_heads
    dt = np.dtype(dtype).name
    return (
        f"{variant}/d{head_dim}/g{G}/p{page_size}/{dt}/t{next_pow2(num_tokens)}"
        f"/s{next_pow2(num_seqs)}/c{next_pow2(max_entries * page_size)}"
    )


_TABLE_CACHE = {}


def load_table(path=None) -> dict:
    path = Path(path or os.environ.get("SPANJAX_TUNED_TABLE", TABLE_PATH))
    key = str(path)
    if key not in _TABLE_CACHE:
        try:
            table = json.loads(path.read_text())
            if table.get("format") != TABLE_FORMAT:
                table = {"format": TABLE_FORMAT, "entries": {}}
        except (OSError, ValueError):
            table = {"format": TABLE_FORMAT, "entries": {}}
        _TABLE_CACHE[key] = table
    return _TABLE_CACHE[key]


def save_table(table, path=None):
    path = Path(path or TABLE_PATH)
    table = dict(table, format=TABLE_FORMAT, kernel="span_attention")
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _TABLE_CACHE.pop(str(path), None)


def heuristic(
    variant, num_tokens, num_seqs, max_entries, page_size, num_q_heads, num_kv_heads, head_dim, num_cores=None
) -> dict:
    """Block sizes when the table has no entry for this device kind and bucket."""
    G = num_q_heads // num_kv_heads
    decode = num_tokens <= num_seqs  # at most one query token per sequence on average
    ctx = max_entries * page_size
    if variant == "gpu":
        gp = next_pow2(G)
        block_q = max(1, (16 if decode else 64) // gp)
        pp = max(1, 64 // page_size)
        cores = num_cores or 132
        warps = 4
    else:  # tpu
        gp = G
        block_q = max(1, (8 if decode else 128) // gp)
        pp = max(1, min(8, 128 // page_size))
        cores = num_cores or 2
        warps = None
    block_q = next_pow2(block_q)
    splits = 1
    if decode and ctx >= 2048:
        programs = max_num_tiles(num_tokens, num_seqs, block_q) * (num_kv_heads if variant == "gpu" else 1)
        want = next_pow2(cdiv(2 * cores, max(programs, 1)))
        max_splits = max(1, cdiv(max_entries, pp) // 2)  # >= 2 page groups per split
        splits = int(min(want, 16))
        while splits > 1 and splits > max_splits:
            splits //= 2
    cfg = dict(block_q=block_q, pages_per_block=pp, num_splits=max(1, splits))
    if variant == "gpu":
        cfg.update(num_warps=warps, num_stages=2)
    return cfg


def get_config(
    variant,
    num_tokens,
    num_seqs,
    max_entries,
    page_size,
    num_q_heads,
    num_kv_heads,
    head_dim,
    dtype,
    *,
    device=None,
    table=None,
) -> dict:
    """Tuned entry for (device kind, bucket) if present, else the heuristic."""
    cfg = heuristic(variant, num_tokens, num_seqs, max_entries, page_size, num_q_heads, num_kv_heads, head_dim)
    try:
        kind = device_kind(device)
    except Exception:
        return cfg
    table = table if table is not None else load_table()
    key = bucket_key(variant, num_tokens, num_seqs, max_entries, page_size, num_q_heads, num_kv_heads, head_dim, dtype)
    hit = table.get("entries", {}).get(kind, {}).get(key)
    if hit:
        cfg.update({k: hit[k] for k in PARAM_KEYS if k in hit and k in cfg})
    return cfg
