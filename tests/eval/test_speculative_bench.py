"""eval/speculative_bench.py end to end on SmolLM2 with a small random speculator: one case per
batch size and draft-tree size, outputs identical to the plain engine's, a results file."""

import functools
import json

import jax
import pytest

from spanjax.engine.engine import EngineConfig
from spanjax.models import speculator as S


@pytest.mark.slow
def test_speculative_bench_reports_each_tree_size(tmp_path, monkeypatch, smollm2):
    from spanjax.eval import speculative_bench

    monkeypatch.setattr("spanjax.models.loading.load_model", lambda name: smollm2)
    # Scanned layers: the unrolled 30-layer step compiles ~10x slower and the outputs, not the
    # speed, are under test here (tests/engine/test_engine_smollm2.py).
    monkeypatch.setattr(speculative_bench, "EngineConfig", functools.partial(EngineConfig, layer_loop="scan"))
    sc = S.SpeculatorConfig(emb_dim=576, vocab_size=smollm2.cfg.vocab_size, inner_dim=32, n_predict=2)
    S.export_hf(S.Speculator(sc, S.init_speculator(sc, jax.random.PRNGKey(0))), str(tmp_path / "spec"))
    res = speculative_bench.main(
        [
            "--speculator",
            str(tmp_path / "spec"),
            "--batch-sizes",
            "2",
            "--num-prompts",
            "2",
            "--max-tokens",
            "6",
            "--speculative-candidates",
            "1",
            "2",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert [(c["batch_size"], c["speculative_candidates"]) for c in res["cases"]] == [(2, 1), (2, 2)]
    for case in res["cases"]:
        assert case["identical_outputs"] == 2 and case["speculative_stats"]["drafted"] > 0
        assert case["plain"]["decode_tokens"] == case["speculative"]["decode_tokens"] > 0
        assert case["verify_step_cost_ratio"] > 0
    saved = json.loads(next(tmp_path.glob("speculative_bench-*/results.json")).read_text())
    assert saved["cases"][1]["speculative_candidates"] == 2
