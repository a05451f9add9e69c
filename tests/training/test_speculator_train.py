"""Speculator training on a tiny random model: both stages learn, a killed run resumes with
the same loss curve, and the export loads back as the trained weights."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from spanjax.cli import main
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.sampling import SamplingParams
from spanjax.models import llama
from spanjax.models import speculator as S
from spanjax.models.config import ModelConfig
from spanjax.models.loading import LoadedModel
from spanjax.query import ast as A
from spanjax.query.lower import lower
from spanjax.training.core import SimulatedCrash, read_metrics
from spanjax.training.speculator import simulated_tokens_per_forward, speculator_loss, stage2_val_mask, train
from spanjax.training.speculator_config import SpeculatorDataSection, SpeculatorSection, SpeculatorTrainConfig

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    eos_token_ids=(2,),
    tie_word_embeddings=False,
)


class ChatToy:
    """Character tokenizer with a ChatML-like template: [3]role[4]content[2]."""

    eos_token_ids = (2,)

    def encode(self, text, add_special_tokens=False):
        return [5 + ord(c) % 50 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def encode_message(self, role, content):
        return [3] + self.encode(role) + [4] + self.encode(content) + [2]

    def generation_prefix_ids(self):
        return [3] + self.encode("assistant") + [4]


def _model():
    return LoadedModel("tiny", CFG, llama.init_params(CFG, jax.random.PRNGKey(1), scale=0.3), ChatToy())


def _cfg(tmp_path, **kw):
    text, prompts = tmp_path / "text.jsonl", tmp_path / "prompts.jsonl"
    if not text.exists():
        rng = np.random.default_rng(0)
        words = ["alpha", "beta", "gamma", "delta", "eps"]
        text.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n" for _ in range(12)))
        prompts.write_text(
            "".join(
                json.dumps({"messages": [{"role": "user", "content": w * (1 + i % 3)}]}) + "\n"
                for i, w in enumerate(words * 2)
            )
        )
    base = SpeculatorTrainConfig(
        name="tiny_spec",
        model="tiny",
        out_dir=str(tmp_path / "runs"),
        stage1_steps=4,
        stage2_steps=6,
        batch_size=4,
        checkpoint_every=3,
        speculator=SpeculatorSection(n_predict=3, inner_dim=16, scale_input=True),
        data=SpeculatorDataSection(
            stage1_source=str(text),
            stage1_examples=12,
            stage2_source=str(prompts),
            stage2_prompts=10,
            max_new_tokens=12,
            temperature=0.7,
            gen_batch_size=4,
            seq_len=24,
        ),
        optim=dataclasses.replace(SpeculatorTrainConfig().optim, lr=2e-2, warmup_steps=1),
    )
    return dataclasses.replace(base, **kw)


def test_killed_run_resumes_with_the_same_loss_curve(tmp_path, monkeypatch):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    model = _model()
    full = train(_cfg(tmp_path), model=model)
    curve = read_metrics(full["run_dir"])
    assert [m["step"] for m in curve] == list(range(1, 11))
    assert [m["stage"] for m in curve] == [1] * 4 + [2] * 6
    s2 = [m["loss"] for m in curve if m["stage"] == 2]
    assert s2[-1] < s2[0]  # it learns the model's own continuations

    cfg = _cfg(tmp_path, name="killed")
    with pytest.raises(SimulatedCrash):
        train(cfg, model=model, crash_after_step=8)  # checkpoint at 6; steps 7-8 are lost and replayed
    resumed = train(cfg, model=model)
    assert resumed["resumed_from"] == 6
    again = read_metrics(resumed["run_dir"])
    assert [m["step"] for m in again] == list(range(1, 11))
    for a, b in zip(curve, again):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)

    # The export is the trained speculator: its loss on a cached batch equals the last logged loss's model.
    spec = S.load_hf(f"{full['run_dir']}/speculator")
    assert spec.config == S.SpeculatorConfig(emb_dim=32, vocab_size=64, inner_dim=16, n_predict=3, scale_input=True)
    with np.load(f"{full['run_dir']}/cache/stage2.npz") as z:
        hid, tok, mask = z["hidden"][:4], z["tokens"][:4], z["mask"][:4]
    pad = ((0, 0), (0, 3))
    loss, _ = speculator_loss(spec.params, spec.config, hid, np.pad(tok, pad), np.pad(mask, pad))
    assert np.isfinite(float(loss)) and float(loss) < curve[4]["loss"]


def test_stage2_data_is_the_models_own_continuation(tmp_path, monkeypatch):
    """Cached stage-2 hidden[j] is the base state that chose tokens[j]: with greedy
    generation, argmax of its logits is that token."""
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    model = _model()
    cfg = _cfg(
        tmp_path,
        name="greedy",
        stage1_steps=0,
        stage2_steps=1,
        data=dataclasses.replace(_cfg(tmp_path).data, temperature=0.0),
    )
    run = train(cfg, model=model)["run_dir"]
    with np.load(f"{run}/cache/stage2.npz") as z:
        hid, tok, mask = z["hidden"], z["tokens"], z["mask"]
    pred = np.asarray(llama.compute_logits(model.params, model.cfg, hid)).argmax(-1)
    m = mask > 0
    assert m.sum() > 50 and (pred[m] == tok[m]).mean() > 0.99


def test_training_vocabulary_is_expanded_at_export(tmp_path, monkeypatch):
    """train_vocab: rare tokens share one trained row/column; the export has the full vocabulary."""
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    cfg = _cfg(
        tmp_path,
        name="vocab",
        stage1_steps=1,
        stage2_steps=2,
        speculator=SpeculatorSection(n_predict=2, inner_dim=8, train_vocab=12),
    )
    run = train(cfg, model=_model())["run_dir"]
    spec = S.load_hf(f"{run}/speculator")
    assert spec.config.vocab_size == 64 and spec.params.emb.shape == (2, 64, 8)
    head = np.asarray(spec.params.head[0]).T  # [V, D]
    distinct = {tuple(np.round(r, 6)) for r in head}
    assert len(distinct) == 12  # 11 frequent tokens + the shared rare-token column


@pytest.mark.slow
def test_spanjax_train_speculator_smoke(tmp_path, capsys, monkeypatch, smollm2_gguf_path):
    """`spanjax train speculator` on SmolLM2 (1 step per stage, tiny data): metrics, HF export, resume."""
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    argv = ["train", "speculator", "configs/speculator_smollm2_smoke.yaml", f"out_dir={tmp_path}"]
    assert main(argv) == 0
    run = tmp_path / "speculator_smollm2_smoke"
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 0
    lines = read_metrics(run)
    assert [(m["step"], m["stage"]) for m in lines] == [(1, 1), (2, 2)] and all(m["loss"] > 0 for m in lines)
    cfg = json.loads((run / "speculator" / "config.json").read_text())
    assert (
        cfg["model_type"] == "mlp_speculator"
        and cfg["vocab_size"] == 49152
        and cfg["emb_dim"] == 576
        and cfg["tie_weights"]
    )
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["resumed_from"] == 2
    assert main(["train", "speculator", "configs/speculator_smollm2_smoke.yaml", "speculator.n_predict=zero"]) == 2
    assert "speculator.n_predict" in capsys.readouterr().err


def test_sampled_continuations_extend_the_greedy_ones(tmp_path, monkeypatch):
    """data.sampled_prompts adds one sampled continuation for the first prompts after the greedy
    ones; a run directory holding the greedy rows keeps them and generates only the new ones."""
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    model = _model()
    greedy_data = dataclasses.replace(_cfg(tmp_path).data, temperature=0.0)
    greedy = train(_cfg(tmp_path, name="greedy_only", stage1_steps=0, stage2_steps=1, data=greedy_data), model=model)[
        "run_dir"
    ]
    rows = [json.loads(l) for l in open(f"{greedy}/stage2.jsonl")]
    assert len(rows) == 10 and all(r["temperature"] == 0.0 for r in rows)

    mixed = tmp_path / "runs" / "mixed"
    mixed.mkdir()
    rows[0]["completion"] = rows[0]["completion"][:3]  # marks the row: it must be kept, not regenerated
    (mixed / "stage2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(
        tmp_path,
        name="mixed",
        stage1_steps=0,
        stage2_steps=1,
        data=dataclasses.replace(greedy_data, sampled_prompts=4, sample_temperature=1.5),
    )
    train(cfg, model=model)
    got = [json.loads(l) for l in open(mixed / "stage2.jsonl")]
    assert got[:10] == rows
    assert [r["prompt"] for r in got[10:]] == [r["prompt"] for r in rows[:4]]
    assert all(r["temperature"] == 1.5 for r in got[10:])
    assert any(a["completion"] != b["completion"] for a, b in zip(got[10:], rows[:4]))  # sampled, not greedy
    with np.load(mixed / "cache" / "stage2.npz") as z:
        assert z["tokens"].shape[0] == sum(bool(r["completion"]) for r in got) > 10  # the cached data holds both

    with pytest.raises(ValueError, match="sampled_prompts"):
        _cfg(tmp_path, data=dataclasses.replace(greedy_data, sampled_prompts=11))  # more than stage2_prompts


def test_simulated_tokens_per_forward_walks_like_the_engine():
    """From the last emitted token the leading correct heads are accepted plus the verifier's token."""
    correct = np.zeros((1, 8, 2), bool)
    correct[0, 0] = [True, True]  # tokens 1, 2 accepted, 3 from the verifier: 3 tokens, next draft at 3
    correct[0, 1] = [True, True]  # never read: position 1 is skipped over
    correct[0, 3] = [True, False]  # 4 accepted, 5 verifier's: next draft at 5
    correct[0, 5] = [True, True]  # 6 accepted, 7 verifier's: the end (length 8)
    assert simulated_tokens_per_forward(correct, np.array([8])) == 7 / 3
    assert simulated_tokens_per_forward(correct, np.array([5])) == 4 / 2  # 1-3, then only 4 is left
    assert simulated_tokens_per_forward(np.zeros((2, 8, 2), bool), np.array([8, 1])) == 1.0


