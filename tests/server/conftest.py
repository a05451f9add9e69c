"""One real server for the package: uvicorn on a free loopback port, in a thread, over the tiny
byte-level model (tests/tiny_byte.py), and a second engine for "the same request alone"."""

from __future__ import annotations

import httpx
import pytest
import tiny_byte

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.server import Server, ServerConfig
from spanjax.server.run import BackgroundServer

ENGINE = EngineConfig(num_pages=256, page_size=4, max_tokens_per_step=64, max_seqs_per_step=8, attention="reference")


def tiny():
    return tiny_byte.tiny_model(seed=7, cfg=tiny_byte.tiny_config(max_position_embeddings=4096))


@pytest.fixture(scope="package")
def server():
    srv = Server(Engine(tiny(), ENGINE), ServerConfig(max_n=8))
    bg = BackgroundServer(srv).start()
    srv.url = bg.url
    yield srv
    bg.stop()


@pytest.fixture(scope="package")
def alone():
    """A fresh engine, same model and config: runs a request by itself."""
    return Engine(tiny(), ENGINE)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def pages_in_use(server, timeout: float = 10.0) -> int:
    """KV pages the engine's requests hold, once the loop has caught up (polls /health-free state)."""
    import time

    pool = server.engine.pool
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        used = pool.capacity - pool.num_available()
        if used == 0 and not server.loop.jobs:
            return 0
        time.sleep(0.05)
    return pool.capacity - pool.num_available()
