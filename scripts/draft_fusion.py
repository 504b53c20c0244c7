"""What fusing draft-model passes across requests buys (issue 17.2), measured in-process, interleaved, one table.

Four greedy chat requests at once through the server's Scheduler, on the default pair (Qwen2.5-Coder 1.5B target,
0.5B draft, 2 threads), drafting with K pinned at 3 so that every step drafts:
- fused: as shipped, each round of all requests' draft passes is one decode of the shared draft pool;
- alone: the same steps with each request's draft passes decoded on their own (the behaviour before);
- plain: no drafting, for scale.
Run on a quiet machine: `.venv/bin/python scripts/draft_fusion.py` (N=40 tokens per request by default).
TREE=dynamic (or static:B1,B2,...) grows token trees of budget 4 instead of chains: each expansion is a draft pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import verispec
import verispec.stepper as stepper
from verispec.runners.pool import fused_last_rows
from verispec.sampling import SamplingParams
from verispec.serve.scheduler import Scheduler
from verispec.serve.scheduler import Sequence as Job

PROMPTS = [
    "Write a Python function that parses an ISO 8601 date string and returns a datetime.",
    "Explain how a hash map handles collisions, with a short example in Python.",
    "Refactor this loop into a list comprehension:\nresult = []\nfor x in range(10):\n    if x % 2 == 0:\n"
    "        result.append(x * x)\n",
    "Write a bash one-liner that counts the lines in every .py file in a directory.",
]
N = int(os.environ.get("N", 40))
TREE = os.environ.get("TREE")


def one_at_a_time(passes):
    return [p.run() for p in passes]


def run(model, mode: str) -> tuple[float, int, list[str]]:
    """Output tokens/s of the four requests together, shared draft decodes, and their texts."""
    stepper.fused_last_rows = one_at_a_time if mode == "alone" else fused_last_rows
    served = replace(model.spec, tree=TREE, tree_budget=4) if TREE else model.spec
    scheduler = Scheduler(model.target, served, model.drafter(model.spec.draft), max_batch=4, n_ctx=1024)
    drafting = mode != "plain"
    spec = replace(served, draft=model.spec.draft if drafting else None, draft_tokens=3 if drafting else None,
                   tree=TREE if drafting else None)
    jobs = []
    t0 = time.perf_counter()
    for text in PROMPTS:
        events: list = []
        job = Job(model.prompt_tokens(text, chat=True), SamplingParams(max_tokens=N, ignore_eos=True), spec,
                  "model" if drafting else None, True, events.append)
        scheduler.submit(job)
        jobs.append((job, events))
    while not all(events and events[-1].kind != "text" for _, events in jobs):
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    shared = scheduler.draft_pool.shared_decodes if scheduler.draft_pool is not None else 0
    scheduler.close()
    stepper.fused_last_rows = fused_last_rows
    texts = ["".join(e.text for e in events) for _, events in jobs]
    return sum(job.stats.generated for job, _ in jobs) / wall, shared, texts


def main() -> None:
    model = verispec.load("qwen2.5-coder-1.5b", draft="qwen2.5-coder-0.5b", n_ctx=1024, n_threads=2)
    print("load average before:", os.getloadavg())
    speeds: dict[str, list[float]] = {"fused": [], "alone": [], "plain": []}
    texts: dict[str, list[str]] = {}
    for order in (("fused", "alone", "plain"), ("plain", "alone", "fused")):
        for mode in order:
            tps, shared, out = run(model, mode)
            speeds[mode].append(tps)
            texts.setdefault(mode, out)
            print(f"{mode:6s} {tps:6.2f} tokens/s  shared draft decodes {shared}", flush=True)
    print("fused and alone wrote the same text:", texts["fused"] == texts["alone"])
    for mode, values in speeds.items():
        print(f"{mode:6s} mean {sum(values) / len(values):.2f} tokens/s")
    print("load average after:", os.getloadavg())
    model.close()


if __name__ == "__main__":
    main()
