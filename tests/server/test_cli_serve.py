"""`spanjax serve`: its own subparser, defaults that bind loopback, and a lazy import (the server
stack is not loaded by `spanjax --help` or any other subcommand)."""

from __future__ import annotations

import subprocess
import sys

from spanjax.cli.main import build_parser, main


def test_serve_arguments_and_defaults():
    args = build_parser().parse_args(["serve", "--model", "smollm2-135m"])
    assert (args.host, args.port, args.config, args.api_key) == ("127.0.0.1", 8000, None, None)
    argv = ["serve", "--model", "m", "--port", "9000", "--api-key", "k", "--config", "e.yaml"]
    args = build_parser().parse_args(argv)
    assert (args.port, args.api_key, args.config) == (9000, "k", "e.yaml")


def test_bad_engine_config_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "engine.yaml"
    bad.write_text("num_pages: lots\n")
    assert main(["serve", "--model", "smollm2-135m", "--config", str(bad)]) == 2
    assert "num_pages" in capsys.readouterr().err


def test_the_cli_does_not_import_the_server_stack():
    code = "import sys; from spanjax.cli.main import build_parser; build_parser(); "
    code += "print(sorted(m for m in ('spanjax.server', 'uvicorn', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
