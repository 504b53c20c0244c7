"""A bounded soak run of the server: `verispec bench-load --soak N`.

N requests of random kinds and lengths, a few in flight at a time:
- completions and chat requests, streamed or whole, with random max_tokens, greedy or sampled;
- clients that disconnect mid-stream after a random number of chunks;
- bad requests (bad parameters, an unknown model, malformed JSON, an over-long prompt).

Then, once the server is idle, it reads its /metrics. Reported: requests lost (a good request without
a complete answer: must be 0), 5xx answers (must be 0), bad requests not answered 4xx, KV cells still
live or reserved after the run (leaked: must be 0), and the server process's RSS before and after
(for a server in this process).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field

from ..prompts import load_prompts

BAD_BODIES = (
    {"prompt": "Hello", "max_tokens": 0},
    {"prompt": "Hello", "max_tokens": 4, "temperature": -1.0},
    {"prompt": "Hello", "max_tokens": 4, "top_p": 1.5},
    {"prompt": "", "max_tokens": 4},
    {"prompt": "Hello", "max_tokens": 4, "speculative": {"draft_tokens": 999, "draft": "ngram"}},
    {"prompt": "hello " * 40000, "max_tokens": 4},
)


@dataclass
class SoakReport:
    requests: int
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # good requests without a complete answer
    server_errors: int = 0  # 5xx
    bad_not_rejected: int = 0  # bad requests that did not get a 4xx
    leaked_cells: float | None = None  # KV cells live or reserved once idle (None: not read)
    rss_before_mib: float | None = None
    rss_after_mib: float | None = None
    failures: list[str] = field(default_factory=list)  # the first few, for the report

    def ok(self) -> bool:
        return not (self.lost or self.server_errors or self.bad_not_rejected or self.leaked_cells)

    def markdown(self, header: str) -> str:
        rss = ("-" if self.rss_before_mib is None else
               f"{self.rss_before_mib:,.0f} -> {self.rss_after_mib:,.0f} MiB")
        lines = [header, "", "| requests | seconds | kinds | lost | 5xx | bad not rejected | KV cells leaked | RSS |",
                 "|---|---|---|---|---|---|---|---|",
                 f"| {self.requests} | {self.seconds:.0f} | {', '.join(f'{k} {n}' for k, n in sorted(self.kinds.items()))} "
                 f"| {self.lost} | {self.server_errors} | {self.bad_not_rejected} "
                 f"| {'-' if self.leaked_cells is None else int(self.leaked_cells)} | {rss} |"]
        lines += [f"- {f}" for f in self.failures]
        return "\n".join(lines) + "\n"


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _request(client, url: str, model: str, kind: str, rng: random.Random, prompts: list[str],
                   report: SoakReport) -> None:
    prompt = rng.choice(prompts)
    body: dict = {"model": model, "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.8])}
    if body["temperature"]:
        body["seed"] = rng.randint(0, 1000)
    if kind == "bad":
        body = {"model": model, **rng.choice(BAD_BODIES)}
        raw = "{\"model\": " if rng.random() < 0.2 else json.dumps(body)
        reply = await client.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        _count_status(report, reply.status_code, bad=True, what=f"bad request {raw[:60]!r}")
        return
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if kind == "whole":
        reply = await client.post(url + path, json=body)
        _count_status(report, reply.status_code, bad=False, what=f"{path} whole")
        if reply.status_code == 200 and not reply.json()["choices"][0].get("finish_reason"):
            report.lost += 1
        return
    body["stream"] = True
    stop_after = rng.randint(1, 4) if kind == "disconnect" else None
    async with client.stream("POST", url + path, json=body) as response:
        _count_status(report, response.status_code, bad=False, what=f"{path} stream")
        if response.status_code != 200:
            return
        chunks, done = 0, False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks += 1
                if "\"error\"" in line:
                    report.lost += 1
                    report.failures.append(f"error event: {line[:120]}")
            if stop_after is not None and chunks >= stop_after:
                return  # the client goes away mid-stream
        if not done and stop_after is None:
            report.lost += 1
            report.failures.append(f"{path} stream ended without [DONE]")


def _count_status(report: SoakReport, status: int, bad: bool, what: str) -> None:
    if status >= 500:
        report.server_errors += 1
        report.failures.append(f"{what}: HTTP {status}")
    elif bad and not 400 <= status < 500:
        report.bad_not_rejected += 1
        report.failures.append(f"{what}: HTTP {status}, expected 4xx")
    elif not bad and status != 200:
        report.lost += 1
        report.failures.append(f"{what}: HTTP {status}")


async def _leaked(client, url: str, wait: float = 60.0) -> float | None:
    """KV cells live or reserved once the server is idle (None if it has no such metrics)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        health = (await client.get(url + "/health")).json()
        if health.get("active") == 0 and health.get("queued") == 0:
            break
        await asyncio.sleep(0.2)
    text = (await client.get(url + "/metrics")).text
    values = [float(m.group(1)) for name in ("verispec_kv_pool_live_tokens", "verispec_kv_pool_reserved_cells")
              for m in [re.search(rf"^{name} (\S+)$", text, re.M)] if m]
    return sum(values) if values else None


SOAK_PROMPT_CHARS = 2000  # ~600 tokens: fits the 2048-token context the load bench and the tests serve


async def soak(url: str, model: str, n: int, concurrency: int = 4, seed: int = 0, timeout: float = 600.0,
               local: bool = False, api_key: str | None = None) -> SoakReport:
    import httpx

    rng = random.Random(seed)
    # Good requests must fit any server's context: the bench's long RAG and summary prompts (~2,000+ tokens) are
    # left out, so that a clear 400 for an over-long prompt is not counted as a lost request.
    prompts = [p.turns[0] for p in load_prompts() if len(p.turns[0]) <= SOAK_PROMPT_CHARS]
    kinds = rng.choices(["stream", "whole", "disconnect", "bad"], weights=[4, 3, 2, 2], k=n)
    report = SoakReport(n, kinds={k: kinds.count(k) for k in set(kinds)})
    report.rss_before_mib = _rss_mib() if local else None
    gate = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
        async def one(kind: str, request_rng: random.Random) -> None:
            async with gate:
                try:
                    await _request(client, url, model, kind, request_rng, prompts, report)
                except Exception as exc:  # noqa: BLE001 - a transport failure loses the request
                    if kind != "disconnect":
                        report.lost += 1
                        report.failures.append(f"{kind}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(kind, random.Random(rng.random())) for kind in kinds))
        report.seconds = time.perf_counter() - t0
        report.leaked_cells = await _leaked(client, url)
    report.rss_after_mib = _rss_mib() if local else None
    report.failures = report.failures[:10]
    return report


def report_json(report: SoakReport) -> str:
    return json.dumps(asdict(report), indent=1)
