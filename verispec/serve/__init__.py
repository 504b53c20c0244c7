"""The OpenAI-compatible server: `verispec serve`.

protocol.py  the wire format: request validation, error bodies, completion and chunk objects
scheduler.py the one scheduler thread: queue, admission, sequences stepped together (verispec/stepper.py) on
             a KV pool the target opens (runners/pool.py), emission
goodput.py   how many draft tokens each request may verify, from measured pass costs
memory.py    the start-up check of --ctx / --max-batch / --kv-pool against available memory
metrics.py   Prometheus counters and histograms
app.py       FastAPI routes, API key, body limit, streaming and client disconnects
"""

from .app import ServeConfig, Server, create_app, serve

__all__ = ["ServeConfig", "Server", "create_app", "serve"]
