"""The engine step interface: run one scheduled batch, append the sampled tokens, retire requests.

The Engine holds one `StepPath` with the scheduler and the jitted runner it pairs with:

- `PlainStep` (here): one forward, one token for every sequence that samples;
- `SpeculativeStep` (spanjax/engine/speculative.py): one forward verifies every request's draft,
  emits 1 .. k + 1 tokens per request and drafts the next ones.

A path receives the model parameters, the device KV cache and the adapter bank explicitly and
returns the updated cache with the requests that finished; request state it changes is declared
on `Request` (scheduler.py). Sampling inputs come from `runner.sampling_rows` and token appending
from `Request.append_token` in both paths.
"""

from __future__ import annotations

import time

import numpy as np

from spanjax.engine.runner import StepRunner
from spanjax.engine.scheduler import Request, Scheduler, StepBatch
from spanjax.models.llama import PagedKVCache


class StepPath:
    """One engine step; subclasses implement `run`."""

    # A step dispatched ahead whose results `run(batch=None)` reads next (PlainStep's pipelined decode).
    in_flight = None

    def __init__(self, scheduler: Scheduler, runner: StepRunner, tokenizer, eos_token_ids: frozenset[int]):
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def run(self, params, cache: PagedKVCache, batch: StepBatch, adapter=None) -> tuple[PagedKVCache, list[Request]]:
        """Compute `batch` (adapter: an AdapterBank or None); returns (the cache, the requests that finished)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Counters this path adds to `Engine.stats()`."""
        return {}

    def emit(self, req: Request, tokens, logits: np.ndarray | None, now: float) -> int:
        """Append sampled `tokens` to `req` until it finishes; `logits` (host rows [len(tokens), V],
        needed only when the request keeps logits) go along. Returns how many were appended."""
        n = 0
        for j, token in enumerate(tokens):
            if req.keep_logits:
                req.logits.append(np.array(logits[j]))
            req.append_token(int(token), self.eos_token_ids, self.tokenizer)
            n += 1
            if req.finished:
                break
        if req.metrics.first_token_s is None:
            req.metrics.first_token_s = now
        if req.finished:
            req.metrics.finish_s = now
        return n


def host_logits(batch: StepBatch, logits) -> np.ndarray | None:
    """The step's logits on the host when a request in it keeps them (one transfer), else None."""
    return np.asarray(logits) if any(it.request.keep_logits for it in batch.items) else None


class PlainStep(StepPath):
    """One forward per step. With `pipeline`, steady decoding runs one step ahead: the next
    decode step is built and dispatched (its tokens taken on the device from this step's
    samples, `Scheduler.continue_decoding`) before this step's tokens are read, so the host's
    work for a step (scheduling, padding, the call, appending tokens) overlaps the device's
    work on the one before it instead of adding to it."""

    def __init__(self, *args, pipeline: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline

    def run(self, params, cache, batch, adapter=None):
        """`batch=None`: read the step dispatched ahead (`in_flight`)."""
        if batch is None:
            batch, next_ids, logits = self.in_flight
            self.in_flight = None
            rows = self.scheduler.live_items(batch)  # rows of requests that ended since are dropped
            self.scheduler.commit(batch, rows)
        else:
            next_ids, logits, cache = self.runner.run(params, cache, batch, adapter)
            self.scheduler.commit(batch)
            rows = range(len(batch.items))
        if self.pipeline:
            ahead = self.scheduler.continue_decoding(batch)
            # Its rows index this step's ids, so it runs in the same sequence bucket (a program per
            # pair of buckets would multiply the compilations); a smaller batch waits for schedule().
            if ahead is not None and self.runner.seq_bucket(len(ahead.items)) == next_ids.shape[0]:
                ahead_ids, ahead_logits, cache = self.runner.run(params, cache, ahead, adapter, prev_ids=next_ids)
                self.in_flight = (ahead, ahead_ids, ahead_logits)
        next_ids = np.asarray(next_ids)  # blocks until the step is computed (dispatch is async)
        now = time.perf_counter()
        logits = host_logits(batch, logits)
        finished = []
        for s in rows:
            it = batch.items[s]
            req = it.request
            if req.prefill:  # retired by commit once written
                continue
            if req.finished and req.span_complete(req.final):  # its last token is written now
                self.scheduler.finish(req)
                continue
            if not it.samples:
                continue
            self.emit(req, next_ids[s : s + 1], None if logits is None else logits[s : s + 1], now)
            if req.finished:
                finished.append(req)
                if not req.write_final_token:
                    self.scheduler.finish(req)
        return cache, finished
