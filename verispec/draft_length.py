"""Where the draft length K is chosen: the K that maximises expected tokens per second.

With per-token acceptance a, drafting K tokens yields on average 1 + a + a^2 + ... + a^K tokens
per target pass (the target's own token always counts). A step costs the verify pass over K+1
tokens plus K draft steps. Verify costs are measured per batch size as the run goes; sizes not
yet seen are extrapolated from a prior curve T(n)/T(1) scaled to what was measured.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# T(n)/T(1) for one llama.cpp pass over n rows, per verify mode: the Qwen2.5-Coder-1.5B Q4_K_M target through
# the runner (verispec's GGML_OPENMP=OFF build, 2 threads, a 121-token context), as `verispec bench` measured it
# on 2026-12-06 (docs/bench-2026-12-06, "Verify cost"; n = 3 from the one-pass run beside it: the same pass).
# "exact" scores in chunks of <= 3 rows, so its cost grows about linearly from 4 rows on; "one-pass" is one
# batch, where ggml's repacked gemm takes over at 4 rows (4 rows cost less than 3; up to 3 rows both modes run
# the same pass). Interpolated between sizes, extrapolated linearly beyond; measurements replace it as a run goes.
# "torch-cpu-*": the torch runner's pass (runners/torch.py) over the Qwen2.5-Coder-1.5B shapes, 2 threads, a
# 121-200-token context, on this Xeon (AVX-512 and AMX), 2026-12-06 (docs/bench-2026-12-06-torch-fp32 and
# -bf16, "Verify cost", and random weights of the same shapes for n = 32). fp32: MKL's one- to three-row path reads each
# weight once, from 4 rows a gemm runs compute-bound. bf16: oneDNN's AMX tiles keep a pass up to 32 rows within
# 22% of one row, and one row is itself faster than fp32's (196 against 232 ms). A CPU without AMX would see
# bf16 far steeper; the measurements replace the prior as a run goes. CUDA has no measured curve yet (see
# scripts/device_check.py) and borrows the bf16 one, the flattest: a GPU's passes are flatter still.
PRIOR_VERIFY_RATIO = {
    "exact": {1: 1.0, 2: 1.55, 3: 1.94, 4: 2.95, 8: 5.27, 16: 10.65},
    "one-pass": {1: 1.0, 2: 1.54, 3: 1.94, 4: 1.69, 8: 3.09, 16: 3.81},
    "torch-cpu-fp32": {1: 1.0, 2: 1.08, 3: 1.08, 4: 1.97, 8: 2.64, 16: 2.62, 32: 3.35},
    "torch-cpu-bf16": {1: 1.0, 2: 1.04, 3: 1.03, 4: 1.08, 8: 1.06, 16: 1.13, 32: 1.22},
}


def prior_ratio(n: int, curve: str = "exact") -> float:
    """The prior T(n)/T(1) of a cost curve named by a runner's `cost_curve` (unknown names: the one-pass curve)."""
    return ratio_at(prior_curve(curve), n)


def prior_curve(name: str) -> dict[int, float]:
    """A curve by name; an unmeasured torch device/dtype borrows the nearest: a GPU the flattest (bf16 here),
    another CPU dtype (fp16) the steeper fp32 one, anything else the one-pass curve."""
    if name in PRIOR_VERIFY_RATIO:
        return PRIOR_VERIFY_RATIO[name]
    if name.startswith("torch-"):
        return PRIOR_VERIFY_RATIO["torch-cpu-fp32" if name.startswith("torch-cpu") else "torch-cpu-bf16"]
    return PRIOR_VERIFY_RATIO["one-pass"]


