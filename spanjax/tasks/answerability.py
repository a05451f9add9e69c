"""The answerability intrinsic's labels, shared by its training (training/answerability.py) and
the locality eval's relevance ranking (eval/locality.py), which reads them off a step's logits."""

from __future__ import annotations

from spanjax.tokenizer.tokenizer import completion_ids

LABELS = ("answerable", "unanswerable")


def label_token_ids(tokenizer) -> tuple[int, int]:
    """First token of each label's completion after the generation prefix (they must differ)."""
    gen = len(tokenizer.generation_prefix_ids())
    first = tuple(completion_ids(tokenizer, lab)[gen] for lab in LABELS)
    if first[0] == first[1]:
        raise ValueError(f"labels {LABELS} start with the same token; pick distinguishable labels")
    return first
