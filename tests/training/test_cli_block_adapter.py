"""`spanjax train block-adapter` end to end on SmolLM2-135M (2 steps, 2 short documents):
metrics, data summary, PEFT export with the question-opening invocation, resume, errors."""

from __future__ import annotations

import json

from spanjax.cli import main


def test_spanjax_train_block_adapter_smoke(tmp_path, capsys, monkeypatch, smollm2_gguf_path):
    monkeypatch.setenv("SPANJAX_NO_PROGRESS", "1")
    argv = ["train", "block-adapter", "configs/block_alora_smoke.yaml", f"out_dir={tmp_path}"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    run = tmp_path / "block_alora_smoke"
    assert summary["run_dir"] == str(run) and summary["resumed_from"] == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss"] > 0 and m["loss_tokens"] > 0 for m in lines)
    data = json.loads((run / "data.json").read_text())
    assert data["questions"][1] < 2000 and data["invocation_ids"]
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    # <|im_start|>user\nQuestion:  opens the question message: the aLoRA is invoked at the question.
    assert cfg["alora_invocation_tokens"] == data["invocation_ids"] == [1, 4093, 198, 17872, 42]
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["resumed_from"] == 2
    # A preset without block-attention data is refused in one line.
    assert main(["train", "block-adapter", "configs/alora_answerability_smoke.yaml", f"out_dir={tmp_path}"]) == 2
    assert "expected nq_blocks" in capsys.readouterr().err
