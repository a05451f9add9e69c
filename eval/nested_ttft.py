"""Nested-generation TTFT (docs/evaluation.md): an outer g over a plus of n
inner g's, against the same engine run stock.

- span: `g(cross(system, plus(g_1 .. g_n), user(q)))` through the executor. The
  inner g's run as one batch; the outer prompt holds their exchanges as
  isolated plus children that hit the pages the inner generations left, so
  only the question (and the system prompt, once) is encoded for the outer.
- stock: the same inner g's run as one batch, then the outer prompt flat:
  `cross(system, user_1, assistant_1, ..., user_n, assistant_n, user(q))` as
  ordinary messages. Nothing beyond prefix caching is reused: the first
  exchange's tokens follow the system prompt here but not in the inner
  sequence, so the whole prompt is encoded.

The measured number is the outer request's TTFT: the outer wave's wall time
with outer_max_tokens=1 (lowering, scheduling, every step, the token on the
host), less the seconds JAX spent tracing and compiling in it (recorded apart as
compile_s, the raw wall time as ttft_wall_s); the engine's own first-token stamp
is recorded as engine_ttft_s. The wall time of the whole query (inner + outer)
is recorded too. The cache is cleared before every measurement so both variants
start cold; each trial uses fresh inner prompts (dev questions). One warm-up
trial per n compiles the shapes and is discarded.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

from spanjax.compilation import compile_seconds
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.executor import QueryEvaluation
from spanjax.eval import ttft_report
from spanjax.eval.experiment_config import EXPERIMENT_ENGINE
from spanjax.models.loading import load_model
from spanjax.query import ast as A
from spanjax.query.passes import prepare
from spanjax.runs import RunDir, append_items, load_items, machine, progress
from spanjax.tasks.data import DEV, nq_open_oracle

SYSTEM = "You are given several short answers written by assistants. Use them to answer the final question."
INNER_SYSTEM = "Answer in one short sentence."


@dataclasses.dataclass(frozen=True)
class NestedEval:
    fan_in: tuple[int, ...] = (1, 4, 8, 16, 32)  # n inner g's
    trials: int = 3  # measured trials per n (after one warm-up)
    inner_max_tokens: int = 24
    outer_max_tokens: int = 1  # TTFT only needs the first token
    positions: Literal["sequential", "parallel"] = "parallel"
    first_question: int = 1000  # dev questions used as inner prompts

    def __post_init__(self):
        if not self.fan_in or any(n < 1 for n in self.fan_in):
            raise ValueError("fan_in must be a non-empty list of n >= 1")
        if self.trials < 1 or self.inner_max_tokens < 1 or self.outer_max_tokens < 1:
            raise ValueError("trials, inner_max_tokens and outer_max_tokens must be >= 1")


@dataclasses.dataclass(frozen=True)
class NestedConfig:
    task: Literal["ttft_nested"] = "ttft_nested"
    name: str = "ttft_nested"
    model: str = "smollm2-135m"
    seed: int = 0
    out_dir: str = "runs"
    engine: EngineConfig = EXPERIMENT_ENGINE
    eval: NestedEval = NestedEval()


def inner_prompts(ev: NestedEval, n: int, trial: int) -> list[str]:
    """n distinct dev questions for (n, trial); trial -1 is the warm-up."""
    records = nq_open_oracle()
    # Trials of one n are 64 questions apart (n <= 64 keeps them disjoint); all stay in DEV.
    start = DEV.start + ev.first_question + ((trial + 1) * 64 + n) % 800
    if start + n > DEV.stop:
        raise ValueError(f"first_question={ev.first_question} leaves too few dev questions for n={n}")
    return [records[start + i]["question"] + "?" for i in range(n)]


def inner_g(model: str, prompt: str, ev: NestedEval, seed: int) -> A.G:
    return A.G(
        model,
        A.Cross((A.Message("system", INNER_SYSTEM), A.Message("user", prompt))),
        max_tokens=ev.inner_max_tokens,
        temperature=0.0,
        seed=seed,
    )


def outer_question(n: int) -> str:
    return f"Which of the {n} answers above is the most surprising, and why?"


def run_waves(engine, q: A.Query) -> list[tuple[float, float, list]]:
    """Evaluate a query with the executor's wave loop (`QueryEvaluation`), timing each wave
    end to end (lowering, scheduling, every step, results on the host). With
    outer_max_tokens=1 the last wave's time is the outer TTFT; timed here rather than read
    from request metrics so asynchronous dispatch cannot stamp the first token before its
    step has finished computing. Each wave: (seconds, of which tracing/compiling, requests)."""
    ev, waves = QueryEvaluation(prepare(q)), []
    while not ev.done:
        t0, c0 = time.perf_counter(), _compiling_s()
        reqs = ev.submit(engine, ev.lower(engine))
        engine.run_until_done(ev.outstanding())
        waves.append((time.perf_counter() - t0, _compiling_s() - c0, reqs))
        ev.collect(engine)
    return waves


def _compiling_s() -> float:
    s = compile_seconds()
    return s["trace_s"] + s["compile_s"]


def _outer_record(waves, t0: float) -> dict:
    """The outer wave's TTFT without the seconds JAX spent tracing and compiling in it: fresh
    inner prompts per trial can reach a step shape the warm-up did not (a wider page bucket),
    and its compilation (seconds) would otherwise land in one variant's median."""
    wall, compiling, reqs = waves[-1]
    m = reqs[0].metrics
    return {
        "ttft_s": wall - compiling,
        "ttft_wall_s": wall,
        "compile_s": compiling,
        "engine_ttft_s": m.ttft_s,
        "prompt_tokens": m.prompt_tokens,
        "cached_tokens": m.cached_tokens,
        "wall_s": time.perf_counter() - t0,
    }


