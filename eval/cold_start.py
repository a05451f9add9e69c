"""Compilation off the user's clock: one span query in two fresh processes, against a warm one.

    python -m spanjax.eval.cold_start                       # examples/rag.json, a fresh cache
    python -m spanjax.eval.cold_start --write-docs          # also docs/results/cold_start.{json,md}

Runs `spanjax query FILE --json` twice, each in a new process, sharing one empty cache
directory (`SPANJAX_COMPILATION_CACHE`): the first compiles and stores (XLA's persistent cache
and the engine's stored step programs), the second should compile nothing. Then, in this
process, runs the same query twice on one engine with its span cache cleared in between: the
second run is the warm TTFT (compiled, nothing cached). Reported: each process's TTFT, trace
and compile seconds and step compilations, and the second process's TTFT over the warm one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.executor import run_query
from spanjax.models.loading import load_model
from spanjax.query import syntax
from spanjax.runs import machine_record

ROOT = Path(__file__).resolve().parents[1]


def one_process(query: str, cache: str) -> dict:
    env = {**os.environ, "SPANJAX_COMPILATION_CACHE": cache, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "spanjax", "query", query, "--json"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    e = out["engine"]
    return {
        "ttft_s": out["ttft_s"],
        "wall_s": out["wall_s"],
        "trace_s": e["trace_s"],
        "compile_s": e["compile_s"],
        "compilations": e["compilations"],
        "programs_preloaded": e.get("programs_preloaded"),
        "preload_s": e.get("preload_s"),
        "text": out["text"],
    }


def warm_in_process(query: str) -> dict:
    q = syntax.parse(Path(query).read_bytes(), syntax.format_for_path(query))
    engine = Engine(load_model("smollm2-135m"), EngineConfig(num_pages=2048, compilation_cache="off"))
    first = run_query(engine, q)
    engine.clear_cache()  # compiled, but nothing cached: what a fresh process starts from
    second = run_query(engine, q)
    assert second.final.text == first.final.text
    return {"first_ttft_s": first.final.ttft_s, "ttft_s": second.final.ttft_s, "text": second.final.text}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--query", default=str(ROOT / "examples" / "rag.json"))
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spanjax-cold-") as cache:
        procs = [one_process(args.query, cache) for _ in range(2)]
    warm = warm_in_process(args.query)
    ratio = procs[1]["ttft_s"] / warm["ttft_s"]
    result = {
        "command": "python -m spanjax.eval.cold_start " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_record(),
        "query": os.path.relpath(args.query, ROOT),
        "first_process": procs[0],
        "second_process": procs[1],
        "warm_in_process": warm,
        "second_process_ttft_over_warm": ratio,
        "same_text": procs[0]["text"] == procs[1]["text"] == warm["text"],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if args.write_docs:
        out = ROOT / "docs" / "results"
        (out / "cold_start.json").write_text(json.dumps(result, indent=1) + "\n")
        p0, p1 = procs
        rows = [
            "| run | TTFT (s) | trace (s) | compile (s) | step compilations | programs preloaded (s) |",
            "|---|---|---|---|---|---|",
            f"| first process (empty cache) | {p0['ttft_s']:.3f} | {p0['trace_s']:.2f} | {p0['compile_s']:.2f} "
            f"| {p0['compilations']} | {p0['programs_preloaded']} ({p0['preload_s']:.2f}) |",
            f"| second process | {p1['ttft_s']:.3f} | {p1['trace_s']:.2f} | {p1['compile_s']:.2f} "
            f"| {p1['compilations']} | {p1['programs_preloaded']} ({p1['preload_s']:.2f}) |",
            f"| warm, in process (span cache cleared) | {warm['ttft_s']:.3f} | - | - | - | - |",
        ]
        stamp = datetime.date.today().isoformat()
        (out / "cold_start.md").write_text(
            "# Compilation off the user's clock\n\n"
            f"`{result['command']}` on {result['machine']['platform']}, {os.cpu_count()} CPUs, "
            f"JAX {jax.__version__}, {stamp}. The query: `{result['query']}` (SmolLM2-135M, fp32).\n\n"
            + "\n".join(rows)
            + f"\n\nSecond process TTFT / warm TTFT: **{ratio:.2f}x**. Trace and compile seconds are the query's "
            "(from the engine's construction on); the second process compiles the step programs the first one "
            "stored while the engine is built (persistent-cache reads, the last column), before the query. "
            "Same text in all three runs: " + ("yes" if result["same_text"] else "NO") + ".\n"
        )
    return result


if __name__ == "__main__":
    main()
