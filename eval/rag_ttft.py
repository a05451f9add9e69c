"""RAG time-to-first-token: span query (documents in a `plus`, cached) vs the
same engine run stock (one flat causal prompt, ordinary prefix caching).

Both variants see the same system prompt, the same k documents (real
Natural Questions passages from the development split, each cut to about
`doc_tokens` tokens) and the same question. The documents are warmed by one
earlier query of each variant; every measured trial then *reorders* them, so
the span query still hits every document page while the stock prompt only
shares the system prompt with what is cached. TTFT is measured end to end:
lowering, scheduling and every engine step up to the first sampled token.
Compilation is excluded by warm-up runs of the same shapes.

    python -m eval.rag_ttft --docs 16 --doc-tokens 256 --trials 5

Writes runs/rag_ttft-<timestamp>/results.json and prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from eval.data import DEV, nq_open_oracle, passage_text
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.sampling import SamplingParams
from spanjax.models.loading import load_model
from spanjax.query import ast as A
from spanjax.query.lower import lower

SYSTEM = "Answer the question using only the documents below. Be brief."


def make_documents(tokenizer, k: int, doc_tokens: int, offset: int = 0) -> list[str]:
    """k documents of about `doc_tokens` tokens from consecutive dev passages."""
    records = nq_open_oracle()
    docs, i = [], DEV.start + offset
    while len(docs) < k:
        text = ""
        while len(tokenizer.encode(text)) < doc_tokens:
            text += passage_text(records[i]) + " "
            i += 1
        ids = tokenizer.encode(text)[:doc_tokens]
        docs.append("Document: " + tokenizer.decode(ids))
    return docs


def rag_g(model_name: str, docs: list[str], question: str, span: bool, positions: str) -> A.G:
    doc_msgs = tuple(A.Message("user", d) for d in docs)
    body = (A.Plus(doc_msgs),) if span else doc_msgs
    prompt = A.Cross((A.Message("system", SYSTEM),) + body + (A.Message("user", question),))
    return A.G(model_name, prompt, max_tokens=1, positions=positions)


def time_to_first_token(engine: Engine, g: A.G) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    plan = lower(g, engine.model.tokenizer, model=engine.model.name, page_size=engine.config.page_size)
    req = engine.submit(plan, SamplingParams(max_tokens=1))
    engine.run_until_done([req])
    return req.metrics.first_token_s - t0, req.metrics.prompt_tokens, req.metrics.cached_tokens


def run(model_name="smollm2-135m", k=16, doc_tokens=256, trials=5, positions="parallel", seed=0, out_root="runs", page_size=16, max_tokens_per_step=512):
    model = load_model(model_name)
    tok = model.tokenizer
    docs = make_documents(tok, k, doc_tokens)
    questions = [r["question"] + "?" for r in nq_open_oracle()[DEV.start + 500 : DEV.start + 500 + trials + 1]]
    need = (k * (doc_tokens + 32)) // page_size * 4 + 256
    engine = Engine(model, EngineConfig(num_pages=need, page_size=page_size, max_tokens_per_step=max_tokens_per_step, max_seqs_per_step=k + 2))
    rng = np.random.default_rng(seed)

    # Warm-up: compiles every shape bucket both variants use and caches the documents.
    for span in (True, False):
        time_to_first_token(engine, rag_g(model.name, list(rng.permutation(docs)), questions[0], span, positions))
    print(f"warm-up done ({engine.runner.compile_count} compilations)", flush=True)

    rows = []
    for t, q in enumerate(questions[1 : trials + 1]):
        order = [int(i) for i in rng.permutation(k)]
        shuffled = [docs[i] for i in order]
        row = {"trial": t, "order": order}
        for name, span in (("span", True), ("stock", False)):
            ttft, prompt, cached = time_to_first_token(engine, rag_g(model.name, shuffled, q, span, positions))
            row[name] = {"ttft_s": ttft, "prompt_tokens": prompt, "cached_tokens": cached}
        rows.append(row)
        print(f"trial {t}: span {row['span']['ttft_s']:.3f}s ({row['span']['cached_tokens']}/{row['span']['prompt_tokens']} cached)  "
              f"stock {row['stock']['ttft_s']:.3f}s ({row['stock']['cached_tokens']}/{row['stock']['prompt_tokens']} cached)", flush=True)

    span_med = statistics.median(r["span"]["ttft_s"] for r in rows)
    stock_med = statistics.median(r["stock"]["ttft_s"] for r in rows)
    summary = {
        "model": model.name,
        "docs": k,
        "doc_tokens": doc_tokens,
        "positions": positions,
        "trials": trials,
        "span_ttft_median_s": span_med,
        "stock_ttft_median_s": stock_med,
        "speedup": stock_med / span_med,
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "engine": engine.stats(),
    }
    out = Path(out_root) / f"rag_ttft-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, "trials": rows}, indent=2))
    print(f"\nRAG TTFT, {k} docs x ~{doc_tokens} tokens, {positions} positions, median of {trials}:")
    print(f"  span query : {span_med * 1000:8.1f} ms")
    print(f"  stock      : {stock_med * 1000:8.1f} ms")
    print(f"  ratio      : {stock_med / span_med:8.1f}x   -> {out / 'results.json'}")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--doc-tokens", type=int, default=256)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--positions", choices=["sequential", "parallel"], default="parallel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    a = p.parse_args(argv)
    run(a.model, a.docs, a.doc_tokens, a.trials, a.positions, a.seed, a.out)


if __name__ == "__main__":
    main()
