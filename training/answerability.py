"""The answerability intrinsic: multi-document QA from nq-open-oracle.

Each question gets `num_docs` passages: answerable examples hold its gold
passage among distractors, unanswerable ones only distractors (the gold
passages of other questions of the same split). The label is the assistant's
answer, "answerable" or "unanswerable", generated after the invocation
(training/config.py DataSection.invocation), which follows the documents and
question. Training uses questions 0..N-1 (DEV), evaluation 2000..2654 (HELD_OUT).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from spanjax.adapters import adapter_mask, make_bank
from spanjax.models import llama
from spanjax.tasks.answerability import LABELS, label_token_ids
from spanjax.tasks.data import DEV, HELD_OUT, nq_open_oracle
from spanjax.training.data import prompt_ids


def train_indices(n: int) -> range:
    return range(DEV.start, DEV.start + min(n, len(DEV)))


def heldout_indices(n: int | None = None) -> range:
    return HELD_OUT if n is None else range(HELD_OUT.start, HELD_OUT.start + min(n, len(HELD_OUT)))


def _doc(ctx: dict, max_words: int) -> str:
    words = ctx["text"].split()
    return f"(Title: {ctx['title']}) {' '.join(words[:max_words])}"


def build_records(indices, num_docs: int, max_doc_words: int, seed: int, data=None) -> list[dict]:
    """Conversation records (JSONL rows) for questions `indices`; distractors come from the same range.
    The label and document order of question i depend only on (seed, i)."""
    data = nq_open_oracle() if data is None else data
    idx = list(indices)
    out = []
    for i in idx:
        rng = np.random.default_rng([seed, i])
        answerable = bool(rng.random() < 0.5)
        pool = [j for j in rng.choice(idx, size=min(len(idx), num_docs + 1), replace=False) if j != i][:num_docs]
        docs = [data[j]["ctxs"][0] for j in pool]
        if answerable:
            docs[int(rng.integers(num_docs))] = data[i]["ctxs"][0]
        body = "\n".join(f"Document {k + 1}: {_doc(d, max_doc_words)}" for k, d in enumerate(docs))
        out.append(
            {
                "id": i,
                "label": LABELS[0] if answerable else LABELS[1],
                "messages": [
                    {"role": "user", "content": f"{body}\n\nQuestion: {data[i]['question']}?"},
                    {"role": "assistant", "content": LABELS[0] if answerable else LABELS[1]},
                ],
            }
        )
    return out


def prompt_tokens(tokenizer, record: dict, invocation_ids, max_prefix: int) -> list[int]:
    prefix = prompt_ids(tokenizer, record["messages"][:-1])[-max_prefix:]
    return prefix + list(invocation_ids) + list(tokenizer.generation_prefix_ids())


def evaluate_answerability(
    model, adapter, cfg, num_questions: int | None = None, batch_size: int = 8, progress: bool = True
) -> dict:
    """Accuracy of `adapter` (None = base model) on held-out questions, by comparing the
    logits of the two labels' first tokens after the prompt; plus the majority-class baseline."""
    tok = model.tokenizer
    inv_ids = list(tok.encode_message(cfg.data.invocation_role, cfg.data.invocation))
    recs = build_records(heldout_indices(num_questions), cfg.data.num_docs, cfg.data.max_doc_words, cfg.seed)
    prompts = [prompt_tokens(tok, r, inv_ids, cfg.data.max_prefix_tokens) for r in recs]
    T = max(len(p) for p in prompts)
    T = -(-T // 16) * 16  # a few shapes only
    bank = None if adapter is None else make_bank([adapter], model.cfg)
    pos_id, neg_id = label_token_ids(tok)

    @jax.jit
    def scores(params, bank, tokens, positions, mask, last):
        cache = llama.init_dense_cache(model.cfg, tokens.shape[0], tokens.shape[1])
        h, _ = llama.forward_dense(params, model.cfg, tokens, positions, cache, bank, mask)
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        lg = llama.compute_logits(params, model.cfg, h_last)
        return lg[:, pos_id] - lg[:, neg_id]

    preds = []
    it = range(0, len(prompts), batch_size)
    for s in tqdm(it, desc="eval answerability", disable=not progress or bool(os.environ.get("SPANJAX_NO_PROGRESS"))):
        chunk = prompts[s : s + batch_size]
        B = batch_size
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), T, np.int32)
        mask = np.zeros((B, T), bool)
        last = np.zeros(B, np.int32)
        for b, p in enumerate(chunk):
            tokens[b, : len(p)] = p
            positions[b, : len(p)] = np.arange(len(p))
            last[b] = len(p) - 1
            if adapter is not None:
                mask[b, : len(p)] = adapter_mask(adapter.config, p)
        d = np.asarray(scores(model.params, bank, tokens, positions, mask if adapter is not None else None, last))
        preds.extend(LABELS[0] if x > 0 else LABELS[1] for x in d[: len(chunk)])
    gold = [r["label"] for r in recs]
    correct = [p == g for p, g in zip(preds, gold)]
    n_pos = sum(g == LABELS[0] for g in gold)
    per = {
        lab: float(np.mean([c for c, g in zip(correct, gold) if g == lab])) if any(g == lab for g in gold) else None
        for lab in LABELS
    }
    return {
        "questions": f"{recs[0]['id']}..{recs[-1]['id']}",
        "n": len(recs),
        "accuracy": float(np.mean(correct)),
        "majority_baseline": max(n_pos, len(gold) - n_pos) / len(gold),
        "per_class_accuracy": per,
        "predicted_answerable": sum(p == LABELS[0] for p in preds),
        "adapter": None if adapter is None else adapter.config.kind,
    }
