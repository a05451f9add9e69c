"""Continuous batching over span plans: which tokens run in the next step.

A request is one `g`: a SpanPlan plus sampling parameters. Each of its spans is
encoded as its own ragged sequence whose block table lists the pages of the
spans it sees followed by its own pages (docs/design.md §3). A span may run once every
span it sees is fully written; plus siblings therefore run side by side. The
final span carries on into decoding: every generated token is appended to it.

Each step the scheduler
  1. admits waiting requests (FIFO) and resolves their cache hits page by page,
  2. schedules one token for every decoding request, then prefill chunks of
     runnable spans until the token budget or the sequence limit is reached,
  3. allocates pages for those tokens, preempting the most recently admitted
     request when the pool is full (its pages are released, registered ones
     stay cached, and it is recomputed later from its prompt and the tokens it
     already generated, so outputs do not change).

A prefill request (`Request(prefill=True)`) only writes its spans' K/V and publishes their pages;
it samples nothing and finishes, with reason "prefill", when its last span is written: the
executor encodes the part of a waiting g's prompt that is already known this way while the g's
it waits on generate (executor.QueryEvaluation.submit).

A plan with `reweight` (APE-style) gets per-entry logit scales and biases next to its block
tables (`SpanPlan.logit_weight` per listed span); a batch without such a plan carries none,
so it runs the plain step program.

Everything here is host-side numpy/python; the device step lives in runner.py.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Iterator

import numpy as np

from spanjax.engine.pages import PagePool, PoolExhausted
from spanjax.engine.sampling import SamplingParams
from spanjax.query.page_keys import chain_page_key
from spanjax.query.plan import SpanPlan


class RequestTooLarge(ValueError):
    """A request could never fit in the page pool, even alone."""


@dataclasses.dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


# Counters of speculative decoding, per request (Request.speculation) and per engine (Engine.spec_stats).
SPEC_COUNTERS = ("verify_forwards", "emitted", "drafted", "accepted", "other_candidate_won")


@dataclasses.dataclass
class Speculation:
    """A request's speculative-decoding state (engine/speculative.py); the plain step leaves it empty."""

    # Draft candidates [C][k] for the next step, from the last verified position; candidate 0 is the
    # speculator's greedy draft. Emptied on preemption and when the request finishes.
    draft: tuple[tuple[int, ...], ...] = ()
    stats: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPEC_COUNTERS, 0))


