"""Block-attention adapter data and training loop (training/block_adapter.py) on a tiny
random model: the data are the locality eval's queries lowered by the span planner (DEV
questions only), and a run learns, resumes exactly after a kill and exports PEFT.
(The forward's parity with the dense reference and the engine: test_block_adapter.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from tiny_byte import CFG, tiny_model

from spanjax.adapters import load_peft
from spanjax.eval import locality as L
from spanjax.query.fake import SPECIAL
from spanjax.query.lower import lower
from spanjax.training import block_adapter as BA
from spanjax.training.config import AdapterSection, DataSection, OptimSection, TrainConfig
from spanjax.training.core import SimulatedCrash, read_metrics
from spanjax.training.trainer import train

PAGE = 4


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_training_examples_are_the_eval_queries_from_dev_only(model):
    tok = model.tokenizer
    data = DataSection(source="nq_blocks", invocation="Question:", num_docs=3, max_doc_tokens=20, num_train_questions=4)
    exs = BA.source_examples(data, 0, tok)
    ev = L.LocalityEval(split="dev", num_docs=3, num_questions=4, max_doc_tokens=20)
    assert exs == L.locality_examples(ev, 0, tok) and [e.index for e in exs] == [0, 1, 2, 3]
    ex = exs[1]
    ans = BA.answer_ids(tok, ex.answers[0])
    assert ans == tok.encode(ex.answers[0]) + [SPECIAL["end"]]
    for policy in ("sequential", "parallel"):
        low = BA.lower_example(ex, 2, policy, tok, "tiny", PAGE, ans)
        plan = lower(L.make_g(ex, 2, f"span-{policy}", "tiny", 8), tok, model="tiny", page_size=PAGE)
        assert plan.position_policy == policy and plan.attention_policy == "prefix"
        n0 = plan.num_tokens
        np.testing.assert_array_equal(low.tokens[:n0], [t for s in plan.spans for t in s.token_ids])
        np.testing.assert_array_equal(low.mask[:n0, :n0], plan.dense_mask())
        assert low.tokens[n0:].tolist() == ans and low.positions[n0] == plan.generation_position
        assert f"Document [3]{ex.gold}".encode() in bytes(t for t in low.tokens.tolist() if t < 256)


def _cfg(tmp_path, kind, **kw):
    base = TrainConfig(
        name=f"block_{kind}",
        model="tiny",
        out_dir=str(tmp_path / "runs"),
        steps=6,
        batch_size=2,
        checkpoint_every=2,
        adapter=AdapterSection(
            kind=kind, r=2, alpha=4.0, dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj")
        ),
        data=DataSection(
            source="nq_blocks",
            invocation="Question:",
            num_docs=2,
            max_doc_tokens=12,
            num_train_questions=2,
            max_prefix_tokens=320,
            max_suffix_tokens=160,
            max_answer_tokens=48,
        ),
        optim=OptimSection(lr=1e-2, warmup_steps=1),
    )
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("kind", ["alora", "lora"])
def test_block_training_learns_resumes_exactly_and_exports(model, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    full = train(_cfg(tmp_path, kind), model=model)
    curve = read_metrics(full["run_dir"])
    assert [m["step"] for m in curve] == list(range(1, 7)) and curve[-1]["loss"] < curve[0]["loss"]
    cfg = _cfg(tmp_path, kind, name=f"killed_{kind}")
    with pytest.raises(SimulatedCrash):
        train(cfg, model=model, crash_after_step=3)
    resumed = train(cfg, model=model)
    assert resumed["resumed_from"] == 2
    again = read_metrics(resumed["run_dir"])
    assert [(m["loss"], m["grad_norm"]) for m in again] == [(m["loss"], m["grad_norm"]) for m in curve]
    ad = load_peft(f"{full['run_dir']}/adapter", CFG)
    assert ad.config.kind == kind
    if kind == "alora":
        assert ad.config.invocation_tokens == tuple([SPECIAL["user"]] + list(b"Question: "))
    assert (Path(full["run_dir"]) / "data.json").exists()
