"""The verify-cost curve T(K)/T(1): what one target pass over K tokens costs against a pass over one.

Together with acceptance and draft cost it bounds what speculation can gain on a machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from ..runners.base import Runner

_FILLER = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion "
    "about maintenance costs, staff salaries and the new software licences, the members agreed to "
    "postpone the decision on the building extension until the spring."
)


def verify_cost_curve(runner: Runner, ks: Sequence[int] = (1, 2, 4, 8, 16), context: Sequence[int] | None = None,
                      reps: int = 5) -> dict[int, float]:
    """Median seconds of `runner.forward` over K tokens (all logits) after a prompt, rolled back after each pass.

    One untimed pass per K warms up first. The runner is reset afterwards.
    """
    context = list(context) if context else runner.tokenizer.encode(_FILLER)
    k_max = max(ks)
    tokens = (context * (k_max // len(context) + 1))[:k_max]
    runner.reset()
    runner.forward(context, all_logits=False)
    base = runner.n_past
    times = {}
    try:
        for k in ks:
            samples = []
            for rep in range(reps + 1):
                t0 = time.perf_counter()
                runner.forward(tokens[:k])
                elapsed = time.perf_counter() - t0
                runner.rollback(base)
                if rep:
                    samples.append(elapsed)
            times[k] = statistics.median(samples)
    finally:
        runner.reset()
    return times


def ratios(times: dict[int, float]) -> dict[int, float]:
    """T(K)/T(1), relative to the smallest K measured."""
    t1 = times[min(times)]
    return {k: t / t1 for k, t in times.items()}


def measure(runner: Runner, ks: Sequence[int], context: Sequence[int] | None = None) -> dict:
    """T(K) as verification pays it, and, on llama.cpp, as one unchunked pass (see LlamaCppRunner._score)."""
    seconds = verify_cost_curve(runner, ks, context)
    result = {"ks": list(ks), "seconds": seconds, "ratio": ratios(seconds), "exact_chunk": getattr(runner, "exact_chunk", None)}
    if getattr(runner, "exact_chunk", 0):
        saved = runner.exact_chunk
        runner.exact_chunk = 0
        try:
            single = verify_cost_curve(runner, ks, context)
        finally:
            runner.exact_chunk = saved
        result["single_pass_seconds"] = single
        result["single_pass_ratio"] = ratios(single)
    return result
