"""Where the draft length K is chosen for one request: the K that maximises its expected tokens per second.

DraftLengthChooser picks a chain's K from the acceptance and the verify and draft costs it measures
as the request runs; CarriedCosts hands those measurements from one request to the next;
TreeBudgetChooser picks a tree's node budget by measuring each budget directly. The arithmetic
(T(n) with its prior curve, expected tokens, the acceptance estimate) is cost_model.py's, shared
with the server's plan across requests (serve/goodput.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .cost_model import VerifyCosts, acceptance_observations, best_k
from .ema import ema

# Re-exported: they lived here before cost_model.py, and older importers still ask for them here.
from .cost_model import PRIOR_VERIFY_RATIO, expected_rate, expected_tokens, prior_curve, prior_ratio, ratio_at  # noqa: F401


@dataclass
class DraftLengthChooser:
    """Per-request adaptive K. `fixed` pins K; otherwise K follows measured acceptance and costs."""

    k_max: int = 16
    fixed: int | None = None
    acceptance: float = 0.7  # prior, replaced by measurement as the run goes
    min_gain: float = 1.03  # speculate only when the model predicts a clear gain: never slower
    probe_every: int | None = 16  # while K=0, draft a little every this many steps to re-measure acceptance (None: never)
    # While K>0, every this many steps is a plain one (K=0) that measures T(1) again (None: never). Drafting
    # is judged against T(1), which drafting steps never measure; this machine drifts 10-20% within an hour,
    # and a T(1) carried from earlier requests, measured while it ran slower, kept the bench's `auto` drafting
    # a 0.5B model at K=2 on four prompts (T(3) + 2 drafts against 3 x T(1): 0.86-0.93x plain decoding).
    refresh_every: int | None = 16
    ema_weight: float = 0.15
    verify_seconds: dict[int, float] = field(default_factory=dict)
    draft_seconds_per_token: float | None = None
    drafted_last_step: bool = True  # False after a step without drafting, or a skipped draft prefill
    cost_curve: str = "exact"  # the prior T(n)/T(1) that extrapolates unmeasured sizes: the runner's cost_curve
    _steps_at_zero: int = 0
    _drafting_steps: int = 0

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
            self._drafting_steps += 1
            if self.refresh_every and self._drafting_steps % self.refresh_every == 0:
                return 0
        return k

    def would_draft(self) -> bool:
        """Whether the next choose() may draft (without choose()'s side effects)."""
        if self.fixed is not None or not self.verify_seconds:
            return bool(self.fixed if self.fixed is not None else self.k_max)
        return self.probe_every is not None or best_k(self.acceptance, self.verify_table(),
                                                       self.draft_seconds_per_token or 0.0, self.k_max, self.min_gain) > 0

    @property
    def verify_costs(self) -> VerifyCosts:
        """A view over `verify_seconds` (shared, not copied) with this runner's prior curve."""
        return VerifyCosts(self.verify_seconds, self.cost_curve)

    def verify_table(self) -> dict[int, float]:
        """Measured seconds per verify size; unmeasured sizes from the prior curve, scaled by the nearest measured size."""
        return self.verify_costs.table(self.k_max + 1)

    def record_verify(self, n_tokens: int, seconds: float) -> None:
        self.verify_costs.record(n_tokens, seconds, 0.3)

    def record_draft(self, n_drafted: int, seconds: float) -> None:
        """Learn a costly drafter's seconds per drafted token. Called every step, drafted or not.

        A draft model that sat a step out first catches up on every token since, a one-time cost
        that would inflate the per-token figure (and, carried, later requests' priors), so a step
        that follows one without drafting is not learned from.
        """
        in_step, self.drafted_last_step = self.drafted_last_step, n_drafted > 0
        if n_drafted and in_step:
            self.draft_seconds_per_token = ema(self.draft_seconds_per_token, seconds / n_drafted, 0.3)

    def record_acceptance(self, n_drafted: int, n_accepted: int) -> None:
        """Update the per-token acceptance from one step: the accepted prefix, then the first miss."""
        if n_drafted == 0:
            return
        accepted, observed = acceptance_observations(n_drafted, n_accepted)
        rate = accepted / observed
        self.acceptance = min(0.99, max(0.01, ema(self.acceptance, rate, self.ema_weight * min(observed, 4) / 2)))


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
                self._verify_seconds[n_tokens] = ema(self._verify_seconds.get(n_tokens), seconds, w)
            if chooser.draft_seconds_per_token is not None:
                self._draft_seconds_per_token = ema(self._draft_seconds_per_token, chooser.draft_seconds_per_token, w)
            self._acceptance = ema(self._acceptance, chooser.acceptance, w)


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
        self.tokens[budget] = ema(self.tokens.get(budget), float(tokens), self.ema_weight)
        self.seconds[budget] = ema(self.seconds.get(budget), seconds, self.ema_weight)
