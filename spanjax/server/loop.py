"""One engine, one stepping thread, many requests.

The jitted step blocks, so it never runs on the event loop: `EngineLoop` owns a thread that is
the only code touching the `Engine` (submit, step, abort, stats). HTTP handlers hand it `Job`s
through a thread-safe queue; a job reports back to its handler through a `Sink`, whose
callbacks the loop thread schedules onto the handler's asyncio loop with
`loop.call_soon_threadsafe` (token deltas, then one final result or error).

A `Job` evaluates one span query wave by wave with `executor.QueryEvaluation`, the loop
`run_query` runs, but without blocking: its first wave comes lowered from the handler (so a bad
query fails before it reaches the loop), each later wave is lowered here when the previous one is done.
The g's of the last wave are the job's outputs ("choices"); their text is streamed as deltas.
An exception while lowering or submitting one job fails that job alone (its requests are
aborted, their pages released); an exception inside `engine.step()` cannot be pinned on one
request, so every job with a request in the engine fails and the loop carries on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

from spanjax.engine.adapters import AdapterError
from spanjax.engine.engine import Engine
from spanjax.engine.executor import GenerationRecord, QueryEvaluation
from spanjax.engine.sampling import SamplingParams
from spanjax.engine.scheduler import Request, RequestTooLarge
from spanjax.query import ast as A
from spanjax.query.errors import SpanQueryError
from spanjax.query.plan import SpanPlan

log = logging.getLogger("spanjax.server")

# Exceptions that are the client's fault: a 400 for that request.
CLIENT_ERRORS = (SpanQueryError, AdapterError, RequestTooLarge, ValueError)


class JobError(Exception):
    """A job failed; `status` is the HTTP status its handler answers with."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_for(exc: BaseException) -> JobError:
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, CLIENT_ERRORS):
        return JobError(400, " ".join(str(exc).split())[:2000])
    return JobError(500, f"internal error: {type(exc).__name__}: {str(exc)[:500]}", "internal_error")


class Sink:
    """Where a job's progress goes (called on the loop thread; implementations must not block)."""

    def delta(self, index: int, text: str) -> None: ...

    def done(self, result: JobResult) -> None: ...

    def error(self, err: JobError) -> None: ...


@dataclasses.dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int


@dataclasses.dataclass
class JobResult:
    value: object
    choices: list[Choice]  # the g's of the last wave, in order
    generations: list[GenerationRecord]  # every g, in evaluation order

    def usage(self, choices_per_prompt: int | None = None) -> dict:
        """OpenAI usage. Over every generation of a query; with `choices_per_prompt` (OpenAI
        requests: n choices of each prompt, as OpenAI counts them) each prompt counts once."""
        gens = self.generations
        if choices_per_prompt and self.choices:
            firsts = self.choices[::choices_per_prompt]
            prompt, cached = sum(c.prompt_tokens for c in firsts), sum(c.cached_tokens for c in firsts)
            completion = sum(c.generated_tokens for c in self.choices)
        else:
            prompt, cached = sum(g.prompt_tokens for g in gens), sum(g.cached_tokens for g in gens)
            completion = sum(g.generated_tokens for g in gens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


class _Streamer:
    """Text deltas of one request that are final: never retracted by a later token (a stop string
    cuts the text; a token may end inside a UTF-8 character and decode to U+FFFD)."""

    def __init__(self, holdback: int):
        self.sent = 0
        self.holdback = holdback  # longest stop string - 1

    def delta(self, req: Request) -> str:
        text = req.text
        end = len(text)
        if not req.finished:
            end -= self.holdback
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent : end], end
        return out


class Job:
    """One query in evaluation (`executor.QueryEvaluation`, the wave loop `run_query` runs, here
    driven by the stepping thread). `query` is the prepared AST (passes.prepare), `first` its
    first wave lowered: [(g, plan, sampling)]. A raw-prompt completion has no query: `first` alone."""

    def __init__(
        self,
        query: A.Query | None,
        first: list[tuple[A.G | None, SpanPlan, SamplingParams]],
        sink: Sink,
        stream: bool = True,
    ):
        self.eval = QueryEvaluation(query, first if query is None else None)
        self.first = first if query is not None else None
        self.stream = stream  # send text deltas of the last wave
        self.sink = sink
        self.streamers: list[_Streamer] = []
        self.closed = False
        self.created_s = time.perf_counter()

    def requests(self) -> list[Request]:
        return self.eval.requests()

    # -- on the loop thread -----------------------------------------------------------

    def submit_wave(self, engine: Engine) -> None:
        items, self.first = (self.first, None) if self.first is not None else (self.eval.lower(engine), None)
        reqs = self.eval.submit(engine, items)
        holdback = lambda s: max((len(x) for x in s.stop), default=1) - 1  # noqa: E731
        self.streamers = [_Streamer(holdback(r.sampling)) for r in reqs]

    def abort(self, engine: Engine) -> None:
        self.eval.abort(engine)

    def progress(self, engine: Engine, on_finish: Callable[[Request], None]) -> bool:
        """Stream what is new, move to the next wave when this one is done. True when the job is over."""
        ev = self.eval
        if ev.last_wave and self.stream:
            for i, (r, st) in enumerate(zip(ev.requests(), self.streamers)):
                d = st.delta(r)
                if d:
                    self.sink.delta(i, d)
        if not all(r.finished for r in ev.outstanding()):
            return False
        for r in ev.requests():
            on_finish(r)
        last = ev.last_wave
        ev.collect(engine)
        if last:
            choices = [
                Choice(i, r.text, r.finish_reason, r.metrics.prompt_tokens, r.metrics.cached_tokens, len(r.generated))
                for i, r in enumerate(ev.requests())
            ]
            self.sink.done(JobResult(ev.value(), choices, ev.records))
            return True
        self.submit_wave(engine)
        return False


