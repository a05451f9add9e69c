"""Autotune span-attention block sizes for this device kind and write the table.

    python -m spanjax.kernels.span_attention.tune                       # GPU/TPU: default model + buckets
    python -m spanjax.kernels.span_attention.tune --hq 32 --hkv 8 --head-dim 128 --page-size 16 \
        --bucket decode:64:4096 --bucket mixed:8:512:2048 --dtype bfloat16
    python -m spanjax.kernels.span_attention.tune --quick               # CPU smoke (interpret, tiny)

Buckets: `decode:<seqs>:<ctx>` (one query token per sequence) and
`mixed:<seqs>:<prefill chunk>:<ctx>` (one prefill chunk plus seqs-1 decodes).
Each candidate is checked against the reference once, timed (median of --reps),
and the fastest per bucket is merged into the table under
`tuning.device_kind()` (entries for other devices are kept).
"""

import argparse
import datetime
import functools
import itertools
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels.span_attention import tuning
from spanjax.kernels.span_attention.kernel import span_attention_gpu
from spanjax.kernels.span_attention.kernel_tpu import span_attention_tpu
from spanjax.kernels.span_attention.reference import span_attention_reference
from spanjax.kernels.span_attention.testing import args_kwargs, make_batch


def bucket_batch(spec, hq, hkv, d, page, dtype, seed=0):
    parts = spec.split(":")
    kind, nums = parts[0], [int(x) for x in parts[1:]]
    rng = np.random.default_rng(seed)
    if kind == "decode":
        seqs_n, ctx = nums
        seqs = [dict(prefix=ctx - 1, q_len=1) for _ in range(seqs_n)]
    elif kind == "mixed":
        seqs_n, chunk, ctx = nums
        seqs = [dict(prefix=max(0, ctx - chunk), q_len=chunk)] + [
            dict(prefix=ctx - 1, q_len=1) for _ in range(seqs_n - 1)
        ]
    else:
        raise ValueError(f"bad bucket {spec!r}")
    return make_batch(
        rng, seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=page, dtype=dtype, spare_pages=0
    )


def candidates(variant, T, S, M, page, hq, hkv, quick=False):
    G = hq // hkv
    decode = T <= S
    splits = [1, 2, 4, 8] if decode else [1]
    if variant == "gpu":
        gp = tuning.next_pow2(G)
        bqs = [b for b in (1, 2, 4, 8, 16, 32, 64) if 16 <= b * gp <= 128] or [1]
        pps = [p for p in (1, 2, 4, 8) if 16 <= p * page <= 256]
        extra = [dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    else:
        bqs = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if 8 <= b * G <= 512] or [1]
        pps = [p for p in (1, 2, 4, 8) if p * page <= 256]
        extra = [{}]
    if decode:  # one token per sequence: bigger tiles only add padding rows
        bqs = bqs[:2]
    if quick:
        bqs, pps, splits, extra = bqs[:2], pps[:2], splits[:2], extra[:1]
    for bq, pp, ks, ex in itertools.product(bqs, pps, splits, extra):
        if ks > 1 and ks * pp > M:
            continue
        yield dict(block_q=bq, pages_per_block=pp, num_splits=ks, **ex)


def time_fn(fn, args, kw, reps):
    out = fn(*args, **kw)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args, **kw))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["gpu", "tpu"], default=None)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--bucket", action="append", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None, help="table path (default: the shipped tuned_blocks.json)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few candidates, interpret mode (CPU smoke)")
    ap.add_argument("--interpret", action="store_true")
    a = ap.parse_args(argv)

    backend = jax.default_backend()
    variant = a.variant or ("tpu" if backend == "tpu" else "gpu")
    interpret = a.interpret or a.quick or backend not in ("gpu", "tpu")
    if a.quick:
        a.hq, a.hkv, a.head_dim, a.page_size, a.dtype, a.reps = 4, 2, 32, 16, "float32", 2
        buckets = a.bucket or ["decode:2:64", "mixed:2:8:48"]
        a.out = a.out or "runs/span_attention_tune_quick.json"  # never pollute the shipped table
    else:
        buckets = a.bucket or [
            "decode:8:1024",
            "decode:64:2048",
            "decode:4:16384",
            "mixed:16:256:2048",
            "mixed:4:1024:4096",
        ]
    if interpret and not a.quick:
        print("warning: no accelerator; timings in interpret mode are meaningless", file=sys.stderr)
    dtype = jnp.dtype(a.dtype)
    kern = span_attention_gpu if variant == "gpu" else span_attention_tpu

    table = tuning.load_table(a.out) if a.out else tuning.load_table()
    table = {"format": tuning.TABLE_FORMAT, "entries": {k: dict(v) for k, v in table.get("entries", {}).items()}}
    kind = tuning.device_kind()
    dev_entries = table["entries"].setdefault(kind, {})
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    for spec in buckets:
        batch = bucket_batch(spec, a.hq, a.hkv, a.head_dim, a.page_size, dtype)
        args, kw = args_kwargs(batch)
        T, (S, M) = args[0].shape[0], args[3].block_tables.shape
        key = tuning.bucket_key(variant, T, S, M, a.page_size, a.hq, a.hkv, a.head_dim, dtype)
        ref = jax.jit(span_attention_reference, static_argnames=("sm_scale",))(*args, **kw)
        best = None
        for cfg in candidates(variant, T, S, M, a.page_size, a.hq, a.hkv, quick=a.quick):
            try:
                us, out = time_fn(functools.partial(kern, interpret=interpret, **cfg), args, kw, a.reps)
            except Exception as e:  # e.g. too much shared memory for this config
                print(f"  {key} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            ok = err <= tol
            print(f"  {key} {cfg}: {us:9.1f} us  max|diff|={err:.1e}{'' if ok else '  WRONG'}")
            if ok and (best is None or us < best[0]):
                best = (us, cfg)
        if best is None:
            print(f"{key}: no working candidate")
            continue
        us, cfg = best
        dev_entries[key] = dict(
            cfg,
            us=round(us, 2),
            tuned_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            interpret=interpret,
        )
        print(f"{key}: best {cfg} {us:.1f} us")
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tuning.save_table(table, a.out)
    print(f"wrote {a.out or tuning.TABLE_PATH} ({kind}: {len(dev_entries)} entries)")


if __name__ == "__main__":
    main()
