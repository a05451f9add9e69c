"""`spanjax serve`: one engine behind spnl's span-query endpoint and the OpenAI API.

    from spanjax.server import Server, ServerConfig, serve
    server = Server(engine, ServerConfig())   # server.app is the ASGI app
    serve(engine, host="127.0.0.1", port=8000)

Modules: `loop.py` (the stepping thread and jobs), `app.py` (routes, bounds, streaming),
`openai_api.py` (OpenAI request checks and shapes), `metrics.py` (Prometheus). The top
layer of the package: it may import anything, nothing imports it (tests/test_layers.py).
"""

from spanjax.server.app import Server, ServerConfig, create_app
from spanjax.server.run import serve

__all__ = ["Server", "ServerConfig", "create_app", "serve"]
