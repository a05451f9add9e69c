"""Running the app on uvicorn: in the foreground (`spanjax serve`) or in a background thread
(tests, benchmarks).

SIGTERM / Ctrl-C: uvicorn stops accepting connections and waits for the open ones (running
requests, streams) up to `graceful_s`; the app's lifespan then stops the stepping thread.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn

from spanjax.engine.engine import Engine
from spanjax.server.app import Server, ServerConfig


def uvicorn_config(server: Server, host: str, port: int, graceful_s: float = 60.0, log_level: str = "info"):
    return uvicorn.Config(
        server.app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_s,
        lifespan="on",
        access_log=log_level == "debug",
    )


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServerConfig | None = None,
    graceful_s: float = 60.0,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM / SIGINT, then drain and return."""
    server = Server(engine, config or ServerConfig())
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler it found at start: a
    # no-op one makes a drained shutdown return normally (exit status 0) instead of dying by the signal.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(uvicorn_config(server, host, port, graceful_s, log_level)).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """A real uvicorn server on a loopback port, in a thread (`with BackgroundServer(server) as url:`)."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        self.server = server
        self.host, self.port = host, port or free_port(host)
        self.uv = uvicorn.Server(uvicorn_config(server, self.host, self.port, 10.0, log_level))
        self.thread = threading.Thread(target=self.uv.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.uv.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> str:
        return self.start().url

    def __exit__(self, *exc) -> None:
        self.stop()
