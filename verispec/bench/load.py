"""Load benchmark of the OpenAI server: throughput and latency at several concurrencies, speculation on and off.

Starts `verispec serve` in-process on loopback (or drives --url), then for each concurrency and
each mode sends the bench prompts (verispec.bench.prompts, first turn, as chat requests, streamed)
with that many requests in flight. "off" pins `speculative: {"draft": "none"}`; "on" leaves the
server's default drafter and its goodput planner in charge. Modes alternate per concurrency level
after one warm-up request, so slow drift of the machine hits both.

Reported per cell: output tokens/s over the cell's wall time (all requests), time to first token
(arrival to first streamed text) p50/p95, and inter-token latency p50/p95, where a request's ITL is
(last text - first text) / (completion tokens - 1) (vLLM's TPOT); and the draft model's work: tokens
drafted, seconds in proposals (a draft model's catch-up on tokens it skipped included) plus seconds
of draft prompt prefill, summed over the cell's requests (per request in the JSON).

    python -m verispec.bench.load --model smollm2-135m --requests 8 --out load.md
    verispec bench-load --model qwen2.5-coder-1.5b --draft auto --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .prompts import load_prompts


@dataclass
class RequestResult:
    ttft: float
    itl: float | None
    tokens: int
    mean_accepted_length: float
    drafted: int = 0
    draft_seconds: float = 0.0  # in proposals, catch-up included
    draft_prefill_seconds: float = 0.0  # the draft's prompt prefill (0 when the server did not time it)


@dataclass
class Cell:
    concurrency: int
    mode: str  # "off" | "on"
    seconds: float
    results: list[RequestResult] = field(default_factory=list)
    errors: int = 0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    def row(self) -> dict:
        ttft = [r.ttft for r in self.results]
        itl = [r.itl for r in self.results if r.itl is not None]
        acc = [r.mean_accepted_length for r in self.results if r.mean_accepted_length]
        pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
        return {"concurrency": self.concurrency, "speculation": self.mode, "requests": len(self.results),
                "errors": self.errors, "tokens": self.tokens, "tokens_per_second": self.tokens / self.seconds,
                "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95), "itl_p50_ms": pct(itl, 50),
                "itl_p95_ms": pct(itl, 95), "mean_accepted_length": float(np.mean(acc)) if acc else float("nan"),
                "drafted": sum(r.drafted for r in self.results),
                "draft_seconds": sum(r.draft_seconds for r in self.results),
                "draft_prefill_seconds": sum(r.draft_prefill_seconds for r in self.results)}


async def _one(client, url: str, model: str, prompt: str, max_tokens: int, spec: dict | None) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if spec is not None:
        body["speculative"] = spec
    start = time.perf_counter()
    first = last = None
    tokens, spec_stats = 0, {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                spec_stats = chunk.get("speculative") or {}
    first = first or time.perf_counter()
    itl = (last - first) / (tokens - 1) if last is not None and tokens > 1 else None
    return RequestResult(first - start, itl, tokens, spec_stats.get("mean_accepted_length", 0.0),
                         spec_stats.get("drafted", 0), spec_stats.get("draft_seconds", 0.0),
                         spec_stats.get("draft_prefill_seconds") or 0.0)


async def _cell(url: str, model: str, prompts: list[str], concurrency: int, n_requests: int, max_tokens: int,
                mode: str, timeout: float) -> Cell:
    import httpx

    spec = {"draft": "none"} if mode == "off" else None
    gate = asyncio.Semaphore(concurrency)
    cell = Cell(concurrency, mode, 0.0)

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def run(i: int) -> None:
            async with gate:
                try:
                    cell.results.append(await _one(client, url, model, prompts[i % len(prompts)], max_tokens, spec))
                except Exception:  # noqa: BLE001 - counted and reported, the run goes on
                    cell.errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(run(i) for i in range(n_requests)))
        cell.seconds = time.perf_counter() - t0
    return cell


def markdown(cells: list[Cell], header: str) -> str:
    lines = [header, "",
             "| concurrency | speculation | requests | output tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) "
             "| ITL p95 (ms) | mean accepted length | drafted (draft + draft prefill s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        r = cell.row()
        errors = f" ({r['errors']} failed)" if r["errors"] else ""
        lines.append(f"| {r['concurrency']} | {r['speculation']} | {r['requests']}{errors} | {r['tokens_per_second']:.1f} "
                     f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p95_ms']:.1f} "
                     f"| {r['mean_accepted_length']:.2f} "
                     f"| {r['drafted']} ({r['draft_seconds']:.1f} + {r['draft_prefill_seconds']:.1f} s) |")
    return "\n".join(lines) + "\n"


class _LocalServer:
    """`verispec serve` in this process, on a free loopback port."""

    def __init__(self, model: str, draft: str | None, ctx: int, max_batch: int, threads: int | None, **serve_options) -> None:
        import uvicorn

        import verispec
        from ..serve import ServeConfig, Server, create_app

        options = {"n_ctx": min(ctx, 512)} | ({"n_threads": threads} if threads else {})
        self.base = verispec.load(model, draft=None if draft in (None, "none") else draft, **options)
        self.server = Server(self.base, ServeConfig(model=model, max_batch=max_batch, max_queue=1024, ctx=ctx,
                                                    **serve_options))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._uv = uvicorn.Server(uvicorn.Config(create_app(self.server), host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._uv.run, daemon=True)
        self._thread.start()
        while not self._uv.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self._uv.should_exit = True
        self._thread.join(30)
        self.server.close()
        self.base.close()


def run_load(model: str, draft: str | None, concurrency: list[int], requests: int, max_tokens: int, out: str | None,
             url: str | None = None, ctx: int = 2048, max_batch: int | None = None, threads: int | None = None,
             prompts_source: str = "builtin", timeout: float = 600.0, **serve_options) -> list[Cell]:
    prompts = [p.turns[0] for p in load_prompts(prompts_source)]
    local = None if url else _LocalServer(model, draft, ctx, max_batch or max(concurrency), threads, **serve_options)
    target = url or local.url
    load_before = os.getloadavg()
    cells: list[Cell] = []
    try:
        asyncio.run(_cell(target, model, prompts, 1, 1, 8, "on", timeout))  # warm-up
        for c in concurrency:
            for mode in ("off", "on"):
                cell = asyncio.run(_cell(target, model, prompts, c, max(requests, c), max_tokens, mode, timeout))
                cells.append(cell)
                print(markdown([cell], "").strip().splitlines()[-1], flush=True)
    finally:
        if local is not None:
            local.close()
    load_after = os.getloadavg()
    header = (f"Load benchmark: {model}, draft {draft or 'server default'}, {max(requests, 1)}+ requests per cell "
              f"({max_tokens} tokens at most, greedy, bench prompts as chat), {os.cpu_count()} CPUs, load average "
              f"{load_before[0]:.2f} before / {load_after[0]:.2f} after, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
              + (f", server options {serve_options}" if serve_options else "") + ".")
    table = markdown(cells, header)
    if out:
        with open(out, "w") as f:
            f.write(table)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({"header": header, "cells": [c.row() for c in cells],
                       "requests": [[asdict(r) for r in c.results] for c in cells]}, f, indent=1)
    return cells


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="auto", help="server's default drafter (auto, ngram, none, a model)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per cell (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--url", default=None, help="drive a running server instead of starting one")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-batch", type=int, default=None, help="server slots (default: the highest concurrency)")
    ap.add_argument("--kv-pool", type=int, default=None, help="0 = per-slot contexts (no fusion)")
    ap.add_argument("--fuse-rows", type=int, default=None, help="default: 3 on llama.cpp, all rows on torch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="load.md")
    a = ap.parse_args(argv)
    run_load(a.model, a.draft, [int(c) for c in a.concurrency.split(",")], a.requests, a.max_tokens, a.out, a.url,
             a.ctx, a.max_batch, a.threads, kv_pool=a.kv_pool, fuse_rows=a.fuse_rows)
    print(open(a.out).read())


if __name__ == "__main__":
    main()
