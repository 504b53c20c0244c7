"""The OpenAI-compatible server: `verispec serve`.

protocol.py  the wire format: request validation, error bodies, completion and chunk objects
scheduler.py the one scheduler thread: queue, admission, sequences stepped together (verispec/stepper.py), emission
pool.py      the shared KV pool of a llama.cpp target (one context, a sequence per request, a prefix cache),
             its fused scoring, and a sequence's Runner view
paged.py     the shared KV pool of a torch target: paged blocks, our attention function, one forward per decode
prefix_cache.py  which finished prompts' prefixes the llama.cpp pool keeps for later requests
goodput.py   how many draft tokens each request may verify, from measured pass costs
memory.py    the start-up check of --ctx / --max-batch / --kv-pool against available memory
metrics.py   Prometheus counters and histograms
app.py       FastAPI routes, API key, body limit, streaming and client disconnects
"""

from .app import ServeConfig, Server, create_app, serve

__all__ = ["ServeConfig", "Server", "create_app", "serve"]
