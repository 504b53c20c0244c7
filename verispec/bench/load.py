"""Load benchmark of the OpenAI server: throughput and latency at several concurrencies, speculation on and off.

Starts `verispec serve` in-process on loopback (or drives --url), then for each concurrency and
each mode sends the bench prompts (verispec/prompts.py, first turn, as chat requests, streamed)
with that many requests in flight. "off" pins `speculative: {"draft": "none"}`; "on" leaves the
server's default drafter and its goodput planner in charge. Modes alternate per concurrency level
after one warm-up request, so slow drift of the machine hits both.

With `--peer llama-server`, llama.cpp's own server (plain decoding, -np = the highest concurrency,
the same model file and threads, built by `make llama-tools`) runs the same prompts as a third cell
at each concurrency, in the same run; each cell also says how many of its outputs differ from the
same mode's outputs at concurrency 1 (llama-server puts all rows in one decode and is not
batch-invariant; verispec's exact fusion is). At concurrency 1 the library engine (`verispec generate`'s path,
plain, on a context of its own beside the idle server) runs the same prompts too, and the report gives the lone
server request's decode speed and time to first token as ratios of the engine's.

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
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import huge_pages
from ..prompts import load_prompts
from .peers import llama_cpp_env


@dataclass
class RequestResult:
    ttft: float
    itl: float | None
    tokens: int
    mean_accepted_length: float
    drafted: int = 0
    draft_seconds: float = 0.0  # in proposals, catch-up included
    draft_prefill_seconds: float = 0.0  # the draft's prompt prefill (0 when the server did not time it)
    prompt_tokens: int = 0
    text: str = ""


@dataclass
class Cell:
    concurrency: int
    mode: str  # "off" | "on" | "generate" (the library engine alone, c=1) | a peer's name
    seconds: float
    results: list[RequestResult] = field(default_factory=list)
    errors: int = 0
    texts: dict[int, str] = field(default_factory=dict, repr=False)  # output per prompt index (first request)
    error_examples: list[str] = field(default_factory=list)  # why requests failed (the first few)
    prefix_hits: int = 0  # requests that shared cached prompt cells (the server's /metrics)
    prefix_tokens_saved: int = 0
    differ_from_solo: int | None = None  # outputs unlike the same mode's at concurrency 1 (None: not compared)

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
                "draft_prefill_seconds": sum(r.draft_prefill_seconds for r in self.results),
                "prefix_hits": self.prefix_hits, "prefix_tokens_saved": self.prefix_tokens_saved,
                "differ_from_solo": self.differ_from_solo}


async def _one(client, url: str, model: str, prompt: str | list[dict], max_tokens: int, spec: dict | None,
               answer: list[str] | None = None, stamps: list[float] | None = None) -> RequestResult:
    """One streamed chat request (a prompt, or the messages so far); the answer's text goes to `answer`,
    the arrival time of each text chunk to `stamps`."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    answer = [] if answer is None else answer
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if spec is not None:
        body["speculative"] = spec
    start = time.perf_counter()
    first = last = None
    tokens, prompt_tokens, spec_stats = 0, 0, {}
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
                answer.append(chunk["choices"][0]["delta"]["content"])
                if stamps is not None:
                    stamps.append(last)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                spec_stats = chunk.get("speculative") or {}
    first = first or time.perf_counter()
    itl = (last - first) / (tokens - 1) if last is not None and tokens > 1 else None
    return RequestResult(first - start, itl, tokens, spec_stats.get("mean_accepted_length", 0.0),
                         spec_stats.get("drafted", 0), spec_stats.get("draft_seconds", 0.0),
                         spec_stats.get("draft_prefill_seconds") or 0.0, prompt_tokens, "".join(answer))


