"""The attention-locality task: multi-document QA examples with the gold document at any
position, their span queries per variant, and the answer metrics. Built here once for both
the locality eval (eval/locality.py) and block-adapter training (training/block_adapter.py).

Datasets (`EXAMPLES`):
- `nq`: nq-open-oracle. K documents = the question's gold passage + K-1 gold
  passages of other questions of the same split (seeded per question; passages
  that contain one of the question's answers are skipped, so only the gold
  document can answer). Metric: a normalized gold answer is a substring of the
  normalized output.
- `kv`: kv-retrieval-75_keys. The 75 key-value records split into K chunks
  (documents); the chunk holding the key is moved to each position, the others
  keep their order. Metric: the value string appears in the output.
  Split: records 0..249 dev, 250..499 held out (the data has no official split).
"""

from __future__ import annotations

import dataclasses
import json
import re
import string

import numpy as np

from spanjax.query import ast as A
from spanjax.tasks.data import DEV, HELD_OUT, kv_retrieval, nq_open_oracle, passage_text

VARIANTS = {
    # name: (documents in a plus, attention policy, position policy)
    "stock": (False, "prefix", "sequential"),
    "span-sequential": (True, "prefix", "sequential"),
    "span-parallel": (True, "prefix", "parallel"),
    "span-sequential-isolated": (True, "isolated", "sequential"),
    "span-parallel-isolated": (True, "isolated", "parallel"),
    # training-free recompute (EPIC-style, query/lower.py): each document's first page is
    # encoded again in the query's context; the rest of it comes from the cache
    "span-sequential-recompute": (True, "prefix", "sequential"),
    "span-parallel-recompute": (True, "prefix", "parallel"),
    # training-free re-weighting (APE-style, arXiv 2502.05431; query/lower.py): the question and the
    # answer attend to the documents with logits REWEIGHT_SCALE * logit + REWEIGHT_BIAS
    "span-sequential-reweight": (True, "prefix", "sequential"),
    "span-parallel-reweight": (True, "prefix", "parallel"),
    # with a block-attention adapter (training/block_adapter.py), registered as "lora" / "alora"
    "stock+lora": (False, "prefix", "sequential"),
    "span-sequential+lora": (True, "prefix", "sequential"),
    "span-parallel+lora": (True, "prefix", "parallel"),
    "span-sequential+alora": (True, "prefix", "sequential"),
    "span-parallel+alora": (True, "prefix", "parallel"),
    # both: the adapter's question attending to its documents with re-weighted logits
    "span-sequential-reweight+alora": (True, "prefix", "sequential"),
    "span-parallel-reweight+alora": (True, "prefix", "parallel"),
    # relevance-ranked (in the spirit of attention sorting, arXiv 2310.01427, with a trained scorer):
    # each document is scored alone by the relevance intrinsic (configs/lora_relevance.yaml), then
    # the documents are listed least relevant first, so the most relevant sits next to the
    # question, and only the `keep` most relevant are kept (eval.ranked_keep; 0 = all)
    "stock-ranked": (False, "prefix", "sequential"),
    "span-sequential-ranked": (True, "prefix", "sequential"),
    "span-sequential-ranked+alora": (True, "prefix", "sequential"),
}
RECOMPUTE_PAGES = 1  # the recompute variants' head: one page per document (the default of the policy)
# The reweight variants' default (scale, bias), the identity (the plain span variants) until a
# sweep on DEV questions only chooses them (`eval.reweight_scale` / `eval.reweight_bias` set
# them per run; never chosen on held-out questions).
REWEIGHT_SCALE = 1.0
REWEIGHT_BIAS = 0.0


def uses_reweight(variant: str) -> bool:
    """Whether the variant's question attends to its documents with re-weighted logits."""
    return "-reweight" in variant


def uses_ranking(variant: str) -> bool:
    """Whether the variant lists its documents by the relevance intrinsic's scores."""
    return "-ranked" in variant


def order_invariant(variant: str) -> bool:
    """Whether the variant's span query is one query for every gold position: documents in a
    `plus` under parallel positions all start at the same position and see the same context,
    so moving the gold document only changes the order they are listed in, which the
    attention's rule ignores. Not the recompute variants: a document's recomputed head sees
    the documents listed before it. The ranked variants are: they list the documents by scores
    each computed from one document alone, whatever position it was given."""
    in_plus, _, positions = VARIANTS[variant]
    return uses_ranking(variant) or (in_plus and positions == "parallel" and "-recompute" not in variant)


