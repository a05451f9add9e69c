"""MLP speculator: the HF MLPSpeculator format round-trips, and the exported weights read
by an independent torch transcription of vLLM's MLPSpeculator.generate_proposals give
the same drafts and logits as spanjax's jitted proposal."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spanjax.models import speculator as S
from spanjax.training.speculator import expand_vocab

VLLM_NAMES = {"emb.{i}.weight", "proj.{i}.weight", "head.{i}.weight", "ln.{i}.weight", "ln.{i}.bias"}


def _spec(tie, scale_input, n=3, inner=24, seed=0):
    cfg = S.SpeculatorConfig(
        emb_dim=16, vocab_size=40, inner_dim=inner, n_predict=n, tie_weights=tie, scale_input=scale_input
    )
    params = S.init_speculator(cfg, jax.random.PRNGKey(seed))
    # non-trivial LN parameters so a transposed or swapped tensor cannot go unnoticed
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1))
    params = params.replace(
        ln_weight=1.0 + 0.3 * jax.random.normal(k1, params.ln_weight.shape),
        ln_bias=0.3 * jax.random.normal(k2, params.ln_bias.shape),
    )
    return S.Speculator(cfg, params)


def torch_proposals(directory, hidden, tokens, n):
    """vLLM's MLPSpeculator forward (greedy sampler), transcribed independently in torch,
    reading config.json and the safetensors by name."""
    import torch  # optional test dependency, imported only by the tests that compare against it
    from safetensors.torch import load_file as load_torch

    cfg = json.load(open(f"{directory}/config.json"))
    w = load_torch(f"{directory}/model.safetensors")
    inner = cfg["inner_dim"] or cfg["emb_dim"]
    state_weight = 0.5 ** (0.5 / cfg["n_predict"])
    emb_weight = math.sqrt((1 - state_weight**2) * (inner / 2))

    def ln(x, weight=None, bias=None, eps=1e-6):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x if weight is None else weight * x + bias

    # vLLM with tie_weights repeats module 0 (proj: module 1 from stage 1 on).
    idx = (lambda i: 0) if cfg["tie_weights"] else (lambda i: i)
    pidx = (lambda i: min(i, 1)) if cfg["tie_weights"] else (lambda i: i)
    state = torch.tensor(np.asarray(hidden))
    if cfg["scale_input"]:
        state = ln(state) / 2**0.5
    last = torch.tensor(np.asarray(tokens), dtype=torch.long)
    drafts, all_logits = [], []
    for i in range(n):
        z = torch.nn.functional.embedding(last, w[f"emb.{idx(i)}.weight"])
        s = state @ w[f"proj.{pidx(i)}.weight"].T
        s = s + z * (emb_weight / state_weight)
        state = torch.nn.functional.gelu(ln(s, w[f"ln.{idx(i)}.weight"], w[f"ln.{idx(i)}.bias"]))
        logits = state @ w[f"head.{idx(i)}.weight"].T
        last = logits.argmax(-1)
        drafts.append(last)
        all_logits.append(logits)
    return torch.stack(drafts, -1).numpy(), [l.numpy() for l in all_logits]


@pytest.mark.parametrize("tie,scale_input", [(False, False), (False, True), (True, True)])
def test_hf_format_round_trip_and_vllm_semantics(tmp_path, tie, scale_input):
    spec = _spec(tie, scale_input)
    d = tmp_path / "spec"
    S.export_hf(spec, str(d), base_model_name_or_path="tiny")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "mlp_speculator" and cfg["architectures"] == ["MLPSpeculatorPreTrainedModel"]
    for k, v in dict(
        emb_dim=16,
        inner_dim=24,
        vocab_size=40,
        n_predict=3,
        tie_weights=tie,
        scale_input=scale_input,
        top_k_tokens_per_head=[1, 1, 1],
        n_candidates=1,
    ).items():
        assert cfg[k] == v, k
    w = load_file(str(d / "model.safetensors"))
    assert set(w) == {n.format(i=i) for n in VLLM_NAMES for i in range(3)}
    assert w["emb.1.weight"].shape == (40, 24) and w["head.2.weight"].shape == (40, 24)
    assert w["proj.0.weight"].shape == (24, 16) and w["proj.1.weight"].shape == (24, 24)  # torch [out, in]

    back = S.load_hf(str(d))
    assert back.config == spec.config
    for a, b in zip(jax.tree_util.tree_leaves(spec.params), jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(5, 16)).astype(np.float32) * 3
    tokens = rng.integers(0, 40, 5)
    want_drafts, want_logits = torch_proposals(str(d), hidden, tokens, 3)
    got = np.asarray(jax.jit(lambda p, h, t: S.propose(p, spec.config, h, t))(back.params, hidden, tokens))
    np.testing.assert_array_equal(got[:, 0], want_drafts)
    # teacher-forced training logits equal the proposal's when fed the drafted tokens
    seq_tokens = np.concatenate([tokens[:, None], want_drafts], axis=1)  # [5, 1 + 3]
    logits = S.teacher_forced_logits(back.params, spec.config, hidden[:, None, :], seq_tokens)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(logits[i][:, 0]), want_logits[i], rtol=1e-4, atol=1e-4)


def test_design_weights_and_config_checks():
    cfg = S.SpeculatorConfig(emb_dim=576, vocab_size=10, inner_dim=256, n_predict=3)
    assert cfg.state_weight == pytest.approx(0.5 ** (0.5 / 3))
    assert cfg.emb_weight == pytest.approx(math.sqrt((1 - cfg.state_weight**2) * 128))
    assert S.SpeculatorConfig(emb_dim=8, vocab_size=10).dim == 8  # inner_dim 0 = emb_dim
    with pytest.raises(ValueError, match="tie_weights"):
        S.SpeculatorConfig(emb_dim=8, vocab_size=10, n_predict=1, tie_weights=True)


def test_load_reports_missing_weights(tmp_path):
    spec = _spec(False, False)
    S.export_hf(spec, str(tmp_path))
    w = load_file(str(tmp_path / "model.safetensors"))
    del w["head.1.weight"]
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="head.1.weight"):
        S.load_hf(str(tmp_path))


def test_unstacked_params_propose_the_same():
    spec = _spec(False, True)
    h = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    t = np.array([1, 5, 7])
    a = S.propose(spec.params, spec.config, h, t)
    b = jax.jit(lambda p, h, t: S.propose(p, spec.config, h, t))(S.unstack(spec.params), h, t)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_draft_params_propose_over_distinct_columns_only():
    """A speculator trained over a reduced vocabulary is exported with all rare tokens sharing one
    column; the inference form keeps the distinct columns and still returns the full-vocabulary
    argmax (the lowest id among equal columns), whether a draft is a kept or a rare token."""
    cfg = S.SpeculatorConfig(emb_dim=16, vocab_size=11, inner_dim=24, n_predict=3, scale_input=True)
    small = S.init_speculator(cfg, jax.random.PRNGKey(3))
    lut = np.full(40, 10, np.int32)
    kept = np.array([3, 7, 12, 18, 21, 25, 30, 33, 36, 39])  # full ids of the 10 frequent tokens
    lut[kept] = np.arange(10)
    full_cfg = S.SpeculatorConfig(emb_dim=16, vocab_size=40, inner_dim=24, n_predict=3, scale_input=True)
    full = jax.tree_util.tree_map(jnp.asarray, expand_vocab(small, lut))
    rng = np.random.default_rng(2)
    h = rng.normal(size=(64, 16)).astype(np.float32)
    t = rng.integers(0, 40, size=64)
    draft = S.draft_params(full)
    assert [x.shape for x in draft.head] == [(24, 11)] * 3
    assert [np.asarray(i).tolist() for i in draft.head_ids] == [sorted(kept.tolist() + [0])] * 3  # 0: first rare id
    want = np.asarray(S.propose(full, full_cfg, h, t))
    got = np.asarray(jax.jit(lambda p, h, t: S.propose(p, full_cfg, h, t))(draft, h, t))
    np.testing.assert_array_equal(got, want)
    assert (want == 0).any() and np.isin(want, kept).any()  # both kinds of draft occur
    # A draft tree's candidates are distinct columns: at most one of them is the (first) rare token.
    tree = np.asarray(S.propose(draft, full_cfg, h, t, candidates=3))
    np.testing.assert_array_equal(tree[:, 0], got[:, 0])
    assert all(len(set(row)) == 3 and set(row) <= set(kept.tolist()) | {0} for row in tree[:, :, 0].tolist())


def test_draft_tree_branches_at_head_0_and_continues_greedily():
    """Candidate c = head 0's c-th most likely token, then the greedy continuation: the argmax of
    the teacher-forced logits fed that candidate's own tokens (an independent forward)."""
    spec = _spec(False, True)
    rng = np.random.default_rng(4)
    h = rng.normal(size=(6, 16)).astype(np.float32) * 3
    t = rng.integers(0, 40, 6)
    tree = np.asarray(
        jax.jit(lambda p, h, t: S.propose(p, spec.config, h, t, candidates=4))(S.draft_params(spec.params), h, t)
    )
    assert tree.shape == (6, 4, 3)
    order = np.argsort(
        -np.asarray(S.teacher_forced_logits(spec.params, spec.config, h[:, None], np.stack([t] * 4, 1))[0][:, 0]),
        axis=-1,
    )
    np.testing.assert_array_equal(tree[:, :, 0], order[:, :4])
    for c in range(4):
        seq = np.concatenate([t[:, None], tree[:, c]], axis=1)
        logits = S.teacher_forced_logits(spec.params, spec.config, h[:, None], seq)
        for i in (1, 2):
            np.testing.assert_array_equal(tree[:, c, i], np.asarray(logits[i][:, 0]).argmax(-1))
