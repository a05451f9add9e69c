"""The locality task's examples and metrics (spanjax.tasks.locality) over the shared data
(spanjax.tasks.data): answer normalization, determinism, clean distractors, splits."""

from __future__ import annotations

import pytest

from spanjax.tasks.data import DEV, HELD_OUT, data_dir
from spanjax.tasks.locality import kv_correct, kv_examples, normalize_answer, nq_correct, nq_examples

# ---------------------------------------------------------------------------- metric


@pytest.mark.parametrize(
    "text, norm",
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an Apple, a day", "apple day"),
        ("U.S.A.", "usa"),
        ("Theatre of the Absurd", "theatre of absurd"),  # 'the' inside a word is kept
        ("  \tNew\nYork ", "new york"),
    ],
)
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_nq_and_kv_metrics():
    assert nq_correct("I think it was the Eiffel tower.", ["Eiffel Tower"])
    assert nq_correct("answer: 1,000 people", ["1000 people"])
    assert not nq_correct("Paris", ["London", "Berlin"])
    assert not nq_correct("anything", ["the"])  # an answer that normalizes to '' never counts
    assert kv_correct('the value is "abc-123"', "abc-123") and not kv_correct("abc-12", "abc-123")


# ---------------------------------------------------------------------------- examples


def test_data_dir_is_shared_data_beside_the_checkout(monkeypatch):
    monkeypatch.delenv("SPANJAX_DATA", raising=False)
    assert (data_dir() / "nq-open-oracle.jsonl.gz").exists()
    assert DEV == range(0, 2000) and HELD_OUT == range(2000, 2655)


def test_nq_examples_are_deterministic_and_clean():
    ev = dict(split="dev", num_docs=5, num_questions=3)
    a, b = nq_examples(**ev, seed=0), nq_examples(**ev, seed=0)
    assert a == b and [e.index for e in a] == [0, 1, 2]
    assert nq_examples(**ev, seed=1)[0].docs != a[0].docs  # the seed picks the distractors
    for ex in a:
        assert len(ex.docs) == 4
        assert not any(nq_correct(d, ex.answers) for d in ex.docs)  # only the gold can answer
        for p in range(5):
            docs = ex.documents(p)
            assert docs[p] == f"Document [{p + 1}]{ex.gold}" and len(docs) == 5
    held = nq_examples(split="held_out", num_docs=3, num_questions=2, seed=0)
    assert [e.index for e in held] == [2000, 2001]
    assert all(idx >= 2000 for e in held for idx in [e.index])


def test_kv_examples_put_the_key_chunk_anywhere():
    for ex in kv_examples(split="dev", num_docs=4, num_questions=2, seed=0):
        assert len(ex.docs) == 3 and ex.answers[0] in ex.gold and not any(ex.answers[0] in d for d in ex.docs)
        for p in range(4):
            assert ex.answers[0] in ex.documents(p)[p]
