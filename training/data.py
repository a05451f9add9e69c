"""Conversation JSONL -> fixed-shape training batches, ordered by the step alone.

Each example splits at the invocation start into a prefix (what precedes the
invocation; base weights for an aLoRA, so it needs no gradient) and a suffix
(invocation + assistant turn) whose next-token loss counts only the tokens
after the invocation. Batch `step` draws examples from a per-epoch
permutation seeded by (seed, epoch), so any step's batch can be recomputed
from the step number (exact resume).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.struct
import numpy as np

from spanjax.tokenizer.tokenizer import completion_ids


@dataclasses.dataclass(frozen=True)
class Example:
    prefix: tuple[int, ...]  # tokens before the invocation
    suffix: tuple[int, ...]  # invocation + generation prefix + target + end of turn
    invocation_len: int


@flax.struct.dataclass
class Batch:
    prefix: np.ndarray  # [B, P] tokens (0-padded)
    prefix_pos: np.ndarray  # [B, P] positions; padding -> cache length (writes dropped)
    suffix: np.ndarray  # [B, S]
    suffix_pos: np.ndarray  # [B, S]
    labels: np.ndarray  # [B, S] next token of each suffix position
    loss_mask: np.ndarray  # [B, S] float: 1 where the label is after the invocation


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            msgs = rec.get("messages") if isinstance(rec, dict) else None
            if not msgs or not isinstance(msgs, list) or msgs[-1].get("role") != "assistant":
                raise ValueError(f'{path}:{n}: expected {{"messages": [..., {{"role": "assistant", ...}}]}}')
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def prompt_ids(tokenizer, messages) -> list[int]:
    """Messages encoded one by one, exactly as span-query lowering encodes a cross of them."""
    ids: list[int] = []
    for m in messages:
        ids.extend(tokenizer.encode_message(m["role"], m["content"]))
    return ids


def encode_example(tokenizer, record: dict, invocation_ids, max_prefix: int, max_suffix: int) -> Example:
    msgs = record["messages"]
    prefix = prompt_ids(tokenizer, msgs[:-1])[-max_prefix:] if max_prefix else []
    suffix = list(invocation_ids) + completion_ids(tokenizer, msgs[-1]["content"])
    if len(suffix) > max_suffix:
        raise ValueError(f"invocation + answer is {len(suffix)} tokens > data.max_suffix_tokens={max_suffix}")
    return Example(tuple(prefix), tuple(suffix), len(invocation_ids))


def example_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of batch `step` (0-based): a function of the step alone."""
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(j, n)
        out.append(int(example_order(n, seed, epoch)[i]))
    return out


def make_batch(examples: list[Example], prefix_len: int, suffix_len: int, all_adapted: bool) -> Batch:
    """Pack examples. `all_adapted` (LoRA) moves every prefix into the suffix, since
    then every token is adapted and needs gradients; the caller sizes suffix_len."""
    B = len(examples)
    cache_len = prefix_len + suffix_len
    P = 0 if all_adapted else prefix_len
    pre = np.zeros((B, P), np.int32)
    pre_pos = np.full((B, P), cache_len, np.int32)
    suf = np.zeros((B, suffix_len), np.int32)
    suf_pos = np.full((B, suffix_len), cache_len, np.int32)
    labels = np.zeros((B, suffix_len), np.int32)
    mask = np.zeros((B, suffix_len), np.float32)
    for b, ex in enumerate(examples):
        p, s = list(ex.prefix), list(ex.suffix)
        first_loss = ex.invocation_len  # index in s of the first label after the invocation
        if all_adapted:
            s, first_loss = p + s, len(p) + ex.invocation_len
            p = []
        pre[b, : len(p)] = p
        pre_pos[b, : len(p)] = np.arange(len(p))
        suf[b, : len(s)] = s
        suf_pos[b, : len(s)] = np.arange(len(p), len(p) + len(s))
        labels[b, : len(s) - 1] = s[1:]
        # position t predicts s[t+1]; count it when s[t+1] comes after the invocation
        mask[b, max(first_loss - 1, 0) : len(s) - 1] = 1.0
    return Batch(pre, pre_pos, suf, suf_pos, labels, mask)
