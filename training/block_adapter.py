"""Block-attention adapters (issue 9): a LoRA / aLoRA that makes a causally trained
model read documents encoded as independent blocks (a `plus`) as well as a stock prompt.

Data (`data.source: nq_blocks`, questions 0..N-1 of nq-open-oracle, the DEV split;
2000.. are never read): the locality eval's own examples (spanjax/tasks/locality.py,
`nq_examples`: the gold passage among K-1 distractors, `make_g`: system, a `plus` of
the documents under the `prefix` attention policy, the question), with the gold at a
random position and a random position policy (`data.position_policies`) per batch
slot, drawn from (seed, step, slot). Each is lowered by the span planner exactly as the engine lowers
it, and the first gold answer (+ end of turn) is appended to the final span as the
engine would generate it; its tokens are the only ones in the loss. Training thus
sees the plan's visibility mask (`SpanPlan.dense_mask`) and positions, bit for bit.

Forward (`forward_masked`): the decoder with dense attention under an explicit
[T, C + T] mask and explicit positions (keys rotated by their own positions), so
fine on CPU at these lengths (the engine's Pallas kernels are for serving).
- LoRA: every token adapted and back-propagated.
- aLoRA: the invocation is the opening of the question message (`data.invocation`,
  e.g. "Question:" -> the tokens of `<|im_start|>user\\nQuestion:`), so system and
  documents are base-model tokens: their KV is computed once per batch by the frozen
  base model without gradients (`collect_kv`) and the question + answer attend to it
  under the plan's mask. Documents' KV is therefore exactly the base model's, and at
  serving time the documents' pages are shared with every base query and adapter.

`spanjax train block-adapter configs/block_alora.yaml` runs it as a source of
training/trainer.py (`source`: adapter config, objective, batches) on the training
core (training/core.py: checkpoints, exact resume, metrics; PEFT export).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from spanjax.adapters import AdapterConfig, bank_from_weights, init_adapter, invocation_start
from spanjax.kernels.rope import apply_rope
from spanjax.models import llama
from spanjax.models.config import ModelConfig
from spanjax.query.lower import lower
from spanjax.tasks.data import DEV
from spanjax.tasks.locality import make_g, nq_examples
from spanjax.tokenizer.tokenizer import completion_ids
from spanjax.training.core import masked_nll
from spanjax.training.data import batch_indices

SOURCE = "nq_blocks"


# ---------------------------------------------------------------------------- the masked forward


def forward_masked(
    params,
    cfg,
    tokens,
    positions,
    mask,
    *,
    context=None,
    adapter=None,
    adapter_mask=None,
    collect_kv: bool = False,
    remat: bool = False,
):
    """Decoder over tokens/positions [B, T] whose attention is `mask` [B, T, C + T] over
    `context` keys (C of them) followed by the tokens' own keys.

    `context` = (k, v), each [L, B, C, Hkv, D], keys already rotated (what `collect_kv`
    returns for an earlier call), or None (C = 0). `adapter` / `adapter_mask` as in
    llama.decoder. `remat` recomputes attention in the backward pass instead of storing
    the [T, C + T] probabilities of every layer. Returns (hidden [B, T, H], (k, v) of
    these tokens with keys rotated, or None)."""
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    attend = functools.partial(llama.masked_attention, cfg)
    if remat:
        attend = jax.checkpoint(attend)
    mask = jnp.asarray(mask)

    def attention(idx, cache, q, k, v, pos):
        k = apply_rope(k, pos, inv_freq)
        if collect_kv:
            cache = (cache[0].at[idx].set(k.astype(cache[0].dtype)), cache[1].at[idx].set(v.astype(cache[1].dtype)))
        if context is not None:
            k = jnp.concatenate([context[0][idx].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([context[1][idx].astype(v.dtype), v], axis=1)
        return attend(q, k, v, mask), cache

    B, T = tokens.shape
    if collect_kv:
        shape = (cfg.num_layers, B, T, cfg.num_kv_heads, cfg.head_dim)
        cache = (jnp.zeros(shape, params.embed.dtype), jnp.zeros(shape, params.embed.dtype))
    else:
        cache = jnp.zeros((cfg.num_layers,))
    hidden, cache = llama.decoder(
        params, cfg, jnp.asarray(tokens), jnp.asarray(positions), cache, attention, adapter, adapter_mask
    )
    return hidden, (cache if collect_kv else None)


# ---------------------------------------------------------------------------- examples


class MemoTokenizer:
    """The tokenizer with `encode_message` memoized (documents recur across steps)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._memo: dict = {}

    def encode_message(self, role, content):
        key = (role, content)
        if key not in self._memo:
            self._memo[key] = tuple(self._tok.encode_message(role, content))
        return list(self._memo[key])

    def __getattr__(self, name):
        return getattr(self._tok, name)