async def _prefix_counters(client, url: str) -> tuple[float, float]:
    """(hits, tokens saved) of the server's target prefix cache so far; zeros from a server without them."""
    try:
        text = (await client.get(url + "/metrics")).text
    except Exception:  # noqa: BLE001 - a peer without /metrics
        return 0.0, 0.0
    found = {}
    for name in ("verispec_prefix_cache_hits_total", "verispec_prefix_cache_tokens_saved_total"):
        m = re.search(rf'^{name}{{pool="target"}} (\S+)$', text, re.M)
        found[name] = float(m.group(1)) if m else 0.0
    return found["verispec_prefix_cache_hits_total"], found["verispec_prefix_cache_tokens_saved_total"]


async def _cell(url: str, model: str, prompts: list[str], concurrency: int, n_requests: int, max_tokens: int,
                mode: str, timeout: float) -> Cell:
    import httpx

    spec = {"draft": "none"} if mode == "off" else None
    gate = asyncio.Semaphore(concurrency)
    cell = Cell(concurrency, mode, 0.0)
    by_prompt: dict[int, RequestResult] = {}

    # A connection per request: llama-server closes a kept-alive connection after a few requests, and a
    # request sent on it just then fails ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def run(i: int) -> None:
            async with gate:
                try:
                    result = await _one(client, url, model, prompts[i % len(prompts)], max_tokens, spec)
                    cell.results.append(result)
                    by_prompt.setdefault(i % len(prompts), result)
                except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                    cell.errors += 1
                    if len(cell.error_examples) < 3:
                        cell.error_examples.append(f"{type(exc).__name__}: {exc}"[:300])

        hits, saved = await _prefix_counters(client, url)
        t0 = time.perf_counter()
        await asyncio.gather(*(run(i) for i in range(n_requests)))
        cell.seconds = time.perf_counter() - t0
        hits_after, saved_after = await _prefix_counters(client, url)
        cell.prefix_hits, cell.prefix_tokens_saved = int(hits_after - hits), int(saved_after - saved)
    cell.texts = {i: r.text for i, r in by_prompt.items()}
    return cell


def compare_with_solo(cells: list[Cell]) -> None:
    """Set each cell's `differ_from_solo`: its outputs unlike the same mode's at concurrency 1, per prompt; for the
    library engine's cell (`generate`), unlike the server's lone requests with speculation off."""
    solo = {c.mode: c.texts for c in cells if c.concurrency == 1}
    for cell in cells:
        alone = solo.get("off" if cell.mode == "generate" else cell.mode)
        if alone is not None and (cell.concurrency > 1 or cell.mode == "generate"):
            cell.differ_from_solo = sum(text != alone[i] for i, text in cell.texts.items() if i in alone)


def engine_ratio_markdown(cells: list[Cell]) -> str:
    """The server's lone request against the library engine on the same prompts (speculation off in both)."""
    alone = {c.mode: c for c in cells if c.concurrency == 1 and c.mode in ("off", "generate")}
    if len(alone) < 2:
        return ""
    server, engine = alone["off"].row(), alone["generate"].row()
    if not server["itl_p50_ms"] or not engine["itl_p50_ms"]:
        return ""
    itl, ttft = (server["itl_p50_ms"], engine["itl_p50_ms"]), (server["ttft_p50_ms"], engine["ttft_p50_ms"])
    return (f"\nAlone, speculation off: the server decodes at {itl[1] / itl[0]:.2f}x `verispec generate` (ITL p50 "
            f"{itl[0]:.1f} against {itl[1]:.1f} ms), time to first token {ttft[0] / ttft[1]:.2f}x its ({ttft[0]:.0f} "
            f"against {ttft[1]:.0f} ms, the server's prefix cache included); {engine['differ_from_solo']} of "
            f"{len(alone['generate'].texts)} outputs differ (they agree up to near-ties: the engine prefills in 512-row "
            "passes, the server in exact passes under 64 rows, or with --verify one-pass in any; docs/losslessness.md).\n")


