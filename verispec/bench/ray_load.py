"""Load test of `verispec serve --ray` against the single-machine server, in one run.

    python -m verispec.bench.ray_load --model smollm2-135m --requests 16 --max-tokens 48

1. Routing overhead: the same short greedy requests one at a time (concurrency 1) to the direct
   server (uvicorn in this process) and through Ray Serve (1 replica), both on 1 llama.cpp thread.
2. Scaling: throughput at --concurrency (default 8) for each of --layouts, e.g. "1x1,1x2,2x1"
   (replicas x threads per replica), on one local Ray cluster, redeployed between layouts.

Not a timed test: it prints a markdown table (and writes JSON with --out). The machine's load
average is printed with it, because other work on the same cores changes every number here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import httpx

from ..prompts import load_prompts


# Latency runs use short prompts, so that prefill does not hide the routing cost.
SHORT = ["def add(a, b):", "The capital of France is", "Once upon a time", "import numpy as np\n",
         "Q: What is 2 + 2?\nA:", "Dear Sir or Madam,", "for i in range(10):", "The quick brown fox"]


@dataclass
class Run:
    target: str  # "direct" or "ray RxT"
    concurrency: int
    requests: int
    seconds: float
    tokens: int
    latencies: list[float]
    replicas: dict[str, int] = field(default_factory=dict)  # x-verispec-replica -> requests served

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def row(self) -> str:
        p50 = statistics.median(self.latencies)
        p90 = sorted(self.latencies)[max(0, round(0.9 * len(self.latencies)) - 1)]
        spread = "/".join(str(n) for n in sorted(self.replicas.values(), reverse=True)) or "-"
        return (f"| {self.target} | {self.concurrency} | {self.requests} | {self.tokens_per_second:.1f} | "
                f"{p50 * 1000:.0f} | {p90 * 1000:.0f} | {spread} |")


def drive(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, target: str) -> Run:
    """Send every prompt once (greedy, fixed length) with `concurrency` in flight; time the whole batch."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def one(prompt: str) -> tuple[float, int]:
        started = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": prompt}, timeout=300)
        r.raise_for_status()
        with lock:
            seen[r.headers.get("x-verispec-replica", "direct")] += 1
        return time.perf_counter() - started, r.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - started
    return Run(target, concurrency, len(prompts), seconds, sum(n for _, n in results), [t for t, _ in results],
               {} if target.startswith("direct") else dict(seen))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_server(model: str, draft: str, ctx: int, max_batch: int):
    """The single-machine server on 1 thread in a background thread; returns (url, stop)."""
    import uvicorn

    from .. import load
    from ..serve import ServeConfig, Server, create_app

    base = load(model, draft=draft, n_ctx=min(ctx, 512), n_threads=1)
    server = Server(base, ServeConfig(model=model, max_batch=max_batch, ctx=ctx))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)

    def stop() -> None:
        uv.should_exit = True
        thread.join(30)
        server.close()
        base.close()

    return f"http://127.0.0.1:{port}", stop


def cluster_config(args, replicas: int, threads: int, port: int):
    from ..serve import ServeConfig
    from ..serve.cluster import ClusterConfig, ReplicaSpec

    serve = ServeConfig(model=args.model, max_batch=args.max_batch, ctx=args.ctx)
    return ClusterConfig(ReplicaSpec(args.model, args.draft, "auto", threads, serve), replicas=replicas, port=port)


def redeploy(config, remove_first: bool) -> str:
    """A fresh deployment; the old one goes first, so its CPUs are free for the new replicas."""
    from ray import serve

    from ..serve.cluster import deploy
    from ..serve.cluster.launch import APP_NAME

    if remove_first:
        serve.delete(APP_NAME)
    return deploy(config)


def parse_layouts(text: str) -> list[tuple[int, int]]:
    return [(int(r), int(t)) for r, t in (part.strip().split("x") for part in text.split(","))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft", default="ngram")
    p.add_argument("--requests", type=int, default=16, help="requests per throughput run")
    p.add_argument("--latency-requests", type=int, default=8, help="sequential requests per latency run")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--latency-max-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--layouts", default="1x1,1x2,2x1", help="replicas x threads per replica, comma-separated")
    p.add_argument("--max-batch", type=int, default=8, help="slots per replica (and of the direct server)")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--out", help="write the runs as JSON here")
    args = p.parse_args(argv)

    from ..serve.cluster import require_ray, shutdown, start_ray

    require_ray("the Ray load bench")
    texts = [bp.turns[0] for bp in load_prompts()]
    work = (texts * (args.requests // len(texts) + 1))[: args.requests]
    short = (SHORT * args.latency_requests)[: args.latency_requests]
    load_before = os.getloadavg()
    runs: list[Run] = []

    url, stop = direct_server(args.model, args.draft, args.ctx, args.max_batch)
    try:
        drive(url, args.model, short[:2], args.latency_max_tokens, 1, "warm-up")
        runs.append(drive(url, args.model, short, args.latency_max_tokens, 1, "direct 1x1"))
    finally:
        stop()

    layouts = parse_layouts(args.layouts)
    plan = [(1, 1, 1), *((r, t, args.concurrency) for r, t in layouts)]  # (replicas, threads, concurrency)
    port = free_port()
    start_ray(cluster_config(args, max(r for r, _ in layouts), max(t for _, t in layouts), port))
    try:
        deployed = None
        for replicas, threads, concurrency in plan:
            if deployed != (replicas, threads):
                url = redeploy(cluster_config(args, replicas, threads, port), deployed is not None)
                drive(url, args.model, short[:2], args.latency_max_tokens, 1, "warm-up")
                deployed = (replicas, threads)
            name = f"ray {replicas}x{threads}"
            if concurrency == 1:
                runs.append(drive(url, args.model, short, args.latency_max_tokens, 1, name))
            else:
                runs.append(drive(url, args.model, work, args.max_tokens, concurrency, name))
    finally:
        shutdown()

    print(report(runs, args, load_before, os.getloadavg()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "load_before": load_before, "runs": [asdict(r) for r in runs]}, f, indent=1)


def report(runs: list[Run], args, load_before, load_after) -> str:
    lines = [f"model {args.model}, draft {args.draft}, {os.cpu_count()} cores, load average before "
             f"{load_before[0]:.2f} / after {load_after[0]:.2f}; throughput runs: {args.requests} requests x "
             f"{args.max_tokens} tokens; latency runs: {args.latency_requests} x {args.latency_max_tokens} tokens",
             "", "| target (replicas x threads) | concurrency | requests | tokens/s | p50 ms | p90 ms | requests per replica |",
             "|---|---|---|---|---|---|---|", *(r.row() for r in runs)]
    direct = next((r for r in runs if r.target == "direct 1x1"), None)
    ray = next((r for r in runs if r.target == "ray 1x1" and r.concurrency == 1), None)
    if direct and ray:
        extra = statistics.median(ray.latencies) - statistics.median(direct.latencies)
        lines += ["", f"routing overhead at concurrency 1 (median latency through Ray minus direct): {extra * 1000:.1f} ms"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