def ratio_at(curve: dict[int, float], n: int) -> float:
    """curve[n] of a T(n)/T(1) curve known at some sizes: linear between them, linear from the largest beyond it."""
    keys = sorted(curve)
    if n in curve:
        return curve[n]
    if n > keys[-1]:
        return curve[keys[-1]] * n / keys[-1]
    if n < keys[0]:
        return curve[keys[0]]
    lo = max(k for k in keys if k < n)
    hi = min(k for k in keys if k > n)
    w = (n - lo) / (hi - lo)
    return curve[lo] * (1 - w) + curve[hi] * w


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens per target pass with K drafted tokens each accepted with probability `acceptance`."""
    return sum(acceptance**i for i in range(k + 1))


def expected_rate(acceptance: float, k: int, verify_time: float, draft_time_per_token: float) -> float:
    return expected_tokens(acceptance, k) / (verify_time + k * draft_time_per_token)


def best_k(acceptance: float, verify_times: dict[int, float], draft_time_per_token: float, k_max: int,
           min_gain: float = 1.0) -> int:
    """argmax_K of expected tokens/s over 0..k_max; K>0 only if it beats K=0 by `min_gain`."""
    rates = {k: expected_rate(acceptance, k, verify_times[k + 1], draft_time_per_token) for k in range(k_max + 1)}
    k = max(rates, key=rates.get)
    return k if rates[k] >= min_gain * rates[0] else 0


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


@dataclass
class DraftLengthChooser:
    """Per-request adaptive K. `fixed` pins K; otherwise K follows measured acceptance and costs."""

    k_max: int = 16
    fixed: int | None = None
    acceptance: float = 0.7  # prior, replaced by measurement as the run goes
    min_gain: float = 1.03  # speculate only when the model predicts a clear gain: never slower
    probe_every: int | None = 16  # while K=0, draft a little every this many steps to re-measure acceptance (None: never)
    ema_weight: float = 0.15
    verify_seconds: dict[int, float] = field(default_factory=dict)
    draft_seconds_per_token: float | None = None
    drafted_last_step: bool = True  # False after a step without drafting, or a skipped draft prefill
    cost_curve: str = "exact"  # the prior T(n)/T(1) that extrapolates unmeasured sizes: the runner's cost_curve
    _steps_at_zero: int = 0

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.verify_seconds:
            return min(2, self.k_max)  # nothing measured yet: a short draft measures both costs
        k = best_k(self.acceptance, self.verify_table(), self.draft_seconds_per_token or 0.0, self.k_max, self.min_gain)
        if k > 0 and 1 not in self.verify_seconds:
            # Every K is judged against K = 0, whose cost T(1) must be measured, not extrapolated from the prior
            # curve: with an extrapolated T(1) the demo settled on K = 1 below plain decoding's speed.
            return 0
        if k == 0:
            self._steps_at_zero += 1
            if self.probe_every and self._steps_at_zero % self.probe_every == 0:
                return 1
        else:
            self._steps_at_zero = 0
        return k

    def would_draft(self) -> bool:
        """Whether the next choose() may draft (without choose()'s side effects)."""
        if self.fixed is not None or not self.verify_seconds:
            return bool(self.fixed if self.fixed is not None else self.k_max)
        return self.probe_every is not None or best_k(self.acceptance, self.verify_table(),
                                                       self.draft_seconds_per_token or 0.0, self.k_max, self.min_gain) > 0

    def verify_table(self) -> dict[int, float]:
        """Measured seconds per verify size; unmeasured sizes from the prior curve, scaled by the nearest measured size."""
        table = {}
        measured = sorted(self.verify_seconds)
        for n in range(1, self.k_max + 2):
            if n in self.verify_seconds:
                table[n] = self.verify_seconds[n]
                continue
            ref = min(measured, key=lambda m: abs(m - n))
            table[n] = self.verify_seconds[ref] * prior_ratio(n, self.cost_curve) / prior_ratio(ref, self.cost_curve)
        return table

    def record_verify(self, n_tokens: int, seconds: float) -> None:
        self.verify_seconds[n_tokens] = _ema(self.verify_seconds.get(n_tokens), seconds, 0.3)

    def record_draft(self, n_drafted: int, seconds: float) -> None:
        """Learn a costly drafter's seconds per drafted token. Called every step, drafted or not.

        A draft model that sat a step out first catches up on every token since, a one-time cost
        that would inflate the per-token figure (and, carried, later requests' priors), so a step
        that follows one without drafting is not learned from.
        """
        in_step, self.drafted_last_step = self.drafted_last_step, n_drafted > 0
        if n_drafted and in_step:
            self.draft_seconds_per_token = _ema(self.draft_seconds_per_token, seconds / n_drafted, 0.3)

    def record_acceptance(self, n_drafted: int, n_accepted: int) -> None:
        """Update the per-token acceptance from one step: the accepted prefix, then the first miss."""
        if n_drafted == 0:
            return
        # Each drafted token up to and including the first rejection is one Bernoulli observation.
        observed = n_accepted + (1 if n_accepted < n_drafted else 0)
        rate = n_accepted / observed
        self.acceptance = min(0.99, max(0.01, _ema(self.acceptance, rate, self.ema_weight * min(observed, 4) / 2)))


class CarriedCosts:
    """What one request's chooser measured, handed to the next request's chooser.

    Pass costs are facts of the hardware, and a drafter's acceptance on earlier requests is a
    better prior than a constant. Without this, every request pays to re-learn them: a draft
    model that does not pay here still prefills each prompt and drafts a first probe. Every
    `explore_every`-th request starts from the constant acceptance prior instead, so a drafter
    that was judged not to pay gets measured again. Thread-safe: a server's slots share one.

    Each request's figures are blended in (weight `carry_weight`) rather than copied, so that one
    odd request, a short one or one whose prompt suited its drafter unusually well or badly, does
    not set the prior of every request after it.
    """

    def __init__(self, explore_every: int = 8, carry_weight: float = 0.5) -> None:
        self.explore_every = explore_every
        self.carry_weight = carry_weight
        self.requests = 0
        self._verify_seconds: dict[int, float] = {}
        self._draft_seconds_per_token: float | None = None
        self._acceptance: float | None = None
        self._lock = threading.Lock()

    @property
    def acceptance(self) -> float | None:
        return self._acceptance

    @property
    def draft_seconds_per_token(self) -> float | None:
        return self._draft_seconds_per_token

    def seed(self, chooser: DraftLengthChooser) -> None:
        with self._lock:
            self.requests += 1
            chooser.verify_seconds.update(self._verify_seconds)
            chooser.draft_seconds_per_token = self._draft_seconds_per_token
            if self._acceptance is not None and self.requests % self.explore_every:
                chooser.acceptance = self._acceptance

    def absorb(self, chooser: DraftLengthChooser) -> None:
        w = self.carry_weight
        with self._lock:
            for n_tokens, seconds in chooser.verify_seconds.items():
                self._verify_seconds[n_tokens] = _ema(self._verify_seconds.get(n_tokens), seconds, w)
            if chooser.draft_seconds_per_token is not None:
                self._draft_seconds_per_token = _ema(self._draft_seconds_per_token, chooser.draft_seconds_per_token, w)
            self._acceptance = _ema(self._acceptance, chooser.acceptance, w)


TREE_BUDGETS = (0, 4, 8, 16, 32)  # 0 = no tree: a chain with its own adaptive K


@dataclass
class TreeBudgetChooser:
    """Where the tree budget is chosen: the arm with the best measured tokens per second, "no tree" included.

    Tree steps cannot be costed like chains (acceptance depends on the tree's shape), so each
    budget is measured directly: tokens gained and seconds spent per step, as moving averages.
    Budgets are tried `warmup` times each, smallest first, and warm-up stops at the first budget
    slower than the one before it (verify cost grows with the budget, so larger ones would lose
    too). Afterwards the best one runs, and every `explore_every` steps its neighbour is retried,
    since acceptance drifts with the text. A costly drafter is not re-explored (explore_every=None):
    after steps without drafting it would first have to catch up on every token it skipped.
    """

    budgets: tuple[int, ...] = TREE_BUDGETS
    fixed: int | None = None
    warmup: int = 2
    explore_every: int | None = 32
    ema_weight: float = 0.2
    tokens: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    tries: dict[int, int] = field(default_factory=dict)
    _steps: int = 0

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        self._steps += 1
        warming = self._next_warmup()
        if warming is not None:
            return warming
        best = self.best()
        if self.explore_every and self._steps % self.explore_every == 0:
            i = self.budgets.index(best)
            neighbours = [self.budgets[j] for j in (i - 1, i + 1) if 0 <= j < len(self.budgets)]
            return neighbours[(self._steps // self.explore_every) % len(neighbours)]
        return best

    def _next_warmup(self) -> int | None:
        """The smallest budget not yet tried `warmup` times; None once one proved slower than a smaller one."""
        for i, budget in enumerate(self.budgets):
            if self.tries.get(budget, 0) < self.warmup:
                return budget
            if i > 0 and self.rate(budget) < max(self.rate(b) for b in self.budgets[:i]):
                return None
        return None

    def best(self) -> int:
        measured = [b for b in self.budgets if self.seconds.get(b)]
        return max(measured, key=self.rate) if measured else self.budgets[0]

    def rate(self, budget: int) -> float:
        return self.tokens[budget] / self.seconds[budget]

    def record(self, budget: int, tokens: int, seconds: float) -> None:
        self.tries[budget] = self.tries.get(budget, 0) + 1
        self.tokens[budget] = _ema(self.tokens.get(budget), float(tokens), self.ema_weight)
        self.seconds[budget] = _ema(self.seconds.get(budget), seconds, self.ema_weight)
