"""Speculative decoding benchmark: tokens per verification forward and decode tokens/s,
with and without the speculator, measured in one run on held-out text.

Prompts are chat prompts of held-out nq-open-oracle questions (2000.., never
trained on); the model answers them greedily (until its end of turn or
`--max-tokens`). For each batch size the same prompts run through two engines
over the same model, one plain and one with the speculator, alternating batch
by batch so both see the same machine load (with several
`--speculative-candidates`, one speculative engine per draft-tree size):

- tokens per verification forward = tokens emitted in decode steps / decode
  steps of a request (accepted draft tokens + the verifier's own token);
- decode tokens/s = decode tokens (all but each request's first) / decode
  wall time (first token of the batch to its last token), summed over batches;
- ms per decode step of each engine and their ratio (what a verification step
  costs relative to a plain one: speedup = tokens per forward / that ratio);
- outputs must be identical token for token (greedy); mismatches are counted.

  python -m spanjax.eval.speculative_bench --speculator runs/speculator_smollm2/speculator
  python -m spanjax.eval.speculative_bench --batch-sizes 1 4 --num-prompts 16 --max-tokens 128
  python -m spanjax.eval.speculative_bench --speculative-candidates 1 3   # greedy draft and a 3-candidate tree, one run

Writes runs/speculative_bench-<timestamp>/results.json. Compile time is excluded
(one warm-up batch per engine and batch size).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.sampling import SamplingParams
from spanjax.models.loading import load_model
from spanjax.models.speculator import load_hf
from spanjax.query import ast as A
from spanjax.query.lower import lower
from spanjax.runs import cpu_model
from spanjax.tasks.data import HELD_OUT, nq_open_oracle


def _prompts(model, first: int, n: int):
    rows = nq_open_oracle()
    idx = [i for i in range(first, first + n)]
    assert all(i in HELD_OUT for i in idx), "the benchmark reads held-out questions only"
    return [
        lower(
            A.G(model.name, A.Cross((A.Message("user", rows[i]["question"]),))),
            model.tokenizer,
            model=model.name,
            page_size=16,
        )
        for i in idx
    ]


def _run_batch(engine, plans, sampling):
    """-> (requests, decode tokens, decode seconds, wall seconds, decode steps). The batch's
    prompts fit one prefill step, which emits the first tokens; every later step decodes."""
    t0, steps0 = time.perf_counter(), engine.steps
    reqs = engine.generate(plans, sampling)
    first = min(r.metrics.first_token_s for r in reqs)
    last = max(r.metrics.finish_s for r in reqs)
    return (
        reqs,
        sum(len(r.generated) - 1 for r in reqs),
        last - first,
        time.perf_counter() - t0,
        engine.steps - steps0 - 1,
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--speculator", default="runs/speculator_smollm2/speculator", help="HF MLPSpeculator directory")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--num-prompts", type=int, default=16, help="held-out questions per batch size")
    ap.add_argument("--first-question", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=0, help="0 = the speculator's n_predict")
    ap.add_argument(
        "--speculative-candidates",
        type=int,
        nargs="+",
        default=[1],
        help="draft-tree sizes to measure (one speculative engine each, 1 = the greedy draft)",
    )
    ap.add_argument("--out-dir", default="runs")
    args = ap.parse_args(argv)

    model = load_model(args.model)
    spec = load_hf(args.speculator)
    sampling = SamplingParams(max_tokens=args.max_tokens)
    plans = _prompts(model, args.first_question, args.num_prompts)
    warm = _prompts(model, 2654 - max(args.batch_sizes), max(args.batch_sizes))  # warm-up prompts, not measured
    results = {
        "model": args.model,
        "speculator": args.speculator,
        "speculator_config": dataclasses.asdict(spec.config),
        "max_tokens": args.max_tokens,
        "questions": [args.first_question, args.first_question + args.num_prompts],
        "machine": f"{cpu_model()}, {os.cpu_count()} cpus, {platform.platform()}",
        "load_average_start": os.getloadavg(),
        "cases": [],
    }
    for B in args.batch_sizes:
        # room for every candidate of every request in each step
        ec = EngineConfig(
            num_pages=64 * B + 64,
            page_size=16,
            max_tokens_per_step=256,
            max_seqs_per_step=B * max(args.speculative_candidates),
            max_running=B,
            num_speculative_tokens=args.num_speculative_tokens,
        )
        engines = {"plain": Engine(model, ec)}
        for c in args.speculative_candidates:
            engines[f"speculative_{c}"] = Engine(
                model, dataclasses.replace(ec, speculative_candidates=c), speculator=spec
            )
        for e in engines.values():  # compile every block-table width the measured batches can reach
            _run_batch(e, warm[:B], SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
            e.clear_cache()
            if e.speculator is not None:
                e.spec_stats.update(dict.fromkeys(e.spec_stats, 0))  # warm-up not counted
        tot = {k: {"tokens": 0, "decode_s": 0.0, "wall_s": 0.0, "steps": 0, "outputs": []} for k in engines}
        for b in range(0, len(plans), B):
            for name, e in engines.items():
                reqs, n, dt, wall, steps = _run_batch(e, plans[b : b + B], sampling)
                e.clear_cache()  # no cross-batch prefix reuse: both engines start cold each batch
                t = tot[name]
                t["tokens"] += n
                t["decode_s"] += dt
                t["wall_s"] += wall
                t["steps"] += steps
                t["outputs"].extend(r.generated for r in reqs)
        for c in args.speculative_candidates:
            name = f"speculative_{c}"
            st = engines[name].spec_stats
            case = {
                "batch_size": B,
                "speculative_candidates": c,
                "tokens_per_verification_forward": st["emitted"] / max(st["verify_forwards"], 1),
                "draft_acceptance": st["accepted"] / max(st["drafted"], 1),
                "speculative_stats": dict(st),
                "identical_outputs": sum(a == b for a, b in zip(tot["plain"]["outputs"], tot[name]["outputs"])),
                "num_prompts": len(plans),
            }
            for key, t in (("plain", tot["plain"]), ("speculative", tot[name])):
                case[key] = {
                    "decode_tokens": t["tokens"],
                    "decode_s": t["decode_s"],
                    "decode_tokens_per_s": t["tokens"] / t["decode_s"],
                    "wall_s": t["wall_s"],
                    "decode_steps": t["steps"],
                    "ms_per_decode_step": 1e3 * t["decode_s"] / max(t["steps"], 1),
                }
            case["decode_speedup"] = case["speculative"]["decode_tokens_per_s"] / case["plain"]["decode_tokens_per_s"]
            # speedup = tokens per forward / this ratio (the price of verifying the drafts and proposing the next)
            case["verify_step_cost_ratio"] = (
                case["speculative"]["ms_per_decode_step"] / case["plain"]["ms_per_decode_step"]
            )
            results["cases"].append(case)
            print(json.dumps({k: v for k, v in case.items() if k != "speculative_stats"}))
    results["load_average_end"] = os.getloadavg()
    out = Path(args.out_dir) / f"speculative_bench-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
