"""Execute whole span queries on an Engine (docs/design.md §1, Evaluation).

The query is prepared once (repeat expanded, nested nodes flattened, identical
plus children deduplicated, inner g's hoisted), then evaluated in waves: every
g whose inputs are ready runs in one engine batch, its result is substituted
as an assistant message carrying the exact generated ids, and the next wave
follows. Hoisted inner exchanges lower to the very tokens the inner
generation's sequence holds, so the outer query hits the pages it left.

The engine serves one model: the `model` a g names is recorded, and the
engine's loaded model runs it (its name keys the cache).
"""

from __future__ import annotations

import dataclasses
import time

from spanjax.engine.adapters import lower_for_engine
from spanjax.engine.engine import Engine
from spanjax.engine.sampling import SamplingParams
from spanjax.query import ast as A
from spanjax.query.passes import GenResult, feeds_a_prompt, prepare, ready, substitute, value
from spanjax.query.syntax import parse


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


def run_query(engine: Engine, query: A.Query | str | bytes, *, optimize: bool = True) -> QueryResult:
    """Evaluate a query (AST or text in any of the three forms) to its value."""
    t0 = time.perf_counter()
    q = parse(query) if isinstance(query, (str, bytes)) else query
    q = prepare(q) if optimize else q
    records: list[GenerationRecord] = []
    tok, name, ps = engine.model.tokenizer, engine.model.name, engine.config.page_size
    while wave := ready(q):
        # Lower every g before submitting any, so a bad query fails before compute.
        plans = [lower_for_engine(g, tok, model=name, page_size=ps, adapters=engine.adapters) for g in wave]
        # A g that feeds another g's prompt writes its last token before releasing its pages:
        # the outer query re-sends the exchange and then finds all of it cached.
        fed = feeds_a_prompt(q) if engine.speculator is None else set()
        reqs = [engine.submit(p, sampling_for(g), write_final_token=g in fed) for p, g in zip(plans, wave)]
        engine.run_until_done(reqs)
        records += [GenerationRecord.of(g.model, r, engine.eos_token_ids) for g, r in zip(wave, reqs)]
        q = substitute(q, {g: GenResult(r.text, tuple(r.generated)) for g, r in zip(wave, reqs)})
    return QueryResult(value=value(q), generations=records, wall_s=time.perf_counter() - t0)
