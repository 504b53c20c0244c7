"""The OpenAI-compatible server: `verispec serve`.

protocol.py  the wire format: request validation, error bodies, completion and chunk objects
scheduler.py slots, the waiting queue, one step per active request per round, speculation on/off
metrics.py   Prometheus counters and histograms
app.py       FastAPI routes, API key, body limit, streaming and client disconnects

Requests interleave step by step over `--max-batch` slots, but each request's target pass still
runs on its own context: passes are not fused into one batch (see scheduler.py).
"""

from .app import ServeConfig, Server, create_app, serve

__all__ = ["ServeConfig", "Server", "create_app", "serve"]
