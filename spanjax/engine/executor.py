"""Execute whole span queries on an Engine (docs/design.md §1, Evaluation).

The query is prepared once (zip, repeat and map expanded, nested nodes
flattened, identical plus children deduplicated, inner g's hoisted), then
evaluated in waves (`QueryEvaluation`, the one wave loop): every g whose inputs
are ready runs in one engine batch, its result is substituted as an assistant
message carrying the exact generated ids, and the next wave follows. Hoisted
inner exchanges lower to the very tokens the inner generation's sequence holds,
so the outer query hits the pages it left. While a wave generates, the prompts of
the g's still waiting are encoded as far as they are known (their spans before the
first unevaluated inner g, e.g. an outer system prompt: prefill requests), so a
later wave computes only what depends on the generated text.

The engine serves one model: the `model` a g names is recorded, and the
engine's loaded model runs it (its name keys the cache).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from spanjax.engine.adapters import known_prefix_for_engine, lower_for_engine
from spanjax.engine.engine import Engine
from spanjax.engine.sampling import SamplingParams
from spanjax.engine.scheduler import Request
from spanjax.query import ast as A
from spanjax.query.passes import (
    GenResult,
    evaluation_order,
    feeds_a_prompt,
    prepare,
    prints,
    ready,
    substitute,
    value,
)
from spanjax.query.plan import SpanPlan
from spanjax.query.syntax import parse

log = logging.getLogger("spanjax.query")


@dataclasses.dataclass
class GenerationRecord:
    """Metrics of one evaluated g, in evaluation order."""

    model: str
    text: str
    token_ids: list[int]  # generated ids without the end-of-sequence token
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    ttft_s: float | None
    decode_tokens_per_s: float | None
    preemptions: int

    @classmethod
    def of(cls, model: str, request, eos_token_ids) -> GenerationRecord:
        """The record of a finished engine request (ids without end-of-sequence, as `spanjax generate`)."""
        s = request.summary()
        return cls(
            model=model,
            text=request.text,
            token_ids=[t for t in request.generated if t not in eos_token_ids],
            finish_reason=request.finish_reason,
            prompt_tokens=s["prompt_tokens"],
            cached_tokens=s["cached_tokens"],
            generated_tokens=s["generated_tokens"],
            ttft_s=s["ttft_s"],
            decode_tokens_per_s=s["decode_tokens_per_s"],
            preemptions=s["preemptions"],
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QueryResult:
    value: object  # text of the final g, or a list for par/plus at the top
    generations: list[GenerationRecord]
    wall_s: float

    @property
    def final(self) -> GenerationRecord | None:
        return self.generations[-1] if self.generations else None

    def to_json(self) -> dict:
        final = self.final
        out = {
            "value": self.value,
            "text": final.text if final else "",
            "prompt_tokens": final.prompt_tokens if final else 0,
            "cached_tokens": final.cached_tokens if final else 0,
            "ttft_s": final.ttft_s if final else None,
            "wall_s": self.wall_s,
            "generations": [g.to_json() for g in self.generations],
        }
        return out


def sampling_for(g: A.G) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=g.max_tokens if g.max_tokens is not None else defaults.max_tokens,
        temperature=g.temperature if g.temperature is not None else 0.0,
        top_p=g.top_p if g.top_p is not None else 1.0,
        seed=g.seed if g.seed is not None else 0,
        stop=g.stop,
    )


class QueryEvaluation:
    """One query evaluated wave by wave, without blocking: the one wave loop that `run_query`,
    the server's jobs and the TTFT benchmarks share.

        ev = QueryEvaluation(prepared_query)
        while not ev.done:
            reqs = ev.submit(engine, ev.lower(engine))   # or items lowered elsewhere
            ...step the engine until every request in reqs has finished...
            ev.collect(engine)                            # records, substitutes; next wave
        ev.value()

    `query=None` with `items` is a raw prompt (OpenAI completions): one wave of prepared
    (g=None, plan, sampling) items and no query value.
    """

    def __init__(self, query: A.Query | None, items: list | None = None):
        self.query = query
        self.num_waves = len(evaluation_order(query)) if query is not None else 1
        self.wave_index = 0
        self.wave: list[tuple[A.G | None, Request]] = []
        self.prefills: list[Request] = []  # the waiting g's known prompt spans, encoded during this wave
        self.records: list[GenerationRecord] = []
        self._items = items

    @property
    def done(self) -> bool:
        return self.wave_index >= self.num_waves

    @property
    def last_wave(self) -> bool:
        return self.wave_index == self.num_waves - 1

    def lower(self, engine: Engine) -> list[tuple[A.G | None, SpanPlan, SamplingParams]]:
        """The next wave lowered for `engine` (lowering all of it before submitting any, so a bad
        query fails before compute); a raw prompt's items as given."""
        if self._items is not None:
            items, self._items = self._items, None
            return items
        name, tok, ps = engine.model.name, engine.model.tokenizer, engine.config.page_size
        return [
            (g, lower_for_engine(g, tok, model=name, page_size=ps, adapters=engine.adapters), sampling_for(g))
            for g in ready(self.query)
        ]

    def submit(self, engine: Engine, items) -> list[Request]:
        """Submit a lowered wave; on failure, whatever was submitted is aborted."""
        # A g that feeds another g's prompt writes its last token before releasing its pages:
        # the outer query re-sends the exchange and then finds all of it cached.
        fed = feeds_a_prompt(self.query) if self.query is not None and engine.speculator is None else set()
        self.wave, self.prefills = [], []
        try:
            for g, plan, sampling in items:
                self.wave.append((g, engine.submit(plan, sampling, write_final_token=g in fed)))
            for plan in self._known_prefixes(engine, [plan for _, plan, _ in items]):
                self.prefills.append(engine.submit(plan, SamplingParams(max_tokens=1), prefill=True))
        except BaseException:
            self.abort(engine)
            raise
        return self.requests()

    def _known_prefixes(self, engine: Engine, wave_plans: list[SpanPlan]) -> list[SpanPlan]:
        """Plans of the known prompt spans of the g's in later waves, each prefix once, leaving
        out any that shares a page with this wave (the wave computes it; no double work)."""
        if self.query is None or self.last_wave:
            return []
        computed = {k for plan in wave_plans for s in plan.spans for k in s.page_keys}
        name, tok, ps = engine.model.name, engine.model.tokenizer, engine.config.page_size
        plans: dict[tuple[str, ...], SpanPlan] = {}
        for wave in evaluation_order(self.query)[1:]:
            for g in wave:
                plan = known_prefix_for_engine(g, tok, model=name, page_size=ps, adapters=engine.adapters)
                if plan is None:
                    continue
                keys = tuple(k for s in plan.spans for k in s.page_keys)
                if keys not in plans and computed.isdisjoint(keys):
                    plans[keys] = plan
        return list(plans.values())

    def requests(self) -> list[Request]:
        """The wave's generations, in the order of its g's."""
        return [r for _, r in self.wave]

    def outstanding(self) -> list[Request]:
        """Every request of the wave, prefills included: the wave is over when all have finished."""
        return self.requests() + self.prefills

    def abort(self, engine: Engine) -> None:
        for r in self.outstanding():
            if not r.finished:
                engine.abort(r)

    def collect(self, engine: Engine) -> None:
        """Record the finished wave and substitute its results; the next wave is then ready."""
        for g, r in self.wave:
            model = g.model if g is not None else engine.model.name
            self.records.append(GenerationRecord.of(model, r, engine.eos_token_ids))
        if self.query is not None:
            self.query = substitute(self.query, {g: GenResult(r.text, tuple(r.generated)) for g, r in self.wave})
        self.wave_index += 1

    def value(self):
        """The query's value (after the last wave); a raw prompt's text (or texts, for n > 1)."""
        if self.query is not None:
            return value(self.query)
        texts = [r.text for _, r in self.wave]
        return texts[0] if len(texts) == 1 else texts


def log_prints(parsed: A.Query) -> None:
    """Log a query's `print` messages (spnl prints them when it runs a query; their value is
    ''). Called on the parsed query: `prepare` copies a zip's first part, and its prints with it."""
    for message in prints(parsed):
        log.info("print: %s", message)


def run_query(engine: Engine, query: A.Query | str | bytes, *, optimize: bool = True) -> QueryResult:
    """Evaluate a query (AST or text in any of the three forms) to its value."""
    t0 = time.perf_counter()
    q = parse(query) if isinstance(query, (str, bytes)) else query
    log_prints(q)
    ev = QueryEvaluation(prepare(q) if optimize else q)
    while not ev.done:
        ev.submit(engine, ev.lower(engine))
        engine.run_until_done(ev.outstanding())
        ev.collect(engine)
    return QueryResult(value=ev.value(), generations=ev.records, wall_s=time.perf_counter() - t0)