def _generate_cell(model, prompts: list[str], n_requests: int, max_tokens: int) -> Cell:
    """`verispec generate`'s path on the same chat prompts, one request at a time, plain: the library engine in
    this process, on a context of its own beside the idle server's. What a lone server request is compared with
    (issue 17: its decode >= 0.95x the engine's). TTFT and ITL are measured as for a streamed request."""
    from ..engine import SpeculativeConfig, Stats
    from ..sampling import SamplingParams

    cell = Cell(1, "generate", 0.0)
    model.generate(messages=[{"role": "user", "content": prompts[0]}], params=SamplingParams(max_tokens=8),
                   spec=SpeculativeConfig())  # warm-up, as the server cells get
    t0 = time.perf_counter()
    for i in range(n_requests):
        stats, text = Stats(), []
        start = time.perf_counter()
        first = last = None
        messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
        for chunk in model.stream(messages=messages, params=SamplingParams(max_tokens=max_tokens),
                                  spec=SpeculativeConfig(), stats=stats):
            if chunk.text:
                last = time.perf_counter()
                first = first or last
                text.append(chunk.text)
        first = first or time.perf_counter()
        itl = (last - first) / (stats.generated - 1) if last is not None and stats.generated > 1 else None
        result = RequestResult(first - start, itl, stats.generated, 1.0, prompt_tokens=stats.prompt_tokens,
                               text="".join(text))
        cell.results.append(result)
        cell.texts.setdefault(i % len(prompts), result.text)
    cell.seconds = time.perf_counter() - t0
    return cell


ARRIVAL_LEAD = "Read the whole document below before you answer anything about it.\n\n"
FOLLOW_UPS = ("Which part of it matters most, and why?", "Show a short example of using it.",
              "Name two edge cases it handles.")


@dataclass
class ConversationTurn:
    result: RequestResult
    prefix_tokens_saved: int