def opening_ids(tokenizer, role: str, text: str) -> tuple[int, ...]:
    """Tokens that open every `role` message starting with `text` + " <word>" (chat header
    + text): the common prefix of two such messages. The aLoRA's invocation sequence."""
    a = list(tokenizer.encode_message(role, text + " a"))
    b = list(tokenizer.encode_message(role, text + " b"))
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if n == 0:
        raise ValueError(f"messages opening with {text!r} share no tokens; cannot form an invocation")
    return tuple(a[:n])


def answer_ids(tokenizer, answer: str) -> list[int]:
    """What the engine generates for `answer`: the assistant text and the end of turn (the first eos)."""
    ids = completion_ids(tokenizer, answer)[len(tokenizer.generation_prefix_ids()) :]
    eos = set(getattr(tokenizer, "eos_token_ids", ()))
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids) - 1)
    return list(ids[: cut + 1])


@dataclasses.dataclass(frozen=True)
class Lowered:
    """One training sequence: the plan's real tokens in span order, then the answer."""

    tokens: np.ndarray  # [N] int32
    positions: np.ndarray  # [N] int32 (RoPE positions)
    mask: np.ndarray  # [N, N] bool: SpanPlan.dense_mask() with the answer continuing the final span
    answer_start: int  # index of the first answer token (= plan.num_tokens)


def with_continuation(plan, ids):
    """The plan with `ids` appended to its final span at the following positions: how the
    engine places generated tokens (they see what the final span sees, and it)."""
    last = plan.spans[-1]
    pos = tuple(range(last.positions[-1] + 1, last.positions[-1] + 1 + len(ids)))
    ext = dataclasses.replace(
        last, token_ids=tuple(last.token_ids) + tuple(int(t) for t in ids), positions=tuple(last.positions) + pos
    )
    return dataclasses.replace(plan, spans=plan.spans[:-1] + (ext,))


def lower_plan(plan, answer=()) -> Lowered:
    full = with_continuation(plan, answer) if len(answer) else plan
    tokens = np.asarray([t for s in full.spans for t in s.token_ids], np.int32)
    positions = np.asarray([p for s in full.spans for p in s.positions], np.int32)
    return Lowered(tokens, positions, full.dense_mask(), plan.num_tokens)


def lower_example(ex, pos: int, policy: str, tokenizer, model_name: str, page_size: int, answer) -> Lowered:
    """The locality eval's span query for (example, gold position, position policy), lowered
    as the engine lowers it, with `answer` ids continuing it."""
    g = make_g(ex, pos, f"span-{policy}", model_name, max_tokens=max(len(answer), 1))
    return lower_plan(lower(g, tokenizer, model=model_name, page_size=page_size), answer)


def source_examples(data, seed: int, tokenizer):
    """The locality task's Examples for DEV questions 0..num_train_questions-1 (K = data.num_docs)."""
    n = min(data.num_train_questions, len(DEV))
    if n < 1:
        raise ValueError("data.num_train_questions must be >= 1")
    exs = nq_examples(
        split="dev",
        num_docs=data.num_docs,
        num_questions=n,
        max_doc_tokens=data.max_doc_tokens,
        seed=seed,
        tokenizer=tokenizer,
    )
    assert all(ex.index in DEV for ex in exs), "block-adapter data must come from the DEV split only"
    return exs


# ---------------------------------------------------------------------------- batches


@flax.struct.dataclass
class BlockBatch:
    prefix: np.ndarray  # [B, P] base-model tokens (aLoRA: before the invocation; LoRA: P = 0)
    prefix_pos: np.ndarray  # [B, P]
    prefix_mask: np.ndarray  # [B, P, P] bool (padding rows see only themselves)
    suffix: np.ndarray  # [B, S] adapted tokens (from the invocation; LoRA: all)
    suffix_pos: np.ndarray  # [B, S]
    suffix_mask: np.ndarray  # [B, S, P + S] bool over prefix keys then suffix keys
    label_index: np.ndarray  # [B, A] suffix row predicting each answer token
    labels: np.ndarray  # [B, A] answer tokens
    loss_mask: np.ndarray  # [B, A] float