# variant -> the adapter its g runs (engine name; its directory is eval.<name>_adapter)
VARIANT_ADAPTER = {v: v.rsplit("+", 1)[1] for v in VARIANTS if "+" in v}
# without an adapter of any kind (the ranked ones need the relevance intrinsic)
BASE_VARIANTS = tuple(v for v in VARIANTS if v not in VARIANT_ADAPTER and not uses_ranking(v))
KV_DEV, KV_HELD_OUT = range(0, 250), range(250, 500)

NQ_SYSTEM = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant). Answer with a few words."
)
# The relevance intrinsic's invocation (its training config's data.invocation, checked when loaded).
RELEVANCE_INVOCATION = "Relevance: does the document answer the question?"
KV_SYSTEM = (
    "Extract the value corresponding to the specified key in the JSON objects below. Answer with the value only."
)


# ---------------------------------------------------------------------------- metric


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD/NQ style)."""
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def nq_correct(output: str, answers) -> bool:
    out = normalize_answer(output)
    return any(normalize_answer(a) and normalize_answer(a) in out for a in answers)


def kv_correct(output: str, value: str) -> bool:
    return value in output


# ---------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class Example:
    index: int  # line in the data file
    question: str  # the final user message
    docs: tuple[str, ...]  # the K-1 distractor documents' bodies, in their fixed order
    gold: str  # the gold document's body
    answers: tuple[str, ...]
    dataset: str

    def bodies(self, pos: int) -> list[str]:
        """The documents' bodies with the gold one at `pos`, in listed order."""
        return list(self.docs[:pos]) + [self.gold] + list(self.docs[pos:])

    def documents(self, pos: int, order: tuple[int, ...] | None = None) -> list[str]:
        """The documents as listed in the prompt: `bodies(pos)`, or those of them that `order`
        names in its order, each labelled with its place in the list."""
        bodies = self.bodies(pos)
        if order is not None:
            bodies = [bodies[i] for i in order]
        if self.dataset == "kv":
            return bodies
        return [f"Document [{i + 1}]{b}" for i, b in enumerate(bodies)]

    def correct(self, output: str) -> bool:
        return kv_correct(output, self.answers[0]) if self.dataset == "kv" else nq_correct(output, self.answers)


def _split_range(dataset: str, split: str) -> range:
    if dataset == "kv":
        return KV_HELD_OUT if split == "held_out" else KV_DEV
    return HELD_OUT if split == "held_out" else DEV


def _cut(text: str, tokenizer, max_tokens: int) -> str:
    if max_tokens <= 0:
        return text
    ids = tokenizer.encode(text)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def nq_examples(
    *,
    split: str,
    num_docs: int,
    num_questions: int,
    seed: int,
    first_question: int = 0,
    max_doc_tokens: int = 0,
    tokenizer=None,
) -> list[Example]:
    """Questions `first_question`.. of `split` ("dev" or "held_out"), each with `num_docs` documents
    (cut to `max_doc_tokens` tokens of `tokenizer` when both are given; 0 = whole)."""
    records = nq_open_oracle()
    pool = _split_range("nq", split)
    indices = list(pool[first_question : first_question + num_questions])
    if len(indices) < num_questions:
        raise ValueError(
            f"split {split} has {len(pool)} questions; "
            f"first_question + num_questions = {first_question + num_questions}"
        )
    out = []
    for qi in indices:
        rec = records[qi]
        answers = tuple(rec["answers"])
        norm_answers = [normalize_answer(a) for a in answers if normalize_answer(a)]
        rng = np.random.default_rng([seed, qi])  # per question: adding questions leaves others unchanged
        chosen: list[int] = []
        for j in rng.permutation(len(pool)):
            cand = pool[int(j)]
            if cand == qi:
                continue
            body = normalize_answer(passage_text(records[cand]))
            if any(a in body for a in norm_answers):
                continue  # a distractor that contains the answer would be a second gold
            chosen.append(cand)
            if len(chosen) == num_docs - 1:
                break
        body = lambda r: _cut(passage_text(r), tokenizer, max_doc_tokens) if tokenizer else passage_text(r)
        out.append(
            Example(
                index=qi,
                question=f"Question: {rec['question']}?\nAnswer:",
                docs=tuple(body(records[c]) for c in chosen),
                gold=body(rec),
                answers=answers,
                dataset="nq",
            )
        )
    return out


