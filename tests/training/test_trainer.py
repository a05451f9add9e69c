"""Adapter training on a tiny random model: loss masks, learning, exact resume after a kill, PEFT export."""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from spanjax import config as C
from spanjax.adapters import load_peft
from spanjax.models import llama
from spanjax.models.config import ModelConfig
from spanjax.models.loading import LoadedModel
from spanjax.training.config import AdapterSection, DataSection, OptimSection, TrainConfig
from spanjax.training.core import SimulatedCrash, read_metrics
from spanjax.training.data import Example, batch_indices, make_batch
from spanjax.training.trainer import train

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    eos_token_ids=(2,),
)


class ChatToy:
    """Character tokenizer with a ChatML-like template: [role]content<2>."""

    eos_token_ids = (2,)

    def encode(self, text, add_special_tokens=False):
        return [5 + ord(c) % 50 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)

    def encode_message(self, role, content):
        return [3] + self.encode(role) + [4] + self.encode(content) + [2]

    def generation_prefix_ids(self):
        return [3] + self.encode("assistant") + [4]


def _model():
    return LoadedModel("tiny", CFG, llama.init_params(CFG, jax.random.PRNGKey(0), scale=0.2), ChatToy())


def _write_data(path, n=8):
    rows = []
    for i in range(n):
        yes = i % 2 == 0
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": ("abc" if yes else "xyz") * (1 + i % 3)},
                    {"role": "assistant", "content": "y" if yes else "n"},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _cfg(tmp_path, kind="alora", **kw):
    data = tmp_path / "data.jsonl"
    if not data.exists():
        _write_data(data)
    base = TrainConfig(
        name=f"tiny_{kind}",
        model="tiny",
        out_dir=str(tmp_path / "runs"),
        steps=8,
        batch_size=2,
        checkpoint_every=3,
        adapter=AdapterSection(
            kind=kind, r=2, alpha=4.0, dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj")
        ),
        data=DataSection(source=str(data), invocation="go", max_prefix_tokens=24, max_suffix_tokens=24),
        optim=OptimSection(lr=1e-2, warmup_steps=2),
    )
    return dataclasses.replace(base, **kw)


def test_batches_are_a_function_of_the_step():
    assert batch_indices(5, 2, 7, 0) == batch_indices(5, 2, 7, 0)
    seen = sum((batch_indices(5, 1, s, 0) for s in range(5)), [])
    assert sorted(seen) == [0, 1, 2, 3, 4]  # an epoch is a permutation
    ex = Example(prefix=(10, 11, 12), suffix=(20, 21, 22, 23), invocation_len=2)
    b = make_batch([ex], 4, 6, all_adapted=False)
    assert b.prefix.tolist() == [[10, 11, 12, 0]] and b.prefix_pos.tolist() == [[0, 1, 2, 10]]
    assert b.suffix_pos[0, :4].tolist() == [3, 4, 5, 6]
    # labels 22, 23 (after the 2-token invocation) count; position 1 predicts 22
    assert b.loss_mask[0].tolist() == [0, 1, 1, 0, 0, 0]
    lora = make_batch([ex], 4, 10, all_adapted=True)
    assert lora.prefix.shape == (1, 0) and lora.suffix[0, :7].tolist() == [10, 11, 12, 20, 21, 22, 23]
    assert lora.loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("kind", ["alora", "lora"])
def test_killed_run_resumes_with_the_same_loss_curve(tmp_path, kind):
    model = _model()
    full = train(_cfg(tmp_path, kind), model=model)
    curve = read_metrics(full["run_dir"])
    assert [m["step"] for m in curve] == list(range(1, 9))
    assert curve[-1]["loss"] < curve[0]["loss"]  # it learns

    cfg = _cfg(tmp_path, kind, name=f"killed_{kind}")
    with pytest.raises(SimulatedCrash):
        train(cfg, model=model, crash_after_step=5)  # checkpoint at 3; steps 4-5 are lost and replayed
    assert len(read_metrics(f"{cfg.out_dir}/{cfg.name}")) == 5
    resumed = train(cfg, model=model)
    assert resumed["resumed_from"] == 3
    again = read_metrics(resumed["run_dir"])
    assert [m["step"] for m in again] == list(range(1, 9))
    for a, b in zip(curve, again):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)

    ad = load_peft(f"{full['run_dir']}/adapter", CFG)
    assert ad.config.kind == kind and ad.config.r == 2
    if kind == "alora":
        assert ad.config.invocation_tokens == tuple(ChatToy().encode_message("user", "go"))


def test_run_dir_refuses_a_different_config(tmp_path):
    model = _model()
    train(_cfg(tmp_path, steps=1), model=model)
    with pytest.raises(C.ConfigError, match="different config"):
        train(_cfg(tmp_path, steps=1, batch_size=1), model=model)


def test_bad_data_is_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    cfg = dataclasses.replace(_cfg(tmp_path), data=DataSection(source=str(bad), invocation="go"))
    with pytest.raises(ValueError, match="assistant"):
        train(cfg, model=_model())