@dataclasses.dataclass
class Snapshot:
    """Engine state for /metrics and /health, written by the loop thread after every step."""

    running: int = 0
    waiting: int = 0
    pages_total: int = 0
    pages_used: int = 0
    pages_cached: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    compilations: int = 0
    steps: int = 0
    jobs: int = 0


class EngineLoop:
    """The stepping thread. `submit(job)` and `abort(job)` may be called from any thread."""

    def __init__(self, engine: Engine, on_finish: Callable[[Request], None] = lambda r: None):
        self.engine = engine
        self.on_finish = on_finish  # per finished request, on the loop thread (metrics)
        self.inbox: queue.Queue = queue.Queue()
        self.jobs: list[Job] = []
        self.snapshot = Snapshot()
        self.step_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spanjax-engine-loop", daemon=True)
        self._publish()

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop after the running jobs finish (drain); jobs still queued after `timeout` are failed."""
        self.inbox.put(("stop", None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(5.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self.inbox.put(("submit", job))

    def abort(self, job: Job) -> None:
        self.inbox.put(("abort", job))

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the loop thread between two steps (adapter loads and unloads:
        nothing else may touch the engine while a step runs); its result or exception lands in
        the returned future. A stopped loop fails the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            fut.set_exception(JobError(503, "the engine loop is not running", "unavailable"))
        else:
            self.inbox.put(("call", (fn, fut)))
        return fut

    # -- the thread ------------------------------------------------------------------

    def _fail(self, job: Job, exc: BaseException) -> None:
        if job.closed:
            return
        job.closed = True
        try:
            job.abort(self.engine)
        except Exception:  # noqa: BLE001  (the loop must survive; the job is failed either way)
            log.exception("aborting a failed job")
        if job in self.jobs:
            self.jobs.remove(job)
        err = error_for(exc)
        if err.status >= 500:
            log.error("request failed: %s", err.message, exc_info=exc)
        job.sink.error(err)

    def _command(self, kind: str, job) -> bool:
        if kind == "stop":
            return True
        if kind == "submit":
            try:
                job.submit_wave(self.engine)
                self.jobs.append(job)
            except Exception as e:  # noqa: BLE001
                self._fail(job, e)
        elif kind == "call":
            fn, fut = job
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:  # noqa: BLE001  (the caller gets it; the loop carries on)
                fut.set_exception(e)
        elif kind == "abort" and not job.closed:
            self._fail(job, JobError(499, "request aborted (client gone or timed out)", "aborted"))
        return False

    def _run(self) -> None:
        stopping = False
        while not self._stop.is_set():
            idle = not self.engine.has_work()
            if stopping and idle and not self.jobs:
                break
            try:
                cmd = self.inbox.get(timeout=0.05) if idle else self.inbox.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if self._command(*cmd):
                    stopping = True
                try:
                    cmd = self.inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as e:  # noqa: BLE001  (not one request's fault: fail those in the engine)
                    self.step_errors += 1
                    log.exception("engine step failed")
                    for job in list(self.jobs):
                        self._fail(job, e)
            for job in list(self.jobs):
                try:
                    if job.progress(self.engine, self.on_finish):
                        job.closed = True
                        self.jobs.remove(job)
                except Exception as e:  # noqa: BLE001
                    self._fail(job, e)
            self._publish()
        # Stopped: fail whatever is left (a forced stop, or jobs queued after the stop command).
        for job in list(self.jobs):
            self._fail(job, JobError(503, "server shutting down", "unavailable"))
        while True:
            try:
                kind, job = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                job.sink.error(JobError(503, "server shutting down", "unavailable"))
            elif kind == "call":
                job[1].set_exception(JobError(503, "server shutting down", "unavailable"))
        self._publish()

    def _publish(self) -> None:
        e = self.engine
        pool, sched, st = e.pool, e.scheduler, e.pool.stats
        self.snapshot = Snapshot(
            running=len(sched.running),
            waiting=len(sched.waiting),
            pages_total=pool.capacity,
            pages_used=pool.capacity - pool.num_available(),
            pages_cached=pool.num_cached(),
            hit_tokens=st.hit_tokens,
            miss_tokens=st.miss_tokens,
            compilations=e.runner.compile_count,
            steps=e.steps,
            jobs=len(self.jobs),
        )
