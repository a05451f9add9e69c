"""The layers' weight products of SmolLM2-135M at 1-512 rows: XLA's dot on fp32 [in, out]
matrices against the packed-panel C++ kernel (kernels/packed_matmul), in one run.

    python -m spanjax.eval.products_bench [--rows 1 8 25 32 512] [--write-docs]

Random fp32 weights of the model's shapes (30 layers of q/k/v, o, gate/up and down; 425 MB,
more than any cache), one jitted function per side that runs every layer's products with the
ops a layer puts between them, best of `--repeats` after a warm-up. Writes
runs/products_bench-<stamp>.json and, with `--write-docs`, docs/results/products_bench.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels import cpu_library
from spanjax.kernels.packed_matmul import pack, packed_matmuls
from spanjax.runs import machine_record

LAYERS, HIDDEN, INTERMEDIATE, QKV = 30, 576, 1536, 960  # SmolLM2-135M: q 576 + k 192 + v 192


def layer_weights(rng) -> dict:
    shapes = dict(
        qkv=(HIDDEN, QKV), o=(HIDDEN, HIDDEN), gate_up=(HIDDEN, 2 * INTERMEDIATE), down=(INTERMEDIATE, HIDDEN)
    )
    return {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}


def layers_forward(x, layers, product):
    for w in layers:
        a = product(x, w["qkv"])
        x = x + product(a[:, :HIDDEN], w["o"])
        g = product(x, w["gate_up"])
        x = x + product(g[:, :INTERMEDIATE] * g[:, INTERMEDIATE:], w["down"])
    return x


def best_ms(f, x, weights, repeats: int) -> float:
    jax.block_until_ready(f(x, weights))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, weights))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 25, 32, 64, 512])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="runs")
    ap.add_argument("--write-docs", action="store_true", help="also write docs/results/products_bench.json")
    args = ap.parse_args(argv)
    if not cpu_library.available():
        raise SystemExit(f"the CPU kernel library is unavailable: {cpu_library.unavailable_reason()}")
    rng = np.random.default_rng(0)
    raw = [layer_weights(rng) for _ in range(LAYERS)]
    dense = [{k: jnp.asarray(v) for k, v in w.items()} for w in raw]
    packed = [{k: pack(v) for k, v in w.items()} for w in raw]
    xla = jax.jit(lambda x, ws: layers_forward(x, ws, lambda x, w: x @ w))
    kernel = jax.jit(lambda x, ws: layers_forward(x, ws, lambda x, w: packed_matmuls(x, (w,), impl="cpu")[0]))
    flops_per_row = 2 * LAYERS * sum(a.size for a in raw[0].values())
    table = []
    for rows in args.rows:
        x = jnp.full((rows, HIDDEN), 0.01, jnp.float32)
        repeats = max(2, args.repeats // 4) if rows > 100 else args.repeats
        xla_ms, packed_ms = best_ms(xla, x, dense, repeats), best_ms(kernel, x, packed, repeats)
        row = dict(
            rows=rows,
            xla_ms=round(xla_ms, 2),
            packed_ms=round(packed_ms, 2),
            speedup=round(xla_ms / packed_ms, 2),
            packed_gflop_s=round(flops_per_row * rows / packed_ms / 1e6, 1),
        )
        table.append(row)
        print(f"{rows:4d} rows: XLA {xla_ms:7.1f} ms, packed {packed_ms:7.1f} ms ({row['speedup']:.2f}x)", flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = dict(
        command="python -m spanjax.eval.products_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine_record(),
        avx512=cpu_library.avx512_supported(),
        weights_mb=round(4 * sum(a.size for w in raw for a in w.values()) / 1e6),
        table=table,
    )
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, f"products_bench-{stamp}.json")]
    if args.write_docs:
        paths.append(os.path.join(os.path.dirname(__file__), "..", "docs", "results", "products_bench.json"))
    for path in paths:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