def test_validation_split_predicts_the_engines_tokens_per_forward(tmp_path, monkeypatch):
    """data.val_prompts: the last prompts' continuations are never trained on, and the logged
    tokens per forward on them is what the speculative engine decodes them with."""
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    model = _model()
    data = dataclasses.replace(_cfg(tmp_path).data, temperature=0.0, val_prompts=4)
    cfg = _cfg(tmp_path, name="val", stage1_steps=2, stage2_steps=30, eval_every=8, data=data)
    summary = train(cfg, model=model)
    lines = read_metrics(summary["run_dir"])
    assert [m["step"] for m in lines if "val_tokens_per_forward" in m] == [8, 16, 24, 32]
    assert summary["val_tokens_per_forward"] == lines[-1]["val_tokens_per_forward"] > 1.0

    rows = [json.loads(l) for l in open(f"{summary['run_dir']}/stage2.jsonl")]
    assert stage2_val_mask(cfg, model.tokenizer, tmp_path / "runs" / "val").tolist() == [i >= 6 for i in range(10)]
    with np.load(f"{summary['run_dir']}/cache/stage2.npz") as z:
        assert len(z["tokens"]) == 10

    messages = [json.loads(l)["messages"] for l in open(tmp_path / "prompts.jsonl")][6:10]
    plans = [
        lower(
            A.G("tiny", A.Cross(tuple(A.Message(m["role"], m["content"]) for m in msgs))),
            model.tokenizer,
            model="tiny",
            page_size=4,
        )
        for msgs in messages
    ]
    engine = Engine(
        model,
        EngineConfig(num_pages=128, page_size=4, max_tokens_per_step=64, attention="reference"),
        speculator=S.load_hf(f"{summary['run_dir']}/speculator"),
    )
    reqs = engine.generate(plans, [SamplingParams(max_tokens=cfg.data.max_new_tokens)] * 4)
    assert [r.generated for r in reqs] == [r["completion"] for r in rows[6:]]
    stats = engine.spec_stats
    assert summary["val_tokens_per_forward"] == pytest.approx(stats["emitted"] / stats["verify_forwards"])
    # A draft tree of 2 candidates, at batch 1 so that every candidate is verified.
    tree = Engine(
        model,
        EngineConfig(
            num_pages=128,
            page_size=4,
            max_tokens_per_step=64,
            max_running=1,
            attention="reference",
            speculative_candidates=2,
        ),
        speculator=S.load_hf(f"{summary['run_dir']}/speculator"),
    )
    assert [r.generated for r in tree.generate(plans, [SamplingParams(max_tokens=cfg.data.max_new_tokens)] * 4)] == [
        r.generated for r in reqs
    ]
    stats = tree.spec_stats
    assert summary["val_tokens_per_forward_2_candidates"] == pytest.approx(stats["emitted"] / stats["verify_forwards"])
    assert summary["val_tokens_per_forward_2_candidates"] > summary["val_tokens_per_forward"]