def measure_span(engine, model: str, prompts: list[str], ev: NestedEval, seed: int) -> dict:
    t0 = time.perf_counter()
    inner = tuple(inner_g(model, p, ev, seed) for p in prompts)
    outer = A.G(
        model,
        A.Cross((A.Message("system", SYSTEM), A.Plus(inner), A.Message("user", outer_question(len(prompts))))),
        max_tokens=ev.outer_max_tokens,
        temperature=0.0,
        positions=ev.positions,
    )
    waves = run_waves(engine, outer)
    assert len(waves) == 2, "inner wave then outer wave"
    return _outer_record(waves, t0)


def measure_stock(engine, model: str, prompts: list[str], ev: NestedEval, seed: int) -> dict:
    t0 = time.perf_counter()
    ((_, _, inner),) = run_waves(engine, A.Par(tuple(inner_g(model, p, ev, seed) for p in prompts)))
    msgs = [A.Message("system", SYSTEM)]
    for p, r in zip(prompts, inner):
        msgs += [A.Message("user", p), A.Message("assistant", r.text)]  # re-tokenized text: ordinary messages
    msgs.append(A.Message("user", outer_question(len(prompts))))
    waves = run_waves(engine, A.G(model, A.Cross(tuple(msgs)), max_tokens=ev.outer_max_tokens, temperature=0.0))
    return _outer_record(waves, t0)


def run(cfg: NestedConfig, run_dir: RunDir, model=None) -> dict:
    ev, log = cfg.eval, run_dir.log
    model = load_model(cfg.model) if model is None else model
    engine = Engine(model, cfg.engine)
    done = {(r["key"][0], r["key"][1], r["key"][2]): r for r in load_items(run_dir).values()}
    total = len(ev.fan_in) * ev.trials * 2
    bar = progress(total, sum(1 for k in done if k[1] in ev.fan_in and k[2] < ev.trials), cfg.name)
    try:
        for n in ev.fan_in:
            if all(("span", n, t) in done and ("stock", n, t) in done for t in range(ev.trials)):
                continue
            for fn in (measure_span, measure_stock):  # warm-up: compile, discard
                engine.clear_cache()
                fn(engine, model.name, inner_prompts(ev, n, -1), ev, cfg.seed)
            for t in range(ev.trials):
                for v, fn in (("span", measure_span), ("stock", measure_stock)):
                    if (v, n, t) in done:
                        continue
                    engine.clear_cache()  # both variants start cold: inner generations included
                    rec = {"key": [v, n, t], **fn(engine, model.name, inner_prompts(ev, n, t), ev, cfg.seed)}
                    append_items(run_dir, [rec])
                    done[(v, n, t)] = rec
                    bar.update(1)
                    log.info(
                        "n=%d trial %d %s: ttft %.3fs (%d/%d cached)",
                        n,
                        t,
                        v,
                        rec["ttft_s"],
                        rec["cached_tokens"],
                        rec["prompt_tokens"],
                    )
    finally:
        bar.close()
    rows = ttft_report.summarize(ev.fan_in, done, "n")
    results = {
        "task": "ttft_nested",
        "name": cfg.name,
        "model": model.name,
        "positions": ev.positions,
        "machine": machine(),
        "engine": engine.stats(),
    }
    results = ttft_report.write_report(
        run_dir, results, rows, "n", "inner generations n", f"nested generation TTFT, {model.name}"
    )
    log.info("nested TTFT (median of %d):\n%s", ev.trials, results["table_markdown"])
    return results
