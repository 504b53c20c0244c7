"""The OpenAI-compatible server: `verispec serve`.

protocol.py  the wire format: request validation, error bodies, completion and chunk objects
scheduler.py the waiting queue, request plumbing, and the per-slot-context scheduler (--kv-pool 0)
pooled.py    the default scheduler: a thread per slot over one KV pool, fused passes
pool.py      the shared KV pool of a llama.cpp target (one context, a sequence per request) and its Runner view
paged.py     the shared KV pool of a torch target: paged blocks, our attention function, one forward per decode
fuser.py     gathers the waiting target passes into as few exact pool decodes as it can; chunked prefill
goodput.py   how many draft tokens each request may verify, from measured pass costs
memory.py    the start-up check of --ctx / --max-batch / --kv-pool against available memory
metrics.py   Prometheus counters and histograms
app.py       FastAPI routes, API key, body limit, streaming and client disconnects
"""

from .app import ServeConfig, Server, create_app, serve

__all__ = ["ServeConfig", "Server", "create_app", "serve"]