def make_block_batch(items: list[Lowered], P: int, S: int, A: int, invocation=None) -> BlockBatch:
    """Pack sequences. With `invocation` (aLoRA) each splits at the invocation's last
    occurrence: tokens before it go to the prefix (base model, no gradient); else P must be 0."""
    B = len(items)
    eye = lambda n: np.broadcast_to(np.eye(n, dtype=bool), (B, n, n)).copy()  # noqa: E731
    pre, pre_pos, pre_mask = np.zeros((B, P), np.int32), np.zeros((B, P), np.int32), eye(P)
    suf, suf_pos = np.zeros((B, S), np.int32), np.zeros((B, S), np.int32)
    suf_mask = np.concatenate([np.zeros((B, S, P), bool), eye(S)], axis=2)
    label_index, labels, loss_mask = (
        np.zeros((B, A), np.int32),
        np.zeros((B, A), np.int32),
        np.zeros((B, A), np.float32),
    )
    for b, it in enumerate(items):
        n = len(it.tokens)
        k = 0
        if invocation is not None:
            k = invocation_start(it.tokens[: it.answer_start], invocation)
            if k is None:
                raise ValueError("a training prompt lacks the aLoRA invocation (the question message's opening)")
        na = n - it.answer_start
        if k > P or n - k > S or na > A:
            raise ValueError(
                f"sequence of {k} prefix / {n - k} suffix / {na} answer tokens exceeds the batch shape {P}/{S}/{A}"
            )
        pre[b, :k], pre_pos[b, :k] = it.tokens[:k], it.positions[:k]
        pre_mask[b, :k, :k] = it.mask[:k, :k]
        suf[b, : n - k], suf_pos[b, : n - k] = it.tokens[k:], it.positions[k:]
        suf_mask[b, : n - k, :k] = it.mask[k:, :k]
        suf_mask[b, : n - k, P : P + n - k] = it.mask[k:, k:]
        label_index[b, :na] = np.arange(it.answer_start - 1, n - 1) - k  # row t predicts token t + 1
        labels[b, :na] = it.tokens[it.answer_start :]
        loss_mask[b, :na] = 1.0
    return BlockBatch(pre, pre_pos, pre_mask, suf, suf_pos, suf_mask, label_index, labels, loss_mask)


# ---------------------------------------------------------------------------- loss and step


def block_loss(weights, rng, params, model_cfg, adapter_cfg, batch: BlockBatch, context):
    """Mean NLL of the answer tokens (adapter on every suffix token), and their count."""
    bank = bank_from_weights(weights, adapter_cfg.scale, adapter_cfg.dropout, rng)
    h, _ = forward_masked(
        params, model_cfg, batch.suffix, batch.suffix_pos, batch.suffix_mask, context=context, adapter=bank, remat=True
    )
    h = jnp.take_along_axis(h, batch.label_index[..., None], axis=1)
    return masked_nll(params, model_cfg, h, batch.labels, batch.loss_mask)


def base_context(params, model_cfg, batch: BlockBatch):
    """Base-model KV of the prefix (None when there is none), outside the gradient."""
    if not batch.prefix.shape[1]:
        return None
    _, kv = forward_masked(params, model_cfg, batch.prefix, batch.prefix_pos, batch.prefix_mask, collect_kv=True)
    return jax.lax.stop_gradient(kv)


@dataclasses.dataclass(frozen=True)
class BlockObjective:
    """`block_loss` under the base-model KV of the prefix (`base_context`, outside the gradient)."""

    model_cfg: ModelConfig
    adapter_cfg: AdapterConfig

    def context(self, params, batch: BlockBatch):
        return base_context(params, self.model_cfg, batch)

    def loss(self, weights, rng, params, batch: BlockBatch, context):
        loss, n = block_loss(weights, rng, params, self.model_cfg, self.adapter_cfg, batch, context)
        return loss, {"loss_tokens": n}


# ---------------------------------------------------------------------------- the trainer's source


