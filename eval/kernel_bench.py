"""Benchmark ragged paged span attention on whatever accelerator is present.

    python -m spanjax.eval.kernel_bench                  # GPU/TPU: Llama-3-8B-like heads, bf16
    python -m spanjax.eval.kernel_bench --tiny           # CPU smoke: tiny shapes, interpret mode
    python -m spanjax.eval.kernel_bench --case decode:8:4096 --case mixed:32:512:2048

Cases: `decode:<seqs>:<ctx>` (one query per sequence) and
`mixed:<seqs>:<chunk>:<ctx>` (one prefill chunk of <chunk> tokens plus seqs-1
decodes, all with <ctx> tokens of context).

Implementations timed per case (median of --reps after a warm-up):
  pallas     kernels.span_attention.span_attention(impl="pallas") with the tuned/heuristic blocks
  pallas_nosplit  the same without split-KV (decode cases where the dispatcher splits)
  reference  span_attention_reference under jax.jit
  jax_paged  JAX's bundled paged attention (ops/gpu/paged_attention on GPU,
             ops/tpu/paged_attention on TPU), decode cases only. It does no RoPE
             and no position masking (keys pre-rotated, lengths only), so it is
             a speed-of-light baseline rather than the same computation; it also
             wants the pool as [Hkv, N, P, D] (transposed once, outside timing).

Bandwidth: bytes that must move = visible K and V (sum of block_lens * Hkv * D *
itemsize * 2) + q + out; achieved GB/s = bytes / time, and its fraction of the
device's peak HBM bandwidth (table below, by device kind). Results go to
runs/kernel_bench-<timestamp>/results.json.
"""

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels.span_attention import span_attention, span_attention_reference, tuning
from spanjax.kernels.span_attention.testing import batch_meta, make_batch

# Peak HBM bandwidth (bytes/s) by device-kind substring, most specific first.
PEAK_HBM = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB", 2.039e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10G", 0.6e12),
    ("TPU v6", 1.64e12),
    ("TPU v5p", 2.765e12),
    ("TPU v5", 0.819e12),  # v5e / v5 lite
    ("TPU v4", 1.2e12),
]


def peak_bandwidth(device):
    kind = getattr(device, "device_kind", "")
    for sub, bw in PEAK_HBM:
        if sub.lower() in kind.lower():
            return bw
    return None


def parse_case(spec):
    parts = spec.split(":")
    nums = [int(x) for x in parts[1:]]
    if parts[0] == "decode":
        S, ctx = nums
        return [dict(prefix=ctx - 1, q_len=1) for _ in range(S)]
    if parts[0] == "mixed":
        S, chunk, ctx = nums
        return [dict(prefix=max(0, ctx - chunk), q_len=chunk)] + [dict(prefix=ctx - 1, q_len=1) for _ in range(S - 1)]
    raise ValueError(f"bad case {spec!r}")


def build(spec, hq, hkv, d, page, dtype, seed=0):
    rng = np.random.default_rng(seed)
    b = make_batch(
        rng,
        parse_case(spec),
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        page_size=page,
        spare_pages=0,
        with_kv=False,
    )
    kk, kv = jax.random.split(jax.random.key(seed))
    shape = (b["num_pages"], page, hkv, d)
    k_pages = jax.random.normal(kk, shape, jnp.float32).astype(dtype)
    v_pages = jax.random.normal(kv, shape, jnp.float32).astype(dtype)
    args = [jnp.asarray(b["q"], dtype), k_pages, v_pages, batch_meta(b), jnp.asarray(b["q_pos"])]
    kw = dict(rope_inv_freq=jnp.asarray(b["rope_inv_freq"]), sm_scale=b["sm_scale"])
    return b, args, kw


