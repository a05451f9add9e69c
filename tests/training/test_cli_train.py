"""`spanjax train` end to end on SmolLM2-135M (2 steps, tiny contexts): metrics, checkpoints,
PEFT export, resume and one-line errors, for `alora`/`lora` and `block-adapter`."""

from __future__ import annotations

import json

from spanjax.cli import main


def _train_fresh_then_resume(argv, run, capsys):
    """Run a 2-step preset, check the summary and metrics, then rerun it: the rerun resumes at
    the finished run's last checkpoint and does no further steps. Returns the metrics lines."""
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_dir"] == str(run) and summary["resumed_from"] == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss"] > 0 for m in lines)
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["resumed_from"] == 2
    return lines


def test_spanjax_train_alora_smoke(tmp_path, capsys, monkeypatch, smollm2_gguf_path):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    argv = ["train", "alora", "configs/alora_answerability_smoke.yaml", f"out_dir={tmp_path}"]
    run = tmp_path / "alora_answerability_smoke"
    _train_fresh_then_resume(argv, run, capsys)
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["alora_invocation_tokens"] and cfg["r"] == 2
    # Bad overrides are one-line user errors.
    assert main(["train", "lora", "configs/lora_answerability_smoke.yaml", "adapter.r=zero"]) == 2
    assert "adapter.r" in capsys.readouterr().err


def test_spanjax_train_block_adapter_smoke(tmp_path, capsys, monkeypatch, smollm2_gguf_path):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    argv = ["train", "block-adapter", "configs/block_alora_smoke.yaml", f"out_dir={tmp_path}"]
    run = tmp_path / "block_alora_smoke"
    lines = _train_fresh_then_resume(argv, run, capsys)
    assert all(m["loss_tokens"] > 0 for m in lines)
    data = json.loads((run / "data.json").read_text())
    assert data["questions"][1] < 2000 and data["invocation_ids"]
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    # <|im_start|>user\nQuestion:  opens the question message: the aLoRA is invoked at the question.
    assert cfg["alora_invocation_tokens"] == data["invocation_ids"] == [1, 4093, 198, 17872, 42]
    # A preset without block-attention data is refused in one line.
    assert main(["train", "block-adapter", "configs/alora_answerability_smoke.yaml", f"out_dir={tmp_path}"]) == 2
    assert "expected nq_blocks" in capsys.readouterr().err