class Request:
    """One generation over a span plan; mutable scheduling state lives here."""

    _ids = itertools.count()

    def __init__(
        self,
        plan: SpanPlan,
        sampling: SamplingParams,
        *,
        span_adapter: tuple[int, ...] | None = None,
        keep_logits: bool = False,
        write_final_token: bool = False,
        prefill: bool = False,
    ):
        if prefill and (keep_logits or write_final_token):
            raise ValueError("a prefill request samples nothing: no keep_logits or write_final_token")
        for s in plan.spans:
            if len(s) == 0:
                raise ValueError(f"span {s.index} of the plan is empty")
            if any(b - a != 1 for a, b in zip(s.positions, s.positions[1:])):
                raise ValueError(f"span {s.index}: positions inside a span must be consecutive")
        self.id = next(Request._ids)
        self.plan = plan
        self.sampling = sampling
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        # The text of `generated` (cut before a stop string), decoded when read: decoding the whole
        # sequence at every token would cost O(n) per step (SmolLM2's tokenizer: ~130 us for 1,024
        # tokens, per request per step). Requests with stop strings decode at every token to find them.
        self._text, self._text_tokens, self._tokenizer = "", 0, None
        self.metrics = RequestMetrics(prompt_tokens=plan.num_tokens, arrival_s=time.perf_counter())
        self.keep_logits = keep_logits  # record the logits of every sampled token (tests, analysis)
        self.span_adapter = span_adapter  # adapter index per span (-1 = base); None = base model throughout
        # After finishing, compute the last sampled token's K/V too (one more step, nothing sampled)
        # before releasing, so a later query that re-sends this exchange (a nested g's outer
        # query) finds every one of its tokens cached, its final page included.
        self.write_final_token = write_final_token
        self.prefill = prefill  # write the plan's K/V into the cache and finish; sample nothing
        self.logits: list[np.ndarray] = []
        self.speculation = Speculation()
        self._reset()

    def _reset(self):
        n = len(self.plan.spans)
        self.span_pages: list[list[int]] = [[] for _ in range(n)]
        self.span_written = [0] * n
        self.admitted = False

    # -- token views --------------------------------------------------------

    @property
    def final(self) -> int:
        return len(self.plan.spans) - 1

    def span_tokens(self, j: int) -> tuple[int, ...]:
        toks = self.plan.spans[j].token_ids
        return toks + tuple(self.generated) if j == self.final else toks

    def span_length(self, j: int) -> int:
        """len(span_tokens(j)), without building the tuple."""
        return len(self.plan.spans[j]) + (len(self.generated) if j == self.final else 0)

    def span_position(self, j: int, i: int) -> int:
        pos = self.plan.spans[j].positions
        return pos[i] if i < len(pos) else pos[-1] + 1 + (i - len(pos))

    def span_remaining(self, j: int) -> int:
        return self.span_length(j) - self.span_written[j]

    def span_complete(self, j: int) -> bool:
        return self.span_remaining(j) == 0

    def all_spans_written(self) -> bool:
        """Every span of the plan is written (what a prefill request waits for)."""
        return all(self.span_complete(s.index) for s in self.plan.spans)

    def runnable_spans(self, completing: set[int] | frozenset[int] = frozenset()) -> Iterator[int]:
        """Spans that can be computed now: not complete, and every span they see complete or in
        `completing` (finished by the step being built: every layer writes the step's K/V before
        it attends, so a span may attend to one written in the same step, and a cold system
        prompt and the question after it cost one step, not two). Lazy and in index order (a
        span sees only earlier ones), so the caller may add to `completing` while iterating."""
        for s in self.plan.spans:
            if not self.span_complete(s.index) and all(self.span_complete(d) or d in completing for d in s.sees):
                yield s.index

    @property
    def decoding(self) -> bool:
        return (
            bool(self.generated)
            and all(self.span_complete(j) for j in range(self.final))
            and self.span_remaining(self.final) == 1
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_token(self, token: int, eos_token_ids: frozenset[int], tokenizer) -> None:
        """Append a sampled token and decide whether the request is done: an end-of-sequence id
        (unless `sampling.ignore_eos`), `max_tokens`, or a stop string (the text is cut before it)."""
        self.generated.append(token)
        if token in eos_token_ids and not self.sampling.ignore_eos:
            self.finish_reason = "eos"
        elif len(self.generated) >= self.sampling.max_tokens:
            self.finish_reason = "length"
        self._tokenizer = tokenizer
        if not self.sampling.stop:
            return
        text = tokenizer.decode(self.generated)
        for stop in self.sampling.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, self.finish_reason = text[:cut], "stop"
        self._text, self._text_tokens = text, len(self.generated)

    @property
    def text(self) -> str:
        """The generated text so far, cut before a stop string when one ended it."""
        n = len(self.generated)
        if n != self._text_tokens and self._tokenizer is not None:
            self._text, self._text_tokens = self._tokenizer.decode(self.generated[:n]), n
        return self._text

    def page_key(self, j: int, k: int, n: int) -> str:
        """Content key of page k of span j holding n tokens. Prompt pages use the
        plan's keys; pages of the final span that hold generated tokens extend the
        same chain, so a later plan that lowers this whole exchange computes them too."""
        span, ps = self.plan.spans[j], self.plan.page_size
        if j != self.final or (k + 1) * ps <= len(span) or (k * ps + n == len(span)):
            return span.page_keys[k]
        prev = (
            span.page_keys[k - 1]
            if k > 0 and k * ps <= len(span)
            else (self.page_key(j, k - 1, ps) if k > 0 else span.base_key)
        )
        return chain_page_key(prev, self.span_tokens(j)[k * ps : k * ps + n])

    def pages_needed_alone(self) -> int:
        ps = self.plan.page_size
        pages = sum(-(-len(s) // ps) for s in self.plan.spans[:-1])
        final = len(self.plan.spans[-1]) + (0 if self.prefill else self.sampling.max_tokens)
        return pages + -(-final // ps)

    def summary(self) -> dict:
        m = self.metrics
        decode_s = None if m.first_token_s is None or m.finish_s is None else m.finish_s - m.first_token_s
        n_dec = max(len(self.generated) - 1, 0)
        return {
            "prompt_tokens": m.prompt_tokens,
            "cached_tokens": m.cached_tokens,
            "generated_tokens": len(self.generated),
            "ttft_s": m.ttft_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": (n_dec / decode_s) if decode_s and n_dec else None,
            "preemptions": m.preemptions,
        }


@dataclasses.dataclass
class StepItem:
    request: Request
    span: int
    start: int  # first token (index within the span) computed this step
    count: int  # tokens computed this step, draft tokens included
    draft: tuple[int, ...] = ()  # speculative tokens appended after the span's known tokens (engine/speculative.py)
    # Pages this item's K/V goes to instead of the span's own, and which it attends to after the
    # span's written tokens; never committed (another candidate of a draft tree, speculative.py).
    scratch: tuple[int, ...] = ()
    # Its one token is what the previous step samples for this request, not yet on the host
    # (a pipelined decode step, `Scheduler.continue_decoding`).
    pending: bool = False

    @property
    def samples(self) -> bool:
        """This chunk ends the final span's known tokens: its last logits pick the next token."""
        r = self.request
        return (
            not r.finished
            and not r.prefill
            and self.span == r.final
            and self.start + self.count - len(self.draft) == r.span_length(r.final)
        )  # (a pending item: once its token is on the host, as when its step's results are read)


@dataclasses.dataclass
class StepBatch:
    items: list[StepItem]
    tokens: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    block_tables: np.ndarray  # [S, M]
    block_pos: np.ndarray  # [S, M]
    block_lens: np.ndarray  # [S, M]
    cu_q_lens: np.ndarray  # [S + 1]
    logits_indices: np.ndarray  # [S] last token of each item (index into T)
    adapter_ids: np.ndarray | None = None  # [T] adapter index per token (-1 = base weights)
    # [S, M] float32 per-entry logit scale / bias (SpanPlan.logit_weight); None when no request
    # in the batch re-weights (the plain step program)
    block_logit_scale: np.ndarray | None = None
    block_logit_bias: np.ndarray | None = None
    # [S] for a pipelined decode step: the previous step's row whose sampled token each item's
    # token is (`Scheduler.continue_decoding`); None when every token is on the host
    pending_src: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.cu_q_lens[-1])


class Scheduler:
    def __init__(self, pool: PagePool, max_tokens_per_step: int, max_seqs_per_step: int, max_running: int = 64):
        self.pool = pool
        self.max_tokens = max_tokens_per_step
        self.max_seqs = max_seqs_per_step
        self.max_running = max_running
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    # -- queue ----------------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.plan.page_size != self.pool.page_size:
            raise ValueError(f"plan page size {request.plan.page_size} != pool page size {self.pool.page_size}")
        need = request.pages_needed_alone()
        if need > self.pool.capacity:
            raise RequestTooLarge(
                f"request needs up to {need} KV pages (prompt {request.plan.num_tokens} tokens + max_tokens "
                f"{request.sampling.max_tokens}) but the pool has {self.pool.capacity}; raise engine num_pages"
            )
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- admission and cache hits ---------------------------------------------

    def _admit(self) -> None:
        if any(r.finished for r in self.running):  # still writing their last token (write_final_token)
            return  # the pages they are about to publish may be what a waiting request asks for
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            # Keep a margin so admitting does not immediately force preemption.
            if self.running and self.pool.num_available() < req.pages_needed_alone():
                break
            self.waiting.popleft()
            self._resolve_hits(req)
            if req.prefill and req.all_spans_written():
                self._retire_prefill(req)  # all of it was cached already
                continue
            req.admitted = True
            self.running.append(req)

    def _resolve_hits(self, req: Request) -> None:
        ps = self.pool.page_size
        cached = 0
        for span in req.plan.spans:
            is_final = span.index == req.final
            for k, key in enumerate(span.page_keys):
                # The final span owns its last prompt page: decoding appends there, and its last
                # token must be computed (its logits pick the first token) even when the page is full.
                if is_final and not req.prefill and (k + 1) * ps >= len(span):
                    break
                page = self.pool.lookup(key)
                if page is None:
                    break
                req.span_pages[span.index].append(page)
                n = min(ps, len(span) - k * ps)
                req.span_written[span.index] += n
                cached += n
        if req.metrics.first_token_s is None:  # count hits of the first admission only
            req.metrics.cached_tokens = cached
            self.pool.stats.hit_tokens += cached
            self.pool.stats.miss_tokens += req.plan.num_tokens - cached

    # -- preemption -------------------------------------------------------------

    def release(self, req: Request) -> None:
        for pages in req.span_pages:
            for p in pages:
                self.pool.release(p)
        req._reset()

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.release(victim)
        victim.metrics.preemptions += 1
        self.waiting.appendleft(victim)

    def abort(self, req: Request) -> bool:
        """Drop a waiting or running request now: its pages go back to the pool (pages it already
        published stay cached for others) and it finishes with reason "abort". False if it was
        neither waiting nor running (finished already, or never added); a finished request still
        writing its last token (`write_final_token`) is released without it and keeps its reason."""
        if req.finished:
            if req in self.running:
                self.running.remove(req)
                self.release(req)
            return False
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
            self.release(req)
        else:
            return False
        req.finish_reason = "abort"
        return True

    def finish(self, req: Request) -> None:
        self._register_final(req)
        self.running.remove(req)
        self.release(req)

    def _retire_prefill(self, req: Request) -> None:
        """A prefill request whose spans are all written: publish its last page, release it."""
        req.finish_reason = "prefill"
        req.metrics.finish_s = time.perf_counter()
        if req in self.running:
            self.finish(req)
        else:
            self.release(req)

    # -- building a step ------------------------------------------------------------

    def _ensure_pages(self, req: Request, span: int, upto: int) -> None:
        need = -(-upto // self.pool.page_size)
        pages = req.span_pages[span]
        while len(pages) < need:
            pages.append(self.pool.allocate())

    def schedule(self) -> StepBatch | None:
        self._admit()
        items: list[StepItem] = []
        # Decodes first (one token each), then prefill chunks, oldest request first.
        order = [r for r in self.running if r.decoding] + [r for r in self.running if not r.decoding]
        for req in order:
            completing: set[int] = set()
            for j in req.runnable_spans(completing):
                budget = self.max_tokens - sum(i.count for i in items)
                if req not in self.running or budget == 0 or len(items) == self.max_seqs:
                    break
                item = self._make_item(req, j, budget)
                if self._allocate_or_preempt(item, items):
                    items.append(item)
                    if item.count == req.span_remaining(j):
                        completing.add(j)
        self._extend(items)
        if not items:
            if self.running:
                raise RuntimeError("scheduler made no progress although requests are running")
            return None
        return self._build(items)

    def _make_item(self, req: Request, span: int, budget: int) -> StepItem:
        """The next chunk of `span` within `budget` tokens (a speculative scheduler adds drafts)."""
        return StepItem(req, span, req.span_written[span], min(req.span_remaining(span), budget))

    def _extend(self, items: list[StepItem]) -> None:
        """Add items once every request's next chunk is scheduled (the speculative scheduler's
        other draft candidates); nothing here."""

    def _allocate_or_preempt(self, item: StepItem, items: list[StepItem]) -> bool:
        """Give `item` its pages. When the pool is full, preempt the newest request
        that has nothing in this batch; failing that, preempt the item's own request."""
        req = item.request
        while True:
            try:
                self._ensure_pages(req, item.span, item.start + item.count)
                return True
            except PoolExhausted:
                in_batch = {id(i.request) for i in items}
                victims = [r for r in reversed(self.running) if r is not req and id(r) not in in_batch]
                if victims:
                    self._preempt(victims[0])
                    continue
                if len(self.running) == 1:
                    raise  # unreachable: add() checked that a lone request fits the pool
                items[:] = [i for i in items if i.request is not req]
                self._preempt(req)
                return False

    def continue_decoding(self, batch: StepBatch) -> StepBatch | None:
        """The decode step after `batch`, built before `batch`'s tokens reach the host (the host
        work of one step then overlaps the device work of the one before it): every request of
        `batch` is assumed to go on, its token to be the one `batch` samples for it. Rows of
        requests that `batch` finishes are dropped when the step's results are read
        (`live_items`); a request that finished wanting its last token written
        (`write_final_token`) gets exactly that write from its row.

        None, and the caller schedules as usual, unless `batch` is the whole running set decoding
        or sampling its first token, one item each, nothing waits for admission, and the pool
        has the pages without preempting: anything else (admissions, prefill chunks, drafts,
        preemption) goes through `schedule()`, which sees the tokens."""
        if self.waiting or len(batch.items) != len(self.running) or len(batch.items) > self.max_tokens:
            return None
        ps, items, new_pages = self.pool.page_size, [], 0
        for it in batch.items:
            req = it.request
            if not it.samples or it.draft or it.scratch or req.prefill or req not in self.running:
                return None
            if len(req.generated) + 1 >= req.sampling.max_tokens:
                continue  # `batch` samples its last token: a step for it would be wasted work
            start = req.span_length(req.final)  # `batch` is committed: everything before is written
            new_pages += start // ps >= len(req.span_pages[req.final])
            items.append(StepItem(req, req.final, start, 1, pending=True))
        if not items or new_pages > self.pool.num_available():
            return None
        for it in items:
            self._ensure_pages(it.request, it.span, it.start + 1)
        out = self._build(items)
        rows = {id(it.request): s for s, it in enumerate(batch.items)}
        out.pending_src = np.asarray([rows[id(it.request)] for it in items], np.int32)  # `batch`'s row of each
        return out

    def live_items(self, batch: StepBatch) -> list[int]:
        """Rows of `batch` whose request is still running (a pipelined step may hold rows of
        requests that finished or were aborted after it was built)."""
        running = {id(r) for r in self.running}
        return [s for s, it in enumerate(batch.items) if id(it.request) in running]

    def _build(self, items: list[StepItem]) -> StepBatch:
        ps = self.pool.page_size
        tokens, positions, slots, cu, adapter_ids = [], [], [], [0], []
        tables = []
        for it in items:
            req = it.request
            span_toks = req.span_tokens(it.span) + it.draft + ((0,) if it.pending else ())  # on the device
            own = req.span_pages[it.span]
            # A scratch item writes its tokens to its scratch pages and sees its span's written tokens.
            pages, first, own_len = (it.scratch, it.start, it.start) if it.scratch else (own, 0, it.start + it.count)
            for i in range(it.start, it.start + it.count):
                tokens.append(span_toks[i])
                positions.append(req.span_position(it.span, i))
                slots.append(pages[(i - first) // ps] * ps + (i - first) % ps)
            cu.append(cu[-1] + it.count)
            adapter_ids.extend([req.span_adapter[it.span] if req.span_adapter else -1] * it.count)
            # Block-table entries, a run of pages per span seen (then the item's own, then its scratch
            # pages): page, start position, valid tokens, (logit scale, bias). Positions inside a span
            # are consecutive, so a run is arithmetic: built with numpy, not entry by entry (a decode
            # step of 8 sequences over ~36 pages each spent ~0.3 ms here in Python).
            runs = []
            for d in req.plan.spans[it.span].sees + (it.span,):
                n_tok = req.span_length(d) if d != it.span else own_len
                w = req.plan.logit_weight(it.span, d)
                runs.append((req.span_pages[d][: -(-n_tok // ps)], req.span_position(d, 0), n_tok, w))
            if it.scratch:
                runs.append((it.scratch, req.span_position(it.span, it.start), it.count, (1.0, 0.0)))
            tables.append(runs)
        S = len(items)
        M = max(sum(len(r[0]) for r in runs) for runs in tables)
        bt = np.zeros((S, M), np.int32)
        bp = np.zeros((S, M), np.int32)
        bl = np.zeros((S, M), np.int32)
        reweight = any(it.request.plan.reweight is not None for it in items)
        scale = np.ones((S, M), np.float32) if reweight else None
        bias = np.zeros((S, M), np.float32) if reweight else None
        for s, runs in enumerate(tables):
            m = 0
            for pages, start, n_tok, w in runs:
                k = np.arange(len(pages))
                bt[s, m : m + len(pages)] = pages
                bp[s, m : m + len(pages)] = start + k * ps
                bl[s, m : m + len(pages)] = np.minimum(ps, n_tok - k * ps)
                if reweight:
                    scale[s, m : m + len(pages)], bias[s, m : m + len(pages)] = w
                m += len(pages)
        cu_arr = np.asarray(cu, np.int32)
        return StepBatch(
            items=items,
            tokens=np.asarray(tokens, np.int32),
            positions=np.asarray(positions, np.int32),
            slot_mapping=np.asarray(slots, np.int32),
            block_tables=bt,
            block_pos=bp,
            block_lens=bl,
            cu_q_lens=cu_arr,
            logits_indices=cu_arr[1:] - 1,
            adapter_ids=np.asarray(adapter_ids, np.int32),
            block_logit_scale=scale,
            block_logit_bias=bias,
        )

    # -- after the device step ---------------------------------------------------------

    def commit(self, batch: StepBatch, rows: list[int] | None = None) -> None:
        """Mark the batch's tokens written (of `rows` only, when given) and publish pages that
        became full."""
        ps = self.pool.page_size
        for it in batch.items if rows is None else [batch.items[s] for s in rows]:
            if it.scratch:
                continue
            req = it.request
            req.span_written[it.span] += it.count
            span = req.plan.spans[it.span]
            written = req.span_written[it.span]
            first_page, last_full = it.start // ps, written // ps
            for k in range(first_page, last_full):
                self._register_page(req, it.span, k, ps)
            if it.span != req.final and written == len(span) and written % ps:
                self._register_page(req, it.span, written // ps, written % ps)
        for req in {id(it.request): it.request for it in batch.items if it.request.prefill}.values():
            if not req.finished and req.all_spans_written():
                self._retire_prefill(req)

    def _register_page(self, req: Request, j: int, k: int, n: int) -> None:
        page = req.span_pages[j][k]
        if self.pool.pages[page].key is not None:
            return  # a cache hit, already published
        self.pool.register(page, req.page_key(j, k, n), req.span_position(j, k * self.pool.page_size), n)

    def _register_final(self, req: Request) -> None:
        """Publish the final span's last partial page so a later query that
        re-sends this exchange (a hoisted inner g) hits it too."""
        j, ps = req.final, self.pool.page_size
        written = req.span_written[j]
        if written % ps and written // ps < len(req.span_pages[j]):
            self._register_page(req, j, written // ps, written % ps)