def time_call(fn, reps):
    out = jax.block_until_ready(fn())  # compile + warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def jax_paged_baseline(b, args, backend, interpret):
    """A closure running JAX's bundled decode paged attention on the same pages."""
    q, k_pages, v_pages = args[:3]
    cu = b["cu_q_lens"]
    if not np.all(np.diff(cu) == 1):
        return None  # decode only
    lens = b["block_lens"]
    S, M = lens.shape
    # contiguous per-sequence page lists in position order, lengths = total tokens
    order = np.argsort(np.where(lens > 0, b["block_pos"], 1 << 30), axis=1)
    tables = np.take_along_axis(b["block_tables"], order, axis=1)
    lengths = lens.sum(axis=1).astype(np.int32)
    kp = jnp.transpose(k_pages, (2, 0, 1, 3))  # [Hkv, N, P, D]
    vp = jnp.transpose(v_pages, (2, 0, 1, 3))
    if backend == "tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_pa

        ppcb = max(1, min(8, M))
        while M % ppcb:
            ppcb -= 1
        fn = jax.jit(lambda q, kp, vp, l, t: tpu_pa(q, kp, vp, l, t, pages_per_compute_block=ppcb))
    else:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_pa

        ppcb = max(1, min(8, M))
        while M % ppcb:
            ppcb -= 1
        k_splits = 1
        for ks in (16, 8, 4, 2):
            if M % ks == 0 and (M // ks) % ppcb == 0:
                k_splits = ks
                break
        fn = jax.jit(
            lambda q, kp, vp, l, t: gpu_pa(
                q, kp, vp, t, l, pages_per_compute_block=ppcb, k_splits=k_splits, interpret=interpret
            )
        )
    tables, lengths = jnp.asarray(tables), jnp.asarray(lengths)
    return lambda: fn(q, kp, vp, lengths, tables)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=None)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (automatic on CPU)")
    ap.add_argument("--out", default=None, help="output directory (default runs/kernel_bench-<timestamp>)")
    ap.add_argument("--skip", action="append", default=[], help="implementations to skip")
    a = ap.parse_args(argv)

    dev = jax.devices()[0]
    backend = jax.default_backend()
    accel = backend in ("gpu", "tpu")
    interpret = not accel
    if a.tiny or not accel:
        a.hq, a.hkv, a.head_dim, a.page_size, a.dtype = 4, 2, 32, 16, a.dtype if a.tiny and accel else "float32"
        a.reps = min(a.reps, 3)
        cases = a.case or ["decode:2:64", "mixed:3:8:48"]
    else:
        cases = a.case or [
            "decode:1:32768",
            "decode:8:4096",
            "decode:64:2048",
            "decode:128:1024",
            "mixed:32:512:2048",
            "mixed:8:2048:8192",
        ]
    dtype = jnp.dtype(a.dtype)
    peak = peak_bandwidth(dev)
    itemsize = dtype.itemsize
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(a.out or f"runs/kernel_bench-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_jit = jax.jit(span_attention_reference, static_argnames=("sm_scale", "pages_per_step"))

    print(
        f"device: {dev.platform} {getattr(dev, 'device_kind', '')}  "
        f"peak HBM: {peak / 1e9 if peak else float('nan'):.0f} GB/s  interpret={interpret}"
    )
    print(f"heads q/kv {a.hq}/{a.hkv}  head_dim {a.head_dim}  page {a.page_size}  {dtype.name}")
    results = []
    for spec in cases:
        b, args, kw = build(spec, a.hq, a.hkv, a.head_dim, a.page_size, dtype)
        T, (S, M) = args[0].shape[0], args[3].block_tables.shape
        kv_bytes = int(b["block_lens"].sum()) * a.hkv * a.head_dim * itemsize * 2
        nbytes = kv_bytes + 2 * T * a.hq * a.head_dim * itemsize
        cfg = tuning.get_config(
            "tpu" if backend == "tpu" else "gpu", T, S, M, a.page_size, a.hq, a.hkv, a.head_dim, dtype
        )
        impls = {
            "reference": functools.partial(ref_jit, *args, **kw),
            "pallas": functools.partial(span_attention, *args, **kw, impl="pallas", interpret=interpret),
        }
        if cfg.get("num_splits", 1) > 1:
            impls["pallas_nosplit"] = functools.partial(
                span_attention, *args, **kw, impl="pallas", interpret=interpret, config=dict(num_splits=1)
            )
        try:
            base = jax_paged_baseline(b, args, backend, interpret)
            if base is not None:
                impls["jax_paged"] = base
        except Exception as e:
            print(f"  jax_paged unavailable: {type(e).__name__}: {str(e)[:100]}")
        row = dict(case=spec, T=T, S=S, M=M, bytes=nbytes, config=cfg, impls={})
        ref_out = None
        for name, fn in impls.items():
            if name in a.skip:
                continue
            try:
                sec, out = time_call(fn, a.reps)
            except Exception as e:
                print(f"  {spec:24s} {name:15s} FAILED: {type(e).__name__}: {str(e)[:160]}")
                row["impls"][name] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
                continue
            gbs = nbytes / sec / 1e9
            rec = dict(us=sec * 1e6, GBps=gbs, frac_peak=(gbs * 1e9 / peak) if peak else None)
            if name == "reference":
                ref_out = out
            elif name != "jax_paged" and ref_out is not None:
                rec["max_abs_diff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
            row["impls"][name] = rec
            frac = f"{rec['frac_peak'] * 100:5.1f}% of peak" if peak else "   (no peak known)"
            print(
                f"  {spec:24s} {name:15s} {sec * 1e6:10.1f} us {gbs:8.1f} GB/s {frac}"
                + (f"  diff {rec['max_abs_diff']:.1e}" if "max_abs_diff" in rec else "")
            )
        results.append(row)
    meta = dict(
        device=dict(platform=dev.platform, kind=getattr(dev, "device_kind", ""), peak_hbm_Bps=peak),
        jax=jax.__version__,
        interpret=interpret,
        heads=dict(q=a.hq, kv=a.hkv, head_dim=a.head_dim, page_size=a.page_size, dtype=dtype.name),
        argv=sys.argv[1:] if argv is None else list(argv),
        results=results,
    )
    path = out_dir / "results.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {path}")
    return meta


if __name__ == "__main__":
    main()
