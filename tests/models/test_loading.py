"""Model registry and `load_model` dispatch (registry name, HF directory, .gguf file)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from spanjax.models import loading
from spanjax.models.errors import WeightLoadError


def test_registry_name_resolves_to_the_wheel_gguf(smollm2_gguf_path):
    assert smollm2_gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(smollm2_gguf_path)
    assert loading.resolve(smollm2_gguf_path) == smollm2_gguf_path  # a path is taken as is


def test_loaded_model_eos_includes_end_of_turn(smollm2):
    assert smollm2.name == "smollm2-135m"
    assert smollm2.tokenizer.token_to_id("<|im_end|>") in smollm2.cfg.eos_token_ids


def test_unknown_and_missing(tmp_path):
    with pytest.raises(loading.ModelNotFoundError, match="known names are smollm2-135m"):
        loading.load_model("llama-9000")
    with pytest.raises(loading.ModelNotFoundError, match="does not exist"):
        loading.load_model(str(tmp_path / "x.gguf"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(loading.ModelNotFoundError, match="expected a Hugging Face directory or a .gguf file"):
        loading.load_model(str(other))
    assert issubclass(loading.ModelNotFoundError, WeightLoadError)


def test_hf_directory(tmp_path, tiny_hf_model, smollm2):
    src, _ = tiny_hf_model("llama_tied")
    d = tmp_path / "model"
    d.mkdir()
    for f in os.listdir(src):
        os.symlink(os.path.join(src, f), d / f)
    with pytest.raises(WeightLoadError, match="tokenizer.json"):
        loading.load_model(str(d))
    # Any tokenizer will do for loading: reuse SmolLM2's, with its chat template.
    smollm2.tokenizer.backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": smollm2.tokenizer.chat_template,
                "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>"},
            }
        )
    )
    m = loading.load_model(str(d))
    assert m.name == os.path.abspath(d)
    assert m.cfg.vocab_size == 96 and m.cfg.tie_word_embeddings
    assert {2, 3} <= set(m.cfg.eos_token_ids)  # config.json's eos ids, plus the tokenizer's <|im_end|> (= 2)
    assert m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")
    assert m.tokenizer.bos_token_id == 1 and np.asarray(m.params.embed).shape == (96, 64)
