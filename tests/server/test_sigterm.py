"""SIGTERM drains: a stream running when the signal arrives finishes with all its tokens and
[DONE], new connections are refused, and the process exits 0 (`spanjax serve` runs `serve()`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from spanjax.server.run import free_port

HERE = Path(__file__).resolve().parent
SERVER = """
import sys
sys.path[:0] = [{here!r}, {tests!r}]
from conftest import ENGINE, tiny
from spanjax.engine.engine import Engine
from spanjax.server.run import serve
serve(Engine(tiny(), ENGINE), port={port}, graceful_s=60, log_level="warning")
"""
MAX_TOKENS = 48


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not start")


def test_sigterm_drains_the_running_stream_and_exits_cleanly():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = SERVER.format(tests=str(HERE.parent), here=str(HERE), port=port)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, proc)
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        events, signalled = [], False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if not signalled and events[-1] != "[DONE]" and json.loads(events[-1])["choices"]:
                    proc.send_signal(signal.SIGTERM)  # mid-stream: the first token has arrived
                    signalled = True
                    time.sleep(0.5)  # uvicorn closes its listening socket
                    try:
                        httpx.get(url + "/health", timeout=5)
                        refused = False
                    except httpx.TransportError:
                        refused = True
        assert signalled and refused
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS  # greedy runs to max_tokens here: none lost to the signal
        text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
        assert len(text) > 0
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