def source(cfg, model, run_dir: Path):
    """training/trainer.py's data source `nq_blocks`: (adapter config, objective, batch of a
    step). Writes run_dir/data.json (what was used)."""
    d = cfg.data
    if cfg.eval.num_questions:
        raise ValueError(
            "eval.num_questions: a block adapter is evaluated by the locality variants "
            "(eval/locality.py, e.g. span-parallel+alora); set eval.num_questions=0"
        )
    if not d.position_policies or d.num_docs < 1:
        raise ValueError("data.position_policies must be non-empty and data.num_docs >= 1")
    tok = MemoTokenizer(model.tokenizer)
    inv = opening_ids(tok, d.invocation_role, d.invocation)
    acfg = cfg.adapter.build(inv)
    alora = acfg.kind == "alora"
    P = d.max_prefix_tokens if alora else 0
    S = d.max_suffix_tokens + (0 if alora else d.max_prefix_tokens)
    A = d.max_answer_tokens
    kept, answers, dropped = [], [], []
    for ex in source_examples(d, cfg.seed, tok):
        ans = answer_ids(tok, ex.answers[0])
        low = lower_example(ex, 0, d.position_policies[0], tok, model.name, d.page_size, ans)
        k = invocation_start(low.tokens[: low.answer_start], inv)
        if k is None:
            raise ValueError(
                f"question {ex.index}: the prompt lacks the invocation {d.invocation!r} "
                "(data.invocation must open the question message)"
            )
        n = len(low.tokens)
        if len(ans) > A or (alora and (k > P or n - k > S)) or (not alora and n > S):
            dropped.append(ex.index)
            continue
        kept.append(ex)
        answers.append(ans)
    if not kept:
        raise ValueError("no training example fits data.max_prefix_tokens / max_suffix_tokens / max_answer_tokens")
    if jax.process_index() == 0:  # process 0 of a multi-host run writes the run's files
        (run_dir / "data.json").write_text(
            json.dumps(
                {
                    "source": SOURCE,
                    "questions": [kept[0].index, kept[-1].index],
                    "num_examples": len(kept),
                    "dropped_too_long": dropped,
                    "num_docs": d.num_docs,
                    "position_policies": list(d.position_policies),
                    "invocation_ids": list(inv) if alora else None,
                    "shape": {"prefix": P, "suffix": S, "answer": A},
                },
                indent=1,
            )
        )

    def batch(step: int) -> BlockBatch:
        items = []
        for slot, i in enumerate(batch_indices(len(kept), cfg.batch_size, step, cfg.seed)):
            rng = np.random.default_rng([cfg.seed, step, slot])  # gold position and policy: a function of the step
            pos = int(rng.integers(d.num_docs))
            policy = d.position_policies[int(rng.integers(len(d.position_policies)))]
            items.append(lower_example(kept[i], pos, policy, tok, model.name, d.page_size, answers[i]))
        return make_block_batch(items, P, S, A, inv if alora else None)

    return acfg, BlockObjective(model.cfg, acfg), batch


# ---------------------------------------------------------------------------- answer loss (a quick check, not the eval)


@functools.partial(jax.jit, static_argnames=("model_cfg", "adapter_cfg"))
def _answer_loss(weights, params, batch: BlockBatch, *, model_cfg, adapter_cfg):
    return block_loss(weights, None, params, model_cfg, adapter_cfg, batch, base_context(params, model_cfg, batch))


def answer_loss(
    model, cfg, adapter=None, questions=range(0, 32), position: int | None = None, batch_size: int = 4
) -> dict:
    """Mean answer-token NLL over DEV `questions` (indices into the training examples of `cfg`),
    gold at `position` (None: the last document), under each of `cfg.data.position_policies`;
    `adapter` None = the base model (an adapter with B = 0). Forward only; for a loss-falls
    check of a run. Accuracy is eval/locality.py's job."""
    d = cfg.data
    tok = MemoTokenizer(model.tokenizer)
    inv = opening_ids(tok, d.invocation_role, d.invocation)
    if adapter is None:
        adapter = init_adapter(cfg.adapter.build(inv), model.cfg, jax.random.PRNGKey(0))
    acfg = adapter.config
    alora = acfg.kind == "alora"
    exs = source_examples(dataclasses.replace(d, num_train_questions=max(questions) + 1), cfg.seed, tok)
    pos = d.num_docs - 1 if position is None else position
    out = {}
    for policy in d.position_policies:
        items = [
            lower_example(exs[q], pos, policy, tok, model.name, d.page_size, answer_ids(tok, exs[q].answers[0]))
            for q in questions
        ]
        P = max(invocation_start(i.tokens[: i.answer_start], inv) for i in items) if alora else 0
        S = max(len(i.tokens) for i in items) - P
        P, S = -(-P // 64) * 64, -(-S // 64) * 64
        total, count = 0.0, 0.0
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape; repeats are masked below
            b = make_block_batch(chunk, P, S, d.max_answer_tokens, inv if alora else None)
            real = min(batch_size, len(items) - s)
            b = b.replace(loss_mask=b.loss_mask * (np.arange(batch_size) < real)[:, None])
            loss, n = _answer_loss(adapter.weights, model.params, b, model_cfg=model.cfg, adapter_cfg=acfg)
            total, count = total + float(loss) * float(n), count + float(n)
        out[policy] = total / max(count, 1.0)
    return {"questions": [min(questions), max(questions)], "position": pos, "nll": out, "tokens": count}
