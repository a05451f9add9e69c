"""RAG time-to-first-token (docs/evaluation.md): span query (documents in a
`plus`, cached) vs the same engine run stock (one flat causal prompt, ordinary
prefix caching), for k = each of `eval.docs` documents.

Both variants see the same system prompt, the same k documents (real Natural
Questions passages from the development split, each cut to about `doc_tokens`
tokens) and the same question. For each k the cache is cleared and the
documents are warmed by one earlier query of each variant; every measured trial
then *reorders* them, so the span query still hits every document page while
the stock prompt only shares the system prompt (and whatever document happens
to stay first) with what is cached. TTFT is the request's wall time with
max_tokens=1, end to end: lowering, scheduling, every engine step, the token on
the host. Compilation is excluded by the warm-up queries of the same shapes.

    spanjax run configs/ttft_rag.yaml eval.docs=[1,4,16] eval.trials=3
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.eval import ttft_report
from spanjax.eval.experiment_config import EXPERIMENT_ENGINE
from spanjax.eval.nested_ttft import run_waves
from spanjax.models.loading import load_model
from spanjax.query import ast as A
from spanjax.runs import RunDir, append_items, load_items, machine, progress
from spanjax.tasks.data import DEV, nq_open_oracle, passage_text

SYSTEM = "Answer the question using only the documents below. Be brief."


@dataclasses.dataclass(frozen=True)
class RagEval:
    docs: tuple[int, ...] = (1, 2, 4, 8, 16)  # k, one curve point each
    doc_tokens: int = 256
    trials: int = 3  # measured trials per k (after one warm-up query per variant)
    positions: Literal["sequential", "parallel"] = "parallel"

    def __post_init__(self):
        if not self.docs or any(k < 1 for k in self.docs) or self.doc_tokens < 1 or self.trials < 1:
            raise ValueError("docs (a non-empty list), doc_tokens and trials must be >= 1")


@dataclasses.dataclass(frozen=True)
class RagConfig:
    task: Literal["ttft_rag"] = "ttft_rag"
    name: str = "ttft_rag"
    model: str = "smollm2-135m"
    seed: int = 0
    out_dir: str = "runs"
    engine: EngineConfig = EXPERIMENT_ENGINE
    eval: RagEval = RagEval()


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


def questions(trials: int) -> list[str]:
    """Warm-up question first, then one per trial (dev questions, disjoint from the documents)."""
    return [r["question"] + "?" for r in nq_open_oracle()[DEV.start + 500 : DEV.start + 500 + trials + 1]]


def rag_g(model_name: str, docs: list[str], question: str, span: bool, positions: str) -> A.G:
    doc_msgs = tuple(A.Message("user", d) for d in docs)
    body = (A.Plus(doc_msgs),) if span else doc_msgs
    prompt = A.Cross((A.Message("system", SYSTEM),) + body + (A.Message("user", question),))
    return A.G(model_name, prompt, max_tokens=1, temperature=0.0, positions=positions)


def measure(engine, g: A.G) -> dict:
    ((wall, compiling, (req,)),) = run_waves(engine, g)
    m = req.metrics
    return {
        "ttft_s": wall - compiling,  # as nested_ttft: compilation is reported apart
        "ttft_wall_s": wall,
        "compile_s": compiling,
        "wall_s": wall,
        "engine_ttft_s": m.ttft_s,
        "prompt_tokens": m.prompt_tokens,
        "cached_tokens": m.cached_tokens,
    }


def run(cfg: RagConfig, run_dir: RunDir, model=None) -> dict:
    ev, log = cfg.eval, run_dir.log
    model = load_model(cfg.model) if model is None else model
    engine = Engine(model, cfg.engine)
    need = 2 * max(ev.docs) * (-(-(ev.doc_tokens + 32) // cfg.engine.page_size)) + 64  # both variants' pages, cached
    if need > cfg.engine.num_pages:
        raise ValueError(
            f"engine.num_pages={cfg.engine.num_pages} is too small for {max(ev.docs)} documents of "
            f"{ev.doc_tokens} tokens cached twice; need about {need}"
        )
    done = {tuple(r["key"]): r for r in load_items(run_dir).values()}
    qs = questions(ev.trials)
    bar = progress(len(ev.docs) * ev.trials * 2, sum(1 for k in done if k[1] in ev.docs and k[2] < ev.trials), cfg.name)
    try:
        for k in ev.docs:
            if all((v, k, t) in done for v in ttft_report.VARIANTS for t in range(ev.trials)):
                continue
            docs = make_documents(model.tokenizer, k, ev.doc_tokens)
            rng = np.random.default_rng([cfg.seed, k])
            engine.clear_cache()
            for span in (True, False):  # warm-up: compiles this k's shapes and caches the documents
                measure(engine, rag_g(model.name, [docs[i] for i in rng.permutation(k)], qs[0], span, ev.positions))
            for t in range(ev.trials):
                order = [int(i) for i in rng.permutation(k)]  # drawn even when resuming: same orders
                for v in ttft_report.VARIANTS:
                    if (v, k, t) in done:
                        continue
                    rec = {
                        "key": [v, k, t],
                        "order": order,
                        **measure(
                            engine, rag_g(model.name, [docs[i] for i in order], qs[t + 1], v == "span", ev.positions)
                        ),
                    }
                    append_items(run_dir, [rec])
                    done[(v, k, t)] = rec
                    bar.update(1)
                    log.info(
                        "k=%d trial %d %s: ttft %.3fs (%d/%d cached)",
                        k,
                        t,
                        v,
                        rec["ttft_s"],
                        rec["cached_tokens"],
                        rec["prompt_tokens"],
                    )
    finally:
        bar.close()
    rows = ttft_report.summarize(ev.docs, done, "k")
    results = {
        "task": "ttft_rag",
        "name": cfg.name,
        "model": model.name,
        "doc_tokens": ev.doc_tokens,
        "positions": ev.positions,
        "machine": machine(),
        "engine": engine.stats(),
    }
    results = ttft_report.write_report(
        run_dir,
        results,
        rows,
        "k",
        f"documents k (~{ev.doc_tokens} tokens each)",
        f"RAG TTFT, reordered cached documents, {model.name}",
    )
    log.info("RAG TTFT (median of %d):\n%s", ev.trials, results["table_markdown"])
    return results
