"""Speculative decoding with an MLP speculator (spanjax/models/speculator.py).

Every step that samples a token for a request also drafts the next k tokens
with the speculator, inside the same jitted function: from the base model's
final hidden state at the accepted position and the token just chosen. In the
next step a decoding request is scheduled with 1 + k tokens (its pending last
token, then the draft) as one ragged sequence among the others, prefill chunks
included, so the base model verifies all of them in one forward:

- logits are taken at all 1 + k positions and each is sampled exactly as a
  plain step would (greedy argmax, or the request's seed folded with the
  token's own step index), so the verifier's choice at position j is the token
  the non-speculative engine would emit there;
- the longest prefix of the draft that equals those choices is accepted, and
  the verifier's token after it is emitted too (1 .. k + 1 tokens per forward);
- the KV of rejected draft tokens stays in slots past the span's written
  length (the next step overwrites them) and pages holding only rejected
  tokens go back to the pool.

Outputs therefore equal the non-speculative engine's token for token (greedy
and seeded sampling alike, up to float rounding of the multi-token forward).
Preemption drops the draft; the request's recompute samples a new one.

Draft tree (`EngineConfig.speculative_candidates` = C > 1): the speculator
proposes C candidates, head 0's C most likely tokens each continued greedily.
Candidate 0 (the greedy draft) runs as above; each other candidate is one more
ragged sequence of the same 1 + k tokens whose K/V goes to scratch pages and
which sees the span's written tokens and its own, so all C branches are verified
in the same forward. They share the verifier's choice at the pending token, so
at most one branch accepts anything; when that is another candidate, its
accepted drafts' K/V are copied into the span's slots (`copy_slots`). Other
candidates only take free pages and the budget left after every request's
chunk, so they never preempt or evict anything; by default only the padding of
the step's token bucket, so the forward is no wider than without them.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.engine.runner import StepRunner
from spanjax.engine.sampling import SamplingRows
from spanjax.engine.scheduler import SPEC_COUNTERS, Request, Scheduler, StepBatch, StepItem
from spanjax.engine.step import StepPath, host_logits
from spanjax.models import llama
from spanjax.models import speculator as spec_model


class SpeculativeScheduler(Scheduler):
    def __init__(self, *args, num_draft: int, token_buckets: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_draft = num_draft
        # Other draft candidates may only fill the step up to its padded token bucket (None: up to
        # the token budget); see EngineConfig.speculative_tree_fill.
        self.token_buckets = token_buckets

    def _make_item(self, req: Request, span: int, budget: int) -> StepItem:
        item = super()._make_item(req, span, budget)
        tree = req.speculation.draft  # candidates [C][k]; candidate 0 is the greedy draft
        if tree and span == req.final and req.decoding:
            # Never draft past max_tokens: the request's pages were sized for prompt + max_tokens.
            k = min(len(tree[0]), self.num_draft, budget - 1, req.sampling.max_tokens - len(req.generated) - 1)
            if k > 0:
                return StepItem(req, span, item.start, 1 + k, tree[0][:k])
        return item

    def _extend(self, items: list[StepItem]) -> None:
        """The other candidates of the draft trees, second-best of every request first, while
        budget, sequences and free pages last."""
        ps = self.pool.page_size
        greedy = [i for i in items if i.draft]
        tokens = sum(i.count for i in items)
        cap = self.max_tokens
        if self.token_buckets is not None:
            cap = min(cap, next((b for b in self.token_buckets if b >= tokens), tokens))
        for c in range(1, max((len(i.request.speculation.draft) for i in greedy), default=0)):
            for it in [i for i in greedy if c < len(i.request.speculation.draft)]:
                need = -(-it.count // ps)
                if tokens + it.count > cap or len(items) == self.max_seqs or self.pool.num_free() < need:
                    return
                scratch = tuple(self.pool.allocate() for _ in range(need))
                draft = it.request.speculation.draft[c][: len(it.draft)]
                items.append(StepItem(it.request, it.span, it.start, it.count, draft, scratch))
                tokens += it.count

    def _preempt(self, victim: Request) -> None:
        victim.speculation.draft = ()
        super()._preempt(victim)

    def release_unneeded(self, req: Request) -> None:
        """Give back the final span's pages past its written tokens and the pending one."""
        j = req.final
        need = -(-(req.span_written[j] + 1) // self.pool.page_size)
        pages = req.span_pages[j]
        while len(pages) > need:
            self.pool.release(pages.pop())


class SpeculativeRunner(StepRunner):
    """The engine step plus verification of drafts and the speculator's next proposal."""

    def __init__(
        self, cfg, spec_cfg: spec_model.SpeculatorConfig, num_draft: int, num_candidates: int, *args, **kwargs
    ):
        super().__init__(cfg, *args, **kwargs)
        self.spec_cfg = spec_cfg
        self.num_draft = num_draft
        self.num_candidates = num_candidates
        self._spec_step = jax.jit(self._spec_step_impl, donate_argnums=(2,))
        self._copy_slots = jax.jit(_copy_slots, donate_argnums=(0,))

    def _spec_step_impl(
        self,
        params,
        spec_params,
        cache,
        tokens,
        positions,
        meta,
        rows,
        drafts,
        sampling: SamplingRows,
        adapter=None,
        adapter_ids=None,
    ):
        self.compile_count += 1
        hidden, cache = llama.forward_paged(
            params, self.cfg, tokens, positions, cache, meta, self._attention_impl, adapter, adapter_ids
        )
        S, K1 = rows.shape
        h = hidden[rows]  # [S, K+1, H]: the states after the pending token and after each draft token
        logits = llama.compute_logits(params, self.cfg, h)
        # Each position j of a row samples as a plain step would at that token: step index + j.
        chosen = sampling.repeat(K1).sample(logits.reshape(S * K1, -1)).reshape(S, K1)
        accepted = jnp.sum(jnp.cumprod(drafts == chosen[:, :-1], axis=1), axis=1)  # drafts padded with -1 never match
        r = jnp.arange(S)
        new_drafts = spec_model.propose(
            spec_params, self.spec_cfg, h[r, accepted], chosen[r, accepted], self.num_draft, self.num_candidates
        )
        return chosen, accepted, new_drafts, logits, cache

    def copy_slots(self, cache, src: list[int], dst: list[int]):
        """K/V of cache slots `src` copied to slots `dst` (padded to one shape: one compilation)."""
        n = self.max_seqs * self.num_draft
        pad = lambda x: np.asarray(list(x) + [-1] * (n - len(x)), np.int32)
        return self._copy_slots(cache, pad(src), pad(dst))

    def run_speculative(self, params, spec_params, cache, batch: StepBatch, adapter=None):
        """Returns (chosen [S, K+1], accepted [S], next draft trees [S, C, K], logits [S, K+1, V], cache)."""
        inputs, sampling, extra = self.padded_inputs(batch, adapter)
        tokens, positions, meta, _ = inputs
        S, K = len(sampling.steps), self.num_draft
        rows = np.zeros((S, K + 1), np.int32)
        drafts = np.full((S, K), -1, np.int32)
        for s, it in enumerate(batch.items):
            end, k = int(batch.cu_q_lens[s + 1]) - 1, len(it.draft)
            rows[s] = np.minimum(end - k + np.arange(K + 1), end)
            drafts[s, :k] = it.draft
        return self._spec_step(params, spec_params, cache, tokens, positions, meta, rows, drafts, sampling, *extra)


def _copy_slots(cache: llama.PagedKVCache, src, dst) -> llama.PagedKVCache:
    N, P = cache.num_pages, cache.page_size
    layers = N * jnp.arange(cache.num_layers)[:, None]  # every layer's row of page 0 (flat pool)
    rows = jnp.where(dst < 0, cache.k.shape[0], layers + dst // P)  # -1 = padding: out of range, dropped
    src_rows = layers + jnp.maximum(src, 0) // P

    def move(x):
        return x.at[rows, dst % P].set(x[src_rows, src % P], mode="drop")

    return cache.replace(k=move(cache.k), v=move(cache.v))


class SpeculativeStep(StepPath):
    """The engine step when a speculator is set: verify, accept, emit, rewind, draft."""

    scheduler: SpeculativeScheduler
    runner: SpeculativeRunner

    def __init__(
        self,
        scheduler: SpeculativeScheduler,
        runner: SpeculativeRunner,
        tokenizer,
        eos_token_ids: frozenset[int],
        spec_params: spec_model.DraftParams,
    ):
        super().__init__(scheduler, runner, tokenizer, eos_token_ids)
        self.spec_params = spec_params
        self.spec_stats = dict.fromkeys(SPEC_COUNTERS, 0)  # over every decoding request's verify forwards

    def stats(self) -> dict:
        return {"speculative": dict(self.spec_stats)}

    def run(self, params, cache, batch, adapter=None):
        chosen, accepted, new_drafts, logits, cache = self.runner.run_speculative(
            params, self.spec_params, cache, batch, adapter
        )
        chosen, accepted, new_drafts = np.asarray(chosen), np.asarray(accepted), np.asarray(new_drafts)
        now = time.perf_counter()
        logits = host_logits(batch, logits)
        ps = self.scheduler.pool.page_size
        # Each sampling request's own item, and the items of its other draft candidates.
        # (`samples` is read before tokens are appended.)
        sampling = [s for s, it in enumerate(batch.items) if it.samples and not it.scratch]
        others = collections.defaultdict(list)
        for s, it in enumerate(batch.items):
            if it.scratch:
                others[it.request.id].append(s)
        src, dst, done = [], [], []
        for s in sampling:
            it = batch.items[s]
            req = it.request
            decoding, k = bool(req.generated), len(it.draft)
            w = max([s] + others[req.id], key=lambda c: int(accepted[c]))  # ties: the greedy draft
            a = int(accepted[w])
            emitted = self.emit(req, chosen[w, : a + 1], None if logits is None else logits[w], now)
            if k:  # KV stays valid for the pending token and the accepted drafts emitted before a finish
                winner = batch.items[w]
                it.count, it.draft = emitted, winner.draft[: emitted - 1]
                # The pending token's K/V is the same in every branch: copy the accepted drafts'.
                for o in range(1, emitted if winner.scratch else 0):
                    src.append(winner.scratch[o // ps] * ps + o % ps)
                    dst.append(req.span_pages[it.span][(it.start + o) // ps] * ps + (it.start + o) % ps)
            spec = req.speculation
            spec.draft = () if req.finished else tuple(tuple(int(t) for t in c) for c in new_drafts[w])
            if decoding:
                for stats in (self.spec_stats, spec.stats):
                    stats["verify_forwards"] += 1
                    stats["emitted"] += emitted
                    stats["drafted"] += k
                    stats["accepted"] += a
                    stats["other_candidate_won"] += int(w != s)
            if req.finished:
                done.append(req)
        if src:
            cache = self.runner.copy_slots(cache, src, dst)
        self.scheduler.commit(batch)
        for it in batch.items:
            for page in it.scratch:
                self.scheduler.pool.release(page)
        for s in sampling:
            req = batch.items[s].request
            if req.finished:
                self.scheduler.finish(req)
            else:
                self.scheduler.release_unneeded(req)
        return cache, done
