"""Simple batched generator over the dense (non-paged) KV cache.

This is the reference generator: no span cache, no scheduler. A batch of
prompts is right-padded and prefilled in one call, then decoded one token per
jitted step with the cache donated (updated in place). Shapes are bucketed to
powers of two, so compiles are bounded: one prefill per (batch, prompt, cache)
bucket and one decode step per (batch, cache) bucket.

Stopping happens on the host after each step (eos ids, stop strings,
max_tokens, context length). The next step is dispatched before the previous
step's tokens are read back, so host checks overlap device work; at most one
extra step is computed and discarded at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.engine.sampling import SamplingParams, sample_tokens, sampling_arrays
from spanjax.models.config import ModelConfig
from spanjax.models.llama import Params, compute_logits, forward_dense, init_dense_cache

FinishReason = Literal["stop", "length", "eos"]
MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens; an eos token is not included
    text: str  # decoded tokens, cut before the first stop string
    prompt_tokens: int
    finish_reason: FinishReason
    prefill_s: float  # wall time of the batch's prefill (shared by its rows)
    decode_s: float  # wall time of the batch's decode loop


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill(
    params: Params, cfg: ModelConfig, cache_len: int, tokens, positions, lengths, temperature, top_k, top_p, seeds
):
    """Right-padded prompts [B, Tp] -> (first sampled ids [B], cache). Padding positions are
    >= cache_len, so never written."""
    cache = init_dense_cache(cfg, tokens.shape[0], cache_len, params.embed.dtype)
    hidden, cache = forward_dense(params, cfg, tokens, positions, cache)
    last = hidden[jnp.arange(tokens.shape[0]), lengths - 1]  # only the last prompt token's logits are needed
    logits = compute_logits(params, cfg, last)
    steps = jnp.zeros_like(lengths)
    return sample_tokens(logits, temperature, top_k, top_p, seeds, steps), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_step(params: Params, cfg: ModelConfig, ids, positions, steps, cache, temperature, top_k, top_p, seeds):
    """Feed ids [B] at positions [B]; sample the next ids. Finished rows run on harmlessly
    (writes past the cache drop)."""
    hidden, cache = forward_dense(params, cfg, ids[:, None], positions[:, None], cache)
    logits = compute_logits(params, cfg, hidden[:, 0])
    next_ids = sample_tokens(logits, temperature, top_k, top_p, seeds, steps)
    return next_ids, positions + 1, steps + 1, cache


class _Row:
    """Host-side state of one request while it decodes."""

    def __init__(self, prompt_len: int, sampling: SamplingParams, limit: int, limited_by_context: bool):
        self.prompt_len = prompt_len
        self.sampling = sampling
        self.limit = limit  # most tokens this row may produce
        self.limited_by_context = limited_by_context
        self.tokens: list[int] = []
        self.text: str | None = None  # set when a stop string cut it
        self.finish: FinishReason | None = None

    def push(self, token: int, eos_ids: frozenset[int], tokenizer) -> None:
        if self.finish is not None:
            return
        if token in eos_ids and not self.sampling.ignore_eos:
            self.finish = "eos"
            return
        self.tokens.append(token)
        if self.sampling.stop:
            text = tokenizer.decode(self.tokens)
            hits = [i for i in (text.find(s) for s in self.sampling.stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.finish = "stop"
                return
        if len(self.tokens) >= self.limit:
            self.finish = "length"


def _eos_ids(model) -> frozenset[int]:
    ids = set(model.cfg.eos_token_ids)
    tok_ids = getattr(model.tokenizer, "eos_token_ids", None) if model.tokenizer is not None else None
    if tok_ids:
        ids.update(int(i) for i in tok_ids)
    return frozenset(ids)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
) -> list[GenerationResult]:
    """Generate a continuation of every prompt (token ids) with one batched prefill and a per-step decode loop.

    `model` is a LoadedModel (cfg, params, tokenizer). `sampling` is one
    SamplingParams for all prompts or one per prompt.
    """
    cfg: ModelConfig = model.cfg
    prompts = [list(map(int, p)) for p in prompts]
    n = len(prompts)
    if n == 0:
        return []
    if sampling is None:
        sampling = SamplingParams()
    if isinstance(sampling, SamplingParams):
        sampling = [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n:
        raise ValueError(f"got {n} prompts but {len(sampling)} SamplingParams")

    ctx = cfg.max_position_embeddings
    rows = []
    for i, (p, sp) in enumerate(zip(prompts, sampling)):
        if not p:
            raise ValueError(f"prompt {i} is empty; a prompt needs at least one token")
        if len(p) >= ctx:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens but the model's context is {ctx} tokens "
                f"(max_position_embeddings); at most {ctx - 1} prompt tokens leave room to generate"
            )
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        room = ctx - len(p)
        rows.append(_Row(len(p), sp, min(sp.max_tokens, room), sp.max_tokens > room))

    # Shape buckets: batch, prompt length and cache length all powers of two (cache capped at the context).
    B = bucket(n)
    max_len = max(r.prompt_len for r in rows)
    cache_len = min(bucket(max(r.prompt_len + r.limit for r in rows), MIN_PROMPT_BUCKET), ctx)
    Tp = min(bucket(max_len, MIN_PROMPT_BUCKET), cache_len)

    tokens = np.zeros((B, Tp), np.int32)
    positions = np.full((B, Tp), cache_len, np.int32)  # padding -> out of the cache, dropped
    lengths = np.ones(B, np.int32)  # padding rows: one token at position 0
    positions[:, 0] = 0
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = np.arange(len(p))
        lengths[i] = len(p)
    temperature, top_k, top_p, seeds = (jnp.asarray(a) for a in sampling_arrays(sampling, pad_to=B))
    eos = _eos_ids(model)
    tokenizer = model.tokenizer

    t0 = time.perf_counter()
    ids, cache = _prefill(
        model.params,
        cfg,
        cache_len,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        jnp.asarray(lengths),
        temperature,
        top_k,
        top_p,
        seeds,
    )
    ids.block_until_ready()
    t1 = time.perf_counter()

    pos = jnp.asarray(lengths)
    steps = jnp.ones(B, jnp.int32)
    produced = 1  # tokens sampled so far per row (the loop keeps every row in lockstep)
    max_limit = max(r.limit for r in rows)
    while True:
        nxt = None
        if produced < max_limit:  # dispatch ahead; the read below then overlaps this step
            nxt, pos, steps, cache = _decode_step(
                model.params, cfg, ids, pos, steps, cache, temperature, top_k, top_p, seeds
            )
        host_ids = np.asarray(ids)
        for r, t in zip(rows, host_ids[:n]):
            r.push(int(t), eos, tokenizer)
        if nxt is None or all(r.finish is not None for r in rows):
            break
        ids = nxt
        produced += 1
    del cache
    t2 = time.perf_counter()

    results = []
    for r in rows:
        finish = r.finish or "length"
        text = r.text if r.text is not None else (tokenizer.decode(r.tokens) if tokenizer is not None else "")
        results.append(GenerationResult(r.tokens, text, r.prompt_len, finish, t1 - t0, t2 - t1))
    return results


def encode_prompt(model, text: str, chat: bool = False) -> list[int]:
    """Token ids of `text`: a one-turn chat with the generation prompt, or raw text (with BOS if
    the tokenizer adds one)."""
    tok = model.tokenizer
    if chat:
        out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        # A rendered string is encoded as is: the template already holds any BOS.
        return tok.encode(out, add_special_tokens=False) if isinstance(out, str) else list(out)
    return tok.encode(text, add_special_tokens=True)


def complete(model, text: str, sampling: SamplingParams | None = None, chat: bool = False) -> GenerationResult:
    """Generate a completion of one text prompt (what `spanjax generate` calls)."""
    return generate(model, [encode_prompt(model, text, chat)], sampling or SamplingParams())[0]
