"""TTFT of invoking an intrinsic after a cached long context: aLoRA (base cache reused) vs LoRA.

    python -m spanjax.training.alora_ttft [--alora runs/alora_answerability/adapter]
        [--lora runs/lora_answerability/adapter] [--docs 14] [--reps 3] [--out runs/alora_ttft.json]

For each repetition a fresh ~2k-token context (held-out nq-open-oracle passages
+ question) is first answered by the base model (which caches its pages),
then the answerability intrinsic is invoked through the engine: the aLoRA
query hits every full base page before its invocation and computes only the
invocation onward; the LoRA query's pages key with its adapter, so it
recomputes the whole context. A warm-up round on another context compiles
the step shapes first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from spanjax import config as C
from spanjax.adapters import load_peft
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.executor import run_query
from spanjax.models.loading import load_model
from spanjax.query import ast as A
from spanjax.runs import machine
from spanjax.tasks.data import HELD_OUT, nq_open_oracle, passage_text
from spanjax.training.config import TrainConfig


def _context(data, start: int, docs: int) -> tuple[str, str]:
    body = "\n".join(f"Document {k + 1}: {passage_text(data[start + k])}" for k in range(docs))
    return body, data[start]["question"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alora", default="runs/alora_answerability/adapter")
    ap.add_argument("--lora", default="runs/lora_answerability/adapter")
    ap.add_argument("--config", default="configs/alora_answerability.yaml", help="for the invocation text")
    ap.add_argument("--docs", type=int, default=14)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="runs/alora_ttft.json")
    args = ap.parse_args(argv)
    cfg = C.load(TrainConfig, args.config)
    model = load_model(cfg.model)
    eng = Engine(model, EngineConfig(num_pages=1024, page_size=16, max_tokens_per_step=512, max_seqs_per_step=8))
    eng.register_adapter("answerability", load_peft(args.alora, model.cfg))
    eng.register_adapter("answerability-lora", load_peft(args.lora, model.cfg))
    if eng.adapters["answerability"].config.kind != "alora" or eng.adapters["answerability-lora"].config.kind != "lora":
        raise SystemExit("--alora must be an aLoRA adapter and --lora a LoRA adapter")
    data = nq_open_oracle()
    inv = A.Message(cfg.data.invocation_role, cfg.data.invocation)

    def one(start: int) -> dict:
        body, q = _context(data, start, args.docs)
        ctx = A.user(f"{body}\n\nQuestion: {q}?")
        out = {}
        for name, adapter, msgs in (
            ("base", None, (ctx,)),
            ("alora", "answerability", (ctx, inv)),
            ("lora", "answerability-lora", (ctx, inv)),
        ):
            g = A.G(model.name, A.Cross(msgs), max_tokens=2, temperature=0.0, adapter=adapter)
            r = run_query(eng, g).final
            out[name] = {
                "ttft_s": r.ttft_s,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "text": r.text,
            }
        return out

    base_q = HELD_OUT.start
    for w in (1, 2):  # warm-up: compile the step shapes on other contexts
        one(base_q + 600 - w * args.docs)
    rows = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        rows.append(one(base_q + rep * args.docs))
        print(
            json.dumps(
                {
                    "rep": rep,
                    **{
                        k: {kk: v[kk] for kk in ("ttft_s", "prompt_tokens", "cached_tokens")}
                        for k, v in rows[-1].items()
                    },
                    "wall_s": time.perf_counter() - t0,
                }
            ),
            flush=True,
        )
    med = {k: statistics.median(r[k]["ttft_s"] for r in rows) for k in ("base", "alora", "lora")}
    result = {
        "machine": machine(),
        "docs": args.docs,
        "reps": args.reps,
        "prompt_tokens": [r["alora"]["prompt_tokens"] for r in rows],
        "alora_cached_tokens": [r["alora"]["cached_tokens"] for r in rows],
        "lora_cached_tokens": [r["lora"]["cached_tokens"] for r in rows],
        "median_ttft_s": med,
        "speedup_lora_over_alora": med["lora"] / med["alora"],
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(
        json.dumps(
            {k: result[k] for k in ("prompt_tokens", "alora_cached_tokens", "median_ttft_s", "speedup_lora_over_alora")}
        )
    )
    return result


if __name__ == "__main__":
    main()
