"""The verify-cost curve T(K)/T(1): what one target pass over K tokens costs against a pass over one.

Together with acceptance and draft cost it bounds what speculation can gain on a machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

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


def pass_shape_noise(runner: Runner, ks: Sequence[int], contexts: Sequence[Sequence[int]]) -> dict[str, dict]:
    """The largest logit difference between a token scored inside a K-row pass and the same token scored
    alone, per verify mode, context length and K: the numerical noise that pass shapes add.

    A greedy divergence from plain decoding is a tie only where its margin is below this noise. In the
    llama.cpp runner's exact mode the noise is 0 by design; one unchunked pass, and the torch runner,
    have their own. Each context is scored to its end, then K = max(ks) tokens of it are rescored.
    """
    if hasattr(runner, "exact_chunk"):  # llama.cpp: both verify modes, whichever the runner was opened with
        from ..llama_lib import exact_pass_rows

        modes: dict[str, int | None] = {"exact": exact_pass_rows(), "one-pass": 0}
    else:
        modes = {"as-run": None}
    result: dict[str, dict] = {mode: {} for mode in modes}
    k_max = max(ks)
    saved = getattr(runner, "exact_chunk", None)
    try:
        for context in contexts:
            prefix, probe = list(context[:-k_max]), list(context[-k_max:])
            runner.reset()
            runner.forward(prefix, all_logits=False)
            base = runner.n_past
            alone = np.stack([runner.forward([t])[0].copy() for t in probe])
            for mode, chunk in modes.items():
                if chunk is not None:
                    runner.exact_chunk = chunk
                per_k = {}
                for k in ks:
                    runner.rollback(base)
                    rows = runner.forward(probe[:k])
                    per_k[k] = float(np.abs(rows - alone[:k]).max())
                result[mode][len(prefix)] = per_k
    finally:
        if saved is not None:
            runner.exact_chunk = saved
        runner.reset()
    return {mode: {"by_context": by_ctx, "max": max((d for per_k in by_ctx.values() for d in per_k.values()), default=0.0)}
            for mode, by_ctx in result.items()}