async def _conversation(url: str, model: str, first_turn: str, turns: int, max_tokens: int,
                        timeout: float) -> list[ConversationTurn]:
    """A chat that re-sends the whole conversation each turn, as chat clients do: turn 1 asks about a long
    document, later turns follow up; what the prefix cache saves shows in the later turns' TTFT."""
    import httpx

    messages = [{"role": "user", "content": first_turn}]
    out = []
    async with httpx.AsyncClient(timeout=timeout) as client:
        for i in range(turns):
            answer: list[str] = []
            _, saved = await _prefix_counters(client, url)
            result = await _one(client, url, model, messages, max_tokens, None, answer)
            _, saved_after = await _prefix_counters(client, url)
            out.append(ConversationTurn(result, int(saved_after - saved)))
            messages = messages + [{"role": "assistant", "content": "".join(answer)},
                                   {"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]}]
    return out


async def _arrival(url: str, model: str, prompts: list[str], long_prompt: str, streams: int, max_tokens: int,
                   timeout: float) -> dict:
    """`streams` requests decoding, alone and then while a long prompt arrives: their gaps between text
    chunks, p50 alone against p95 while the long prompt is prefilled (from its arrival to its first token)."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=streams + 4)) as client:
        async def run(with_long: bool) -> tuple[list[list[float]], float | None, float]:
            stamps: list[list[float]] = [[] for _ in range(streams)]
            tasks = [asyncio.create_task(_one(client, url, model, prompts[i], max_tokens, {"draft": "none"},
                                              stamps=stamps[i])) for i in range(streams)]
            long_sent = long_ttft = None
            if with_long:
                while not all(len(s) >= 3 for s in stamps) and not all(t.done() for t in tasks):
                    await asyncio.sleep(0.05)
                long_sent = time.perf_counter()
                long_result = await _one(client, url, model, long_prompt, 4, {"draft": "none"})
                long_ttft = long_result.ttft
            await asyncio.gather(*tasks)
            return stamps, long_sent, long_ttft or 0.0

        alone, _, _ = await run(False)
        during, sent, long_ttft = await run(True)
    gaps_alone = [b - a for s in alone for a, b in zip(s, s[1:])]
    window = (sent, sent + long_ttft)
    gaps_during = [b - a for s in during for a, b in zip(s, s[1:]) if window[0] <= b <= window[1] + 1e-3]
    p = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {"streams": streams, "itl_p50_alone_ms": p(gaps_alone, 50), "itl_p95_alone_ms": p(gaps_alone, 95),
            "itl_p50_during_ms": p(gaps_during, 50), "itl_p95_during_ms": p(gaps_during, 95),
            "gaps_during": len(gaps_during), "long_prompt_ttft_s": long_ttft}


def arrival_markdown(a: dict) -> str:
    ratio = a["itl_p95_during_ms"] / a["itl_p50_alone_ms"]
    return ("| streams | ITL p50 alone | ITL p95 alone | ITL p50 / p95 while the long prompt prefills | p95 / p50 alone "
            "| long prompt's TTFT |\n|---|---|---|---|---|---|\n"
            f"| {a['streams']} | {a['itl_p50_alone_ms']:.0f} ms | {a['itl_p95_alone_ms']:.0f} ms "
            f"| {a['itl_p50_during_ms']:.0f} / {a['itl_p95_during_ms']:.0f} ms ({a['gaps_during']} gaps) | {ratio:.1f}x "
            f"| {a['long_prompt_ttft_s']:.1f} s |\n")


def conversation_markdown(turns: list[ConversationTurn]) -> str:
    first = turns[0].result.ttft
    lines = ["| turn | prompt tokens | prompt tokens reused (prefix cache) | TTFT (ms) | TTFT / turn 1 |",
             "|---|---|---|---|---|"]
    for i, t in enumerate(turns, 1):
        lines.append(f"| {i} | {t.result.prompt_tokens} | {t.prefix_tokens_saved} | {t.result.ttft * 1000:.0f} "
                     f"| {t.result.ttft / first:.2f} |")
    return "\n".join(lines) + "\n"


def conversation_document(prompts_source: str, room: int) -> str:
    """The first turn of the longest long-context bench prompt that leaves `room` characters' worth of
    context; the shortest one if none is that short."""
    long = sorted((p.turns[0] for p in load_prompts(prompts_source) if p.category == "long-context"), key=len)
    if not long:
        raise ValueError("the bench prompts have no long-context prompt for the conversation")
    fitting = [t for t in long if len(t) <= room]
    return fitting[-1] if fitting else long[0]


def markdown(cells: list[Cell], header: str) -> str:
    lines = [header, "",
             "| concurrency | mode | requests | output tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) "
             "| ITL p95 (ms) | mean accepted length | drafted (draft + draft prefill s) | prefix cache hits (tokens) "
             "| outputs unlike c=1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        r = cell.row()
        errors = f" ({r['errors']} failed)" if r["errors"] else ""
        lines.append(f"| {r['concurrency']} | {r['speculation']} | {r['requests']}{errors} | {r['tokens_per_second']:.1f} "
                     f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p95_ms']:.1f} "
                     f"| {r['mean_accepted_length']:.2f} "
                     f"| {r['drafted']} ({r['draft_seconds']:.1f} + {r['draft_prefill_seconds']:.1f} s) "
                     f"| {r['prefix_hits']} ({r['prefix_tokens_saved']}) "
                     f"| {'-' if r['differ_from_solo'] is None else r['differ_from_solo']} |")
    return "\n".join(lines) + "\n"


def _peer(name: str, model: str, ctx: int, slots: int, threads: int | None):
    """llama.cpp's own server on the same model file: -np slots, each with the same context as ours."""
    from ..models import files
    from .peers import LlamaServerProcess

    if name != "llama-server":
        raise ValueError(f"unknown load-bench peer {name!r}: llama-server is the one offered")
    return LlamaServerProcess(files.resolve(model).path, threads or os.cpu_count() or 1, ctx * slots, slots)


class _LocalServer:
    """`verispec serve` in this process, on a free loopback port."""

    def __init__(self, model: str, draft: str | None, ctx: int, max_batch: int, threads: int | None, **serve_options) -> None:
        import uvicorn

        import verispec
        from ..serve import ServeConfig, Server, create_app

        options = {"n_ctx": min(ctx, 512)} | ({"n_threads": threads} if threads else {})
        self.base = verispec.load(model, draft=None if draft in (None, "none") else draft, **options)
        self._solo = None  # solo_model()'s, opened on first use
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

    def solo_model(self, ctx: int):
        """The loaded model on a context of its own (`ctx` positions, the library's own pass sizes), sharing the
        weights, as `verispec generate` runs it; None for a runner with no siblings."""
        from ..api import Model

        if self._solo is None and hasattr(self.base.target, "sibling"):
            self._solo = Model(self.base.target.sibling(n_ctx=ctx), self.base.backend)
        return self._solo

    def close(self) -> None:
        self._uv.should_exit = True
        self._thread.join(30)
        self.server.close()
        if self._solo is not None:
            self._solo.close()  # before the weights it shares
        self.base.close()


def run_load(model: str, draft: str | None, concurrency: list[int], requests: int, max_tokens: int, out: str | None,
             url: str | None = None, ctx: int = 2048, max_batch: int | None = None, threads: int | None = None,
             prompts_source: str = "builtin", timeout: float = 600.0, conversation_turns: int = 0,
             peer: str | None = None, arrival: bool = False, **serve_options) -> list[Cell]:
    prompts = [p.turns[0] for p in load_prompts(prompts_source)]
    slots = max_batch or max(concurrency + ([4] if arrival else []))  # the arrival run has 4 in flight
    local = None if url else _LocalServer(model, draft, ctx, slots, threads, **serve_options)
    target = url or local.url
    peer_server = _peer(peer, model, ctx, slots, threads) if peer else None
    modes = [("off", target), ("on", target)] + ([(peer, peer_server.url)] if peer_server else [])
    load_before = os.getloadavg()
    cells: list[Cell] = []
    chat: list[ConversationTurn] = []
    arrived: dict | None = None
    try:
        for _, url_of_mode in modes[1:]:
            asyncio.run(_cell(url_of_mode, model, prompts, 1, 1, 8, "on", timeout))  # warm-up
        for c in concurrency:
            for mode, url_of_mode in modes:
                cell = asyncio.run(_cell(url_of_mode, model, prompts, c, max(requests, c), max_tokens, mode, timeout))
                cells.append(cell)
                print(markdown([cell], "").strip().splitlines()[-1], flush=True)
                time.sleep(2)  # let the last cell's threads go idle before the next server starts
            solo = local.solo_model(ctx) if c == 1 and local is not None else None
            if solo is not None:
                cells.append(_generate_cell(solo, prompts, max(requests, 1), max_tokens))
                print(markdown([cells[-1]], "").strip().splitlines()[-1], flush=True)
        if conversation_turns:
            # ~3.5 characters a token; the answers and follow-ups need room too
            document = conversation_document(prompts_source, int(3.5 * (ctx - conversation_turns * (max_tokens + 40))))
            chat = asyncio.run(_conversation(target, model, document, conversation_turns, max_tokens, timeout))
            print(conversation_markdown(chat), flush=True)
        if arrival:
            # Its own first line: the conversation's turns, run just before on the same document, must not have
            # cached it (one such run measured a 0.4 s prefill of 6 gaps: a prefix-cache hit, not an arrival).
            document = ARRIVAL_LEAD + conversation_document(prompts_source, int(3.5 * (ctx - 100 - 20)))
            arrived = asyncio.run(_arrival(target, model, prompts, document, 3, 512, timeout))
            print(arrival_markdown(arrived), flush=True)
    finally:
        if local is not None:
            local.close()
        if peer_server is not None:
            peer_server.close()
    compare_with_solo(cells)
    load_after = os.getloadavg()
    header = (f"Load benchmark: {model}, draft {draft or 'server default'}, {max(requests, 1)}+ requests per cell "
              f"({max_tokens} tokens at most, greedy, bench prompts as chat), {os.cpu_count()} CPUs, load average "
              f"{load_before[0]:.2f} before / {load_after[0]:.2f} after, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, huge pages "
              f"{'asked for' if huge_pages.requested() else 'not asked for'} (llama-server: "
              f"{'asked for' if huge_pages.requested(llama_cpp_env()) else 'not asked for'})"
              + (f", server options {serve_options}" if serve_options else "")
              + (f"; peer `{peer_server.command_line()}`" if peer_server else "") + ".")
    table = markdown(cells, header) + engine_ratio_markdown(cells)
    failed = [f"- c={c.concurrency} {c.mode}: {e}" for c in cells for e in c.error_examples]
    if failed:
        table += "\nFailed requests (the first few per cell):\n\n" + "\n".join(failed) + "\n"
    if arrived:
        table += ("\nA long prompt arriving while 3 requests decode (speculation off; gaps between streamed chunks, "
                  "alone and while the long prompt is prefilled):\n\n" + arrival_markdown(arrived))
    if chat:
        table += (f"\nA {len(chat)}-turn chat about a long document, each turn re-sending the conversation "
                  f"(server default drafter, greedy, {max_tokens} tokens at most per answer):\n\n"
                  + conversation_markdown(chat))
    if out:
        with open(out, "w") as f:
            f.write(table)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({"header": header, "cells": [c.row() for c in cells],
                       "conversation": [asdict(t) for t in chat], "arrival": arrived,
                       "requests": [[asdict(r) for r in c.results] for c in cells]}, f, indent=1)
    return cells


def run_soak(model: str, draft: str | None, n: int, out: str | None, url: str | None = None, ctx: int = 2048,
             max_batch: int = 4, threads: int | None = None, seed: int = 0, **serve_options):
    """`--soak N` (bench/soak.py) against a server started here, or the one at `url`."""
    from .soak import report_json, soak

    local = None if url else _LocalServer(model, draft, ctx, max_batch, threads, **serve_options)
    load_before = os.getloadavg()
    try:
        report = asyncio.run(soak(url or local.url, model, n, concurrency=max_batch, seed=seed, local=local is not None))
    finally:
        if local is not None:
            local.close()
    header = (f"Soak run: {model}, draft {draft or 'server default'}, {n} requests (seed {seed}), {max_batch} in flight, "
              f"load average {load_before[0]:.2f} before.")
    if out:
        with open(out, "w") as f:
            f.write(report.markdown(header))
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            f.write(report_json(report))
    return report


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
    ap.add_argument("--verify", default="exact", choices=["exact", "one-pass"],
                    help="one-pass: each step's rows in one decode (not bit-identical to solo runs)")
    ap.add_argument("--prefill-share", type=float, default=1.0, help="the server's --prefill-share")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--conversation", type=int, default=4, help="turns of a long-document chat after the cells (0 = none)")
    ap.add_argument("--arrival", action="store_true", help="then a long prompt arriving while 3 requests decode")
    ap.add_argument("--peer", default=None, choices=["llama-server"], help="llama.cpp's own server on the same prompts")
    ap.add_argument("--out", default="load.md")
    a = ap.parse_args(argv)
    run_load(a.model, a.draft, [int(c) for c in a.concurrency.split(",")], a.requests, a.max_tokens, a.out, a.url,
             a.ctx, a.max_batch, a.threads, conversation_turns=a.conversation, peer=a.peer, arrival=a.arrival,
             kv_pool=a.kv_pool, fuse_rows=a.fuse_rows, verify=a.verify, prefill_share=a.prefill_share)
    print(open(a.out).read())


if __name__ == "__main__":
    from ..huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()
    main()
