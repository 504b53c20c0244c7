"""The server's plan across requests: how many draft tokens each active request may send to verification.

The engine's per-request chooser (draft_length.py) picks the K that maximises *that request's*
tokens/s. When the target passes of several requests are fused, a verify row costs compute that
every request shares: with exact chunks of C rows, R rows cost floor(R/C) T(C) + T(R mod C). A
draft token accepted with probability a^j buys a^j tokens, while the same row given to another
request's plain step buys 1 token. So the server plans caps for all requests at once: start every
request at K = 0, greedily add the draft row that raises the predicted goodput (generated tokens
per second over the whole batch) most, and keep the plan only if it beats no drafting by
`min_gain`. A request's own adaptive K then runs below its cap. With 3+ requests (chunks already
full of plain rows) drafting rarely pays; with one or two requests it is what the chooser would do alone.

T(n) is measured by the pool (seconds per fused decode of n rows, EMA); unmeasured sizes come from the
runner's prior curve (`cost_curve`) scaled to what was measured. That extrapolation, expected tokens
and the acceptance estimate are cost_model.py's, the same arithmetic the per-request chooser asks.
Draft-model time per drafted token and the acceptance come from each request's own stats; until a
request has drafted, from what earlier requests on its drafter measured (draft_length.CarriedCosts),
so that a new request is not planned as if drafting were free and accepted at the prior. With one active request, or without fusion
(per-slot contexts), a request's rows cost only its own pass: the per-request chooser is already
the goodput rule and the scheduler sets no cap (which also keeps a lone seeded sampled request
reproducible: its K does not depend on costs measured for earlier requests).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cost_model import VerifyCosts, acceptance_observations, expected_tokens, next_draft_value
from ..engine import Stats


@dataclass
class Candidate:
    """An active request as the planner sees it."""

    stats: Stats
    k_max: int  # 0: this request has no drafter
    fixed: bool  # the client pinned K or the drafter: planned as it is, never capped
    prior_acceptance: float = 0.6  # before the request's own drafting steps: earlier requests' measure
    prior_draft_seconds: float = 0.0  # per drafted token, likewise


def acceptance(stats: Stats, prior: float = 0.6, window: int = 32) -> float:
    """Per-token acceptance over the request's last `window` drafting steps, pulled towards `prior`."""
    steps = zip(stats.draft_lengths[-window:], stats.accepted_lengths[-window:])
    trials = [acceptance_observations(drafted, gained - 1) for drafted, gained in steps if drafted]
    accepted, observed = sum(a for a, _ in trials), sum(o for _, o in trials)
    return (accepted + prior * 2) / (observed + 2)


class GoodputPolicy:
    def __init__(self, fuse_rows: int, min_gain: float = 1.03, cost_curve: str = "exact") -> None:
        self.fuse_rows = fuse_rows
        self.min_gain = min_gain
        self.cost_curve = cost_curve  # the runner's prior T(n)/T(1), for pass sizes not yet measured
        self.pass_seconds: dict[int, float] = {}  # the measured T(rows); the scheduler hands over the pool's dict
        self.predicted = 0.0  # tokens/s of the last plan

    def t(self, rows: int) -> float:
        """T(rows), seconds of one decode; unitless prior ratios until a size is measured."""
        return VerifyCosts(self.pass_seconds, self.cost_curve).seconds(rows)

    def cost(self, total_rows: int) -> float:
        full, rest = divmod(total_rows, self.fuse_rows)
        return full * self.t(self.fuse_rows) + self.t(rest)

    def plan(self, requests: list[Candidate]) -> list[int]:
        """A cap on K per request (fixed requests are counted with their last K and get None)."""
        fixed_k = [c.stats.draft_lengths[-1] if c.fixed and c.stats.draft_lengths else 0 for c in requests]
        caps = list(fixed_k)
        rates = [acceptance(c.stats, c.prior_acceptance) for c in requests]
        draft_cost = [c.stats.draft_seconds / c.stats.drafted if c.stats.drafted else c.prior_draft_seconds
                      for c in requests]
        tokens = sum(expected_tokens(rate, k) for rate, k in zip(rates, caps))
        rows = len(requests) + sum(caps)
        seconds = self.cost(rows) + sum(d * k for d, k in zip(draft_cost, caps))
        base = (tokens, seconds)
        while True:
            best, best_rate = None, tokens / seconds if seconds else 0.0
            for i, c in enumerate(requests):
                if c.fixed or caps[i] >= c.k_max:
                    continue
                step = self.cost(rows + 1) - self.cost(rows) + draft_cost[i]
                rate = (tokens + next_draft_value(rates[i], caps[i])) / (seconds + step)
                if rate > best_rate:
                    best, best_rate = i, rate
            if best is None:
                break
            tokens += next_draft_value(rates[best], caps[best])
            seconds += self.cost(rows + 1) - self.cost(rows) + draft_cost[best]
            caps[best] += 1
            rows += 1
        if seconds and base[1] and tokens / seconds < self.min_gain * base[0] / base[1]:
            caps, (tokens, seconds) = fixed_k, base  # a marginal gain is not worth the variance
        self.predicted = tokens / seconds if seconds else 0.0
        return caps