def kv_examples(
    *,
    split: str,
    num_docs: int,
    num_questions: int,
    seed: int,
    first_question: int = 0,
    max_doc_tokens: int = 0,
    tokenizer=None,
) -> list[Example]:
    """Cases `first_question`.. of `split`, their 75 records in `num_docs` chunks (documents)."""
    del seed, max_doc_tokens, tokenizer  # the records are fixed; chunks are contiguous runs of them
    records = kv_retrieval()
    pool = _split_range("kv", split)
    indices = list(pool[first_question : first_question + num_questions])
    if len(indices) < num_questions:
        raise ValueError(f"kv split {split} has {len(pool)} cases; asked for {first_question + num_questions}")
    out = []
    for qi in indices:
        rec = records[qi]
        pairs = [tuple(p) for p in rec["ordered_kv_records"]]
        chunks = [list(c) for c in np.array_split(np.arange(len(pairs)), num_docs)]
        gold_chunk = next(i for i, c in enumerate(chunks) if any(pairs[j][0] == rec["key"] for j in c))
        bodies = [json.dumps({pairs[j][0]: pairs[j][1] for j in c}, indent=1) for c in chunks]
        out.append(
            Example(
                index=qi,
                question=f'Key: "{rec["key"]}"\nCorresponding value:',
                docs=tuple(b for i, b in enumerate(bodies) if i != gold_chunk),
                gold=bodies[gold_chunk],
                answers=(rec["value"],),
                dataset="kv",
            )
        )
    return out


# dataset -> example builder (same keyword parameters)
EXAMPLES = {"nq": nq_examples, "kv": kv_examples}


def relevance_g(ex: Example, body: str, model_name: str) -> A.G:
    """The relevance intrinsic's query for one document body of `ex`, in its training format
    (training/answerability.py with one document): one label token is generated, and its two
    candidates' logits are the score."""
    if ex.dataset != "nq":
        raise ValueError("the relevance intrinsic is trained on nq questions; the kv task has no ranked variants")
    question = ex.question.removesuffix("\nAnswer:")  # "Question: ...?", as the intrinsic was trained
    text = f"Document 1: {body}\n\n{question}"
    prompt = A.Cross((A.Message("user", text), A.Message("user", RELEVANCE_INVOCATION)))
    return A.G(model_name, prompt, max_tokens=1, temperature=0.0, adapter="relevance")


def ranked_order(scores, keep: int = 0) -> tuple[int, ...]:
    """Document indices from the least to the most relevant (the highest score last, next to the
    question; equal scores keep their listed order), only the last `keep` of them when keep > 0."""
    order = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    return tuple(order[-keep:] if keep > 0 else order)


def make_g(
    ex: Example,
    pos: int,
    variant: str,
    model_name: str,
    max_tokens: int,
    reweight: tuple[float, float] = (REWEIGHT_SCALE, REWEIGHT_BIAS),
    order: tuple[int, ...] | None = None,
) -> A.G:
    """The span query of `variant` for `ex` with its gold document at position `pos`;
    `reweight` (scale, bias) is what the `-reweight` variants use, `order` (indices into
    `ex.bodies(pos)`, from `ranked_order`) the documents the `-ranked` variants list."""
    span, attention, positions = VARIANTS[variant]
    if uses_ranking(variant) != (order is not None):
        raise ValueError(
            f"{variant}: an order of documents is {'needed' if order is None else 'only for ranked variants'}"
        )
    docs = tuple(A.Message("user", d) for d in ex.documents(pos, order))
    body = (A.Plus(docs),) if span else docs
    system = KV_SYSTEM if ex.dataset == "kv" else NQ_SYSTEM
    prompt = A.Cross((A.Message("system", system),) + body + (A.Message("user", ex.question),))
    return A.G(
        model_name,
        prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        attention=attention,
        positions=positions,
        adapter=VARIANT_ADAPTER.get(variant),
        recompute_pages=RECOMPUTE_PAGES if variant.endswith("-recompute") else 0,
        reweight=tuple(reweight) if uses_reweight(variant) else None,
    )
