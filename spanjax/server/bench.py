"""Load test of `spanjax serve` on loopback: concurrent streaming clients, outputs checked.

(A benchmark, kept beside the server rather than in eval/: eval sits below the server layer.)

    python -m spanjax.server.bench                          # 32 clients for 300 s
    python -m spanjax.server.bench --clients 8 --seconds 30 --write-docs

A real uvicorn server (spanjax.server.run.BackgroundServer) over SmolLM2-135M-Instruct
serves OpenAI chat completions. First every distinct prompt runs alone (its greedy text is
the reference, and the shapes compile); then `--clients` asyncio clients stream requests
back to back for `--seconds` (or `--max-requests`), each response checked: the SSE stream
well formed and ending in [DONE], the text equal to the prompt's reference. Then `--kill`
clients drop their streams after the first chunk. At the end the KV pages held by requests
must be back to 0. Reports requests/s, output tokens/s, TTFT p50/p99 (first content chunk),
failures and mismatches, in runs/serve_bench-<stamp>/results.json (and
docs/results/serve_bench.json with --write-docs).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import time

import httpx
import jax.numpy as jnp

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.models.loading import load_model
from spanjax.server import Server, ServerConfig
from spanjax.server.run import BackgroundServer

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Why is the sky blue? Answer in one sentence.",
    "Give a synonym for happy.",
    "What is 12 times 12?",
    "Write a haiku about the sea.",
    "What does a key-value cache store in a transformer?",
    "Name a planet that has rings.",
    "What language is spoken in Brazil?",
    "Suggest a name for a pet turtle.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Describe a cat in five words.",
    "What is the opposite of cold?",
    "Which ocean is the largest?",
    "Say hello in Spanish.",
]


def body(question: str, max_tokens: int) -> dict:
    return {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_once(client: httpx.AsyncClient, question: str, max_tokens: int, drop_after_first: bool = False):
    """One streamed chat completion: (text, ttft_s, completion_tokens, error or None)."""
    t0 = time.perf_counter()
    text, ttft, tokens, done = "", None, 0, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body(question, max_tokens)) as r:
            if r.status_code != 200:
                return text, ttft, tokens, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    return text, ttft, tokens, f"not an SSE data line: {line[:80]!r}"
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {}).get("content") or ""
                    if delta and ttft is None:
                        ttft = time.perf_counter() - t0
                        if drop_after_first:
                            return text + delta, ttft, tokens, None  # leaving the block closes the stream
                    text += delta
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return text, ttft, tokens, f"{type(e).__name__}: {e}"
    return text, ttft, tokens, None if done else "stream ended without [DONE]"


async def load_phase(url, refs, args):
    records, deadline, issued = [], time.perf_counter() + args.seconds, 0
    lock = asyncio.Lock()

    async def client(i: int):
        nonlocal issued
        async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as c:
            while time.perf_counter() < deadline:
                async with lock:
                    if issued >= args.max_requests:
                        return
                    q = QUESTIONS[issued % len(QUESTIONS)]
                    issued += 1
                t0 = time.perf_counter()
                text, ttft, tokens, err = await stream_once(c, q, args.max_tokens)
                records.append(
                    dict(
                        client=i,
                        question=q,
                        ttft_s=ttft,
                        e2e_s=time.perf_counter() - t0,
                        tokens=tokens,
                        error=err,
                        matches=err is None and text == refs[q],
                    )
                )

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    return records, time.perf_counter() - t0


async def kill_phase(url, args):
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as c:
        outs = await asyncio.gather(
            *(stream_once(c, QUESTIONS[i % len(QUESTIONS)], args.max_tokens, True) for i in range(args.kill))
        )
    return [o[3] for o in outs]


def pages_held(server: Server, timeout: float = 30.0) -> int:
    pool, t0 = server.engine.pool, time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pool.capacity - pool.num_available() == 0 and not server.loop.jobs:
            return 0
        time.sleep(0.1)
    return pool.capacity - pool.num_available()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kill", type=int, default=10, help="clients that drop their stream after the first chunk")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--out", default="runs")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)

    model = load_model("smollm2-135m", dtype=getattr(jnp, args.dtype))
    engine = Engine(model, EngineConfig(num_pages=2048, max_running=max(32, args.clients), max_seqs_per_step=32))
    server = Server(engine, ServerConfig(max_pending=4 * args.clients))
    with BackgroundServer(server) as url:
        print(f"server on {url}; references: each prompt alone ...", flush=True)
        refs = {}
        for q in QUESTIONS:
            text, _, _, err = asyncio.run(_alone(url, q, args))
            if err:
                raise SystemExit(f"reference request failed: {err}")
            refs[q] = text
        print(f"load: {args.clients} streaming clients for {args.seconds:.0f} s ...", flush=True)
        records, wall = asyncio.run(load_phase(url, refs, args))
        held_after_load = pages_held(server)
        print(f"kill: {args.kill} clients drop their streams after the first chunk ...", flush=True)
        kill_errors = asyncio.run(kill_phase(url, args))
        held_after_kill = pages_held(server)
        stats = engine.stats()

    ok = [r for r in records if r["error"] is None]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    result = dict(
        command="python -m spanjax.server.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
        clients=args.clients,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        wall_s=wall,
        requests=len(records),
        failed=len(records) - len(ok),
        errors=sorted({r["error"] for r in records if r["error"]})[:10],
        mismatched_vs_alone=sum(1 for r in ok if not r["matches"]),
        requests_per_s=len(ok) / wall,
        output_tokens_per_s=sum(r["tokens"] for r in ok) / wall,
        ttft_p50_s=statistics.median(ttfts) if ttfts else None,
        ttft_p99_s=pct(ttfts, 99),
        e2e_p50_s=statistics.median([r["e2e_s"] for r in ok]) if ok else None,
        pages_held_after_load=held_after_load,
        killed_clients=args.kill,
        killed_client_errors=[e for e in kill_errors if e],
        pages_held_after_kill=held_after_kill,
        engine=stats,
    )
    for k in (
        "requests",
        "failed",
        "mismatched_vs_alone",
        "requests_per_s",
        "output_tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "pages_held_after_load",
        "pages_held_after_kill",
    ):
        v = result[k]
        print(f"{k:>24}: {v:.3f}" if isinstance(v, float) else f"{k:>24}: {v}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.join(args.out, f"serve_bench-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json")]
    if args.write_docs:
        paths.append(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results", "serve_bench.json"))
    for path in paths:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print("wrote " + ", ".join(os.path.normpath(p) for p in paths))
    return 0 if result["failed"] == 0 and held_after_load == 0 and held_after_kill == 0 else 1


async def _alone(url, q, args):
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as c:
        return await stream_once(c, q, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
