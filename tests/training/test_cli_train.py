"""`spanjax train` end to end on SmolLM2-135M (2 steps, tiny contexts): metrics, checkpoints, PEFT export, resume."""

from __future__ import annotations

import json

from spanjax.cli import main


def test_spanjax_train_alora_smoke(tmp_path, capsys, monkeypatch, smollm2_gguf_path):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    argv = ["train", "alora", "configs/alora_answerability_smoke.yaml", f"out_dir={tmp_path}"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    run = tmp_path / "alora_answerability_smoke"
    assert summary["run_dir"] == str(run) and summary["resumed_from"] == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss"] > 0 for m in lines)
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["alora_invocation_tokens"] and cfg["r"] == 2 and (run / "adapter" / "adapter_model.safetensors").exists()
    # Running again finds the finished run's last checkpoint and does no further steps.
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 2
    # Bad overrides are one-line user errors.
    assert main(["train", "lora", "configs/lora_answerability_smoke.yaml", "adapter.r=zero"]) == 2
    assert "adapter.r" in capsys.readouterr().err
