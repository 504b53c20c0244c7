"""The draft -> verify -> accept loop.

One step: the drafter proposes K tokens; the target scores [last token] + draft in ONE forward
pass; the verifier accepts a prefix and adds the target's own next token; the target's cache is
rolled back past the rejected tokens. K = 0 is plain autoregressive decoding through the same code.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .draft_gate import DraftGate
from .draft_length import TREE_BUDGETS, CarriedCosts, DraftLengthChooser, TreeBudgetChooser
from .drafters.base import Drafter
from .drafters.tree_growth import TreeShape, grow_tree_steps
from .errors import PromptError
from .runners.base import Runner
from .runners.passes import DraftPass, Forward
from .sampling import LogitsProcessor, PositionNoise, SamplingParams, TokenLogprob, chain_paths
from .token_tree import TokenTree, build_tree, nodes_within_leaves, tree_depths
from .verify import backend
from .verify.rejection import ChainVerifier
from .verify.tree import TreeVerifier

PREFIX_WIDTH = 4  # candidate continuations per drafter level in prefix mode


def relaxed_tau(acceptance: str) -> float | None:
    """The TAU of 'relaxed:TAU' (lossy acceptance), None for the exact modes."""
    from .errors import InvalidParameter

    if acceptance in ("exact", "prefix"):
        return None
    if acceptance.startswith("relaxed:"):
        try:
            tau = float(acceptance.split(":", 1)[1])
        except ValueError:
            tau = -1.0
        if 0.0 < tau <= 1.0:
            return tau
    raise InvalidParameter(f"acceptance must be exact, prefix or relaxed:TAU with 0 < TAU <= 1, got {acceptance!r}", "acceptance")


@dataclass
class SpeculativeConfig:
    """How to speculate. draft=None decodes plainly."""

    draft: str | None = None  # "ngram", "auto", a registered name or a path; None = plain decoding
    draft_tokens: int | None = None  # fixed K; None = adaptive
    draft_max: int = 12
    draft_min_prob: float = 0.0  # model drafts stop once their top probability falls below this
    ngram_min: int = 2
    ngram_max: int = 4
    tree_width: int = 1  # candidates per depth; > 1 verifies a token tree instead of a chain
    tree: str | None = None  # "dynamic" (EAGLE-2 style) or "static:4,2,2,1": grow a tree from the drafter
    tree_budget: int | None = None  # drafted nodes per tree; None = chosen by measurement, "no tree" included
    # "exact" (default): chain or tree, lossless. "prefix": several candidate continuations (one per
    # drafter level and match, PARSE-style) verified in one pass, the longest valid one kept; lossless.
    # "relaxed:TAU": LOSSY, also accepts a drafted token the target gives >= TAU x its top probability.
    acceptance: str = "exact"

    def __post_init__(self) -> None:
        from .errors import InvalidParameter

        if self.tree is not None:
            TreeShape.parse(self.tree)
        if self.tree_budget is not None and not 0 <= self.tree_budget <= 64:
            raise InvalidParameter(f"tree_budget must be in 0..64, got {self.tree_budget}", "tree_budget")
        relaxed_tau(self.acceptance)

        if self.draft_tokens is not None and not 0 <= self.draft_tokens <= 64:
            raise InvalidParameter(f"draft_tokens must be in 0..64, got {self.draft_tokens}", "draft_tokens")
        if not 1 <= self.draft_max <= 64:
            raise InvalidParameter(f"draft_max must be in 1..64, got {self.draft_max}", "draft_max")
        if not 1 <= self.tree_width <= 8:
            raise InvalidParameter(f"tree_width must be in 1..8, got {self.tree_width}", "tree_width")
        if not 0.0 <= self.draft_min_prob < 1.0:
            raise InvalidParameter(f"draft_min_prob must be in [0, 1), got {self.draft_min_prob}", "draft_min_prob")

    @property
    def uses_trees(self) -> bool:
        """Some steps verify a token tree (branches, a grown tree, or prefix / relaxed acceptance's candidates)."""
        return self.tree_width > 1 or self.tree is not None or self.acceptance != "exact"

    def max_pass_rows(self) -> int:
        """The most rows one verification pass can hold: the last token and the draft, or a tree's nodes."""
        rows = self.draft_max + 1
        if self.tree is not None:
            rows = max(rows, 1 + (self.tree_budget if self.tree_budget is not None else max(TREE_BUDGETS)))
        if self.uses_trees and self.tree is None:
            width = max(self.tree_width, PREFIX_WIDTH if self.acceptance != "exact" else 1)
            rows = max(rows, 1 + self.draft_max * width)
        return rows


# What Engine.steps yields: a target pass to run (send back its logits), a draft model's pass (send back its last
# row's logits), or the tokens a step emitted.
StepEvent = Forward | DraftPass | list[int]


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated: int = 0
    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    decode_seconds: float = 0.0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens gained per target pass (bonus included)
    draft_lengths: list[int] = field(default_factory=list)
    accepted_at_position: list[int] = field(default_factory=list)  # accepted count per draft position
    drafted_at_position: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit per emitted token (when recorded)
    drafted_by_source: dict[str, int] = field(default_factory=dict)  # which drafter (cascade level) proposed what
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    tree_budgets: list[int] = field(default_factory=list)  # budget used per step, when trees are grown
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per emitted token, when the request asks for them
    draft_prefill_seconds: float = 0.0  # the drafter's share of prefill_seconds
    capped_steps: int = 0  # steps a scheduler's cap of 0 kept from drafting (DraftGate.cap)
    finish_reason: str = "length"

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def mean_draft_length(self) -> float:
        return float(np.mean(self.draft_lengths)) if self.draft_lengths else 0.0

    def record_step(self, n_drafted: int, n_accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        """One target pass: n_drafted tokens (or tree nodes) checked, n_accepted kept, plus the target's own."""
        self.draft_seconds += draft_seconds
        self.verify_seconds += verify_seconds
        self.target_passes += 1
        self.drafted += n_drafted
        self.accepted += n_accepted
        self.draft_lengths.append(n_drafted)
        self.accepted_lengths.append(n_accepted + 1)

    def record_positions(self, n_drafted: int, n_accepted: int) -> None:
        grow = n_drafted - len(self.drafted_at_position)
        if grow > 0:
            self.drafted_at_position.extend([0] * grow)
            self.accepted_at_position.extend([0] * grow)
        for i in range(n_drafted):
            self.drafted_at_position[i] += 1
            self.accepted_at_position[i] += i < n_accepted

    def record_sources(self, drafted: list[str], accepted: list[str]) -> None:
        for source in drafted:
            self.drafted_by_source[source] = self.drafted_by_source.get(source, 0) + 1
        for source in accepted:
            self.accepted_by_source[source] = self.accepted_by_source.get(source, 0) + 1

    def summary(self) -> str:
        total = self.draft_seconds + self.verify_seconds or 1.0
        return (
            f"{self.generated} tokens in {self.decode_seconds:.2f}s: {self.tokens_per_second:.1f} tokens/s | "
            f"acceptance {self.acceptance_rate:.0%} ({self.accepted}/{self.drafted}) | "
            f"mean accepted length {self.mean_accepted_length:.2f} | draft length {self.mean_draft_length:.1f} | "
            f"time draft {self.draft_seconds / total:.0%} / verify {self.verify_seconds / total:.0%}"
            + (" | accepted by level " + ", ".join(f"{s} {self.accepted_by_source.get(s, 0)}/{n}"
                                               for s, n in self.drafted_by_source.items())
               if len(self.drafted_by_source) > 1 else "")
        )

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated": self.generated,
            "target_passes": self.target_passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "mean_draft_length": self.mean_draft_length,
            "tokens_per_second": self.tokens_per_second,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "accepted_lengths": self.accepted_lengths,
            "accepted_at_position": self.accepted_at_position,
            "drafted_at_position": self.drafted_at_position,
            "finish_reason": self.finish_reason,
            "drafted_by_source": self.drafted_by_source,
            "accepted_by_source": self.accepted_by_source,
            "tree_budgets": self.tree_budgets,
        }


class Engine:
    """Generates tokens for one request at a time from a target runner and an optional drafter."""

    def __init__(self, target: Runner, drafter: Drafter | None = None, config: SpeculativeConfig | None = None,
                 carried: CarriedCosts | None = None) -> None:
        self.target = target
        self.drafter = drafter
        self.config = config or SpeculativeConfig()
        # The adaptive K's measurements carry from request to request (a server shares one across slots).
        self.carried = carried if carried is not None else CarriedCosts()
        self.tree_shape = TreeShape.parse(self.config.tree) if self.config.tree else None
        self.relaxed = relaxed_tau(self.config.acceptance)
        self.verify_backend = backend.for_runner(target)  # numpy on the host, or torch where the logits stay
        self.gate = DraftGate()  # a scheduler's cap on K, and a costly drafter's prefill phase (draft_gate.py)
        # Tree budgets are measured per engine, not per request: their costs are facts of the hardware.
        self.budget_chooser = None
        if self.tree_shape:
            costly = bool(drafter and drafter.costly)
            self.budget_chooser = TreeBudgetChooser(fixed=self.config.tree_budget, explore_every=None if costly else 32)

    def generate(self, prompt: Sequence[int], params: SamplingParams, stats: Stats | None = None,
                 record_margins: bool = False, rng: np.random.Generator | None = None) -> Iterator[list[int]]:
        """Yield the new tokens of each step; fill `stats` as it goes. EOS ends the request and is not yielded.

        The steps (`steps`) with their target passes run at once on this engine's target."""
        run = self.steps(prompt, params, stats, record_margins, rng)
        try:
            event = next(run)
            while True:
                if isinstance(event, Forward):
                    event = run.send(self.target.forward_native(event.tokens, event.parents, event.all_logits))
                elif isinstance(event, DraftPass):
                    event = run.send(event.run())
                else:
                    yield event
                    event = next(run)
        except StopIteration:
            return
        finally:
            run.close()

    def steps(self, prompt: Sequence[int], params: SamplingParams, stats: Stats | None = None,
              record_margins: bool = False, rng: np.random.Generator | None = None) -> Generator[StepEvent, object, None]:
        """The request's steps as a coroutine: it yields a Forward when it needs a target pass (send its
        logits back) and a token list when a step emitted tokens (send None). EOS is not emitted.

        A seeded request samples with noise keyed by token position (sampling.PositionNoise), so it
        writes the same tokens however it is drafted; an unseeded one goes through the rejection
        sampler, drawing from `rng` (tests pass one to repeat a run) or from fresh entropy.
        """
        stats = stats if stats is not None else Stats()
        prompt = list(prompt)
        self._check_prompt(prompt, params)
        rng = rng if rng is not None else np.random.default_rng(params.seed)
        noise = None
        if params.seed is not None and not params.greedy:
            noise = PositionNoise(params.seed, self.target.n_vocab, slots=self.config.draft_max + 2)
        verify = self.verify_backend
        verifier = verify.chain(self.target.n_vocab, params, rng, self.config.draft_max + 1, noise)
        tree_verifier = verify.tree(self.target.n_vocab, params, rng, self.relaxed, noise) if self.config.uses_trees else None
        chooser = self._chooser()
        processor = None
        if params.edits_logits or params.logprobs is not None:
            processor = LogitsProcessor(params, self.target.n_vocab, len(prompt))
        adaptive = self.drafter is not None and chooser.fixed is None
        if adaptive:
            self.carried.seed(chooser)
        self.target.reset()
        stats.prompt_tokens = len(prompt)

        t0 = time.perf_counter()
        if self.drafter:
            self.drafter.begin(prompt, params, rng, noise, processor)
            chooser.drafted_last_step = chooser.would_draft() or self.budget_chooser is not None
            if self.gate.start(self.drafter.costly, chooser.drafted_last_step):
                self.drafter.prefill(prompt)
                stats.draft_prefill_seconds = time.perf_counter() - t0
        rows = yield Forward(prompt, all_logits=False)
        row = rows[-1] if processor is None else processor.apply(rows[-1:], [[]])[0]
        if self.drafter:
            self.drafter.accepted(len(rows) - 1)
        last = verify.pick(row, params, rng, noise, len(prompt))
        if processor is not None:
            processor.accept([last], row[None])
        if record_margins:
            stats.margins.append(verify.margin(row))
        stats.prefill_seconds = time.perf_counter() - t0
        context = prompt + [last]
        t_decode = time.perf_counter()
        try:
            yield from self._decode(context, last, chooser, verifier, tree_verifier, stats, params, record_margins, t_decode,
                                    processor)
        finally:
            if adaptive:
                self.carried.absorb(chooser)
            if self.drafter:
                self.drafter.finish(context)

    def _decode(self, context: list[int], last: int, chooser: DraftLengthChooser, verifier: ChainVerifier,
                tree_verifier: TreeVerifier | None, stats: Stats, params: SamplingParams, record_margins: bool,
                t_decode: float, processor: LogitsProcessor | None) -> Generator[StepEvent, object, None]:
        eos = frozenset() if params.ignore_eos else self.target.tokenizer.eos_ids
        new = [last]
        while True:
            new, done = self._emit(new, eos, stats, params.max_tokens)
            if params.logprobs is not None:
                stats.logprobs.extend(processor.kept_logprobs[: len(new)])
            if new:
                yield new
            stats.decode_seconds = time.perf_counter() - t_decode
            if done:
                return
            if self.target.n_past + 2 > self.target.n_ctx:
                stats.finish_reason = "context"
                return
            new = yield from self._step(context, last, chooser, verifier, tree_verifier, stats, record_margins, processor)
            context.extend(new)
            last = new[-1]

    def _step(self, context: list[int], last: int, chooser: DraftLengthChooser, verifier: ChainVerifier,
              tree_verifier: TreeVerifier | None, stats: Stats, record_margins: bool,
              processor: LogitsProcessor | None) -> Generator[StepEvent, object, list[int]]:
        if self.gate.prefill_due:
            self._deferred_prefill(context, chooser, stats)
        cap = self.gate.step_cap()
        if cap == 0 and self.drafter is not None:
            stats.capped_steps += 1
            chooser.choose()  # its probe counter runs as if it had been asked
            return (yield from self._chain_step(context, last, 0, chooser, verifier, stats, record_margins, processor))
        if self.budget_chooser is not None and self.drafter is not None:
            return (yield from self._budgeted_step(context, last, chooser, verifier, tree_verifier, stats, record_margins,
                                                   cap, processor))
        k = min(chooser.choose(), self._draft_room(), 64 if cap is None else cap) if self.drafter else 0
        if k > 0 and tree_verifier is not None:
            width = max(self.config.tree_width, PREFIX_WIDTH if self.config.acceptance != "exact" else 1)
            return (yield from self._tree_step(self._branch_tree(context, last, k, width), k, chooser, tree_verifier,
                                               stats, len(context), processor))
        return (yield from self._chain_step(context, last, k, chooser, verifier, stats, record_margins, processor))

    def _deferred_prefill(self, context: list[int], chooser: DraftLengthChooser, stats: Stats) -> None:
        """A gated request's costly drafter, at its second decode step: prefilled on the context if the scheduler's
        cap and the chooser still let it draft, or off for the request."""
        if self.gate.cap == 0 or not (chooser.would_draft() or self.budget_chooser is not None):
            self.gate.switch_off()
            return
        t0 = time.perf_counter()
        self.drafter.prefill(context)
        stats.draft_prefill_seconds = time.perf_counter() - t0
        self.gate.prefilled()

    def _draft_room(self) -> int:
        """Tokens a chain step may draft. Its pass holds the last token and the draft, and a fully accepted
        draft adds the target's own token after it: plain decoding writes that token only if its cache
        could still take it, so the draft stops one short of the context."""
        return max(0, self.target.n_ctx - self.target.n_past - 2)

    def _budgeted_step(self, context: list[int], last: int, chooser: DraftLengthChooser, verifier: ChainVerifier,
                       tree_verifier: TreeVerifier, stats: Stats, record_margins: bool, cap: int | None,
                       processor: LogitsProcessor | None) -> Generator[StepEvent, object, list[int]]:
        """A grown tree of the chosen budget, or (budget 0) a chain step; the budget chooser learns from both.
        A scheduler's cap bounds the drafted nodes (a capped budget is measured apart from the chooser's own)."""
        budget = self.budget_chooser.choose()
        if cap is not None:
            budget = min(budget, cap)
        stats.tree_budgets.append(budget)
        t0 = time.perf_counter()
        if budget > 0:
            expansions = max(1, budget // 2) if self.drafter.costly else budget
            tree = grow_tree_steps(self.drafter, context, self.tree_shape, budget, expansions, self.config.draft_max)
            new = yield from self._tree_step(tree, expansions, None, tree_verifier, stats, len(context), processor)
        else:
            k = min(chooser.choose(), self._draft_room(), 64 if cap is None else cap)
            new = yield from self._chain_step(context, last, k, chooser, verifier, stats, record_margins, processor)
        self.budget_chooser.record(budget, len(new), time.perf_counter() - t0)
        return new

    def _chain_step(self, context: list[int], last: int, k: int, chooser: DraftLengthChooser, verifier: ChainVerifier,
                    stats: Stats, record_margins: bool,
                    processor: LogitsProcessor | None) -> Generator[StepEvent, object, list[int]]:
        t0 = time.perf_counter()
        draft = (yield from self.drafter.propose_steps(context, k)) if k > 0 else None
        drafted = draft.tokens[:k] if draft else []
        shadow = None
        if (not drafted and self.drafter and not self.drafter.costly and self.config.draft_tokens is None
                and self.gate.may_draft):
            # Taken before the target pass: drafters that read the target's state see it as it is now.
            shadow = self.drafter.propose(context, 1).tokens
        t1 = time.perf_counter()
        base = self.target.n_past
        rows = yield Forward([last] + drafted)
        if processor is not None:
            rows = processor.apply(rows, chain_paths(drafted))
        verdict = verifier.verify(rows, drafted, draft.probs if draft else None, len(context))
        kept = drafted[: verdict.n_accepted] + [verdict.next_token]
        if processor is not None:
            processor.accept(kept, rows[: len(kept)])
        if record_margins:
            stats.margins.extend(self.verify_backend.margin(r) for r in rows[: verdict.n_accepted + 1])
        self.target.rollback(base + 1 + verdict.n_accepted)
        if self.drafter:
            self.drafter.accepted(verdict.n_accepted)
        t2 = time.perf_counter()

        chooser.record_verify(len(drafted) + 1, t2 - t1)
        if shadow:
            chooser.record_acceptance(1, int(shadow[0] == verdict.next_token))
        if self.drafter is not None and self.drafter.costly:
            chooser.record_draft(len(drafted), t1 - t0)
        if drafted:
            chooser.record_acceptance(len(drafted), verdict.n_accepted)
            stats.record_positions(len(drafted), verdict.n_accepted)
            stats.record_sources([draft.source_of(i) for i in range(len(drafted))],
                                 [draft.source_of(i) for i in range(verdict.n_accepted)])
        stats.record_step(len(drafted), verdict.n_accepted, t1 - t0, t2 - t1)
        return kept

    def _branch_tree(self, context: list[int], last: int, k: int, width: int) -> Generator[DraftPass, np.ndarray, TokenTree]:
        branches, sources = yield from self.drafter.branch_steps(context, k, width)
        return build_tree(last, branches, sources)

    def _tree_step(self, drafting: Generator[DraftPass, np.ndarray, TokenTree], k: int, chooser: DraftLengthChooser | None,
                   verifier: TreeVerifier, stats: Stats, position: int,
                   processor: LogitsProcessor | None) -> Generator[StepEvent, object, list[int]]:
        """Verify a token tree (root = last token) in one pass; keep the accepted path in the cache.
        `drafting` drafts the tree: its model passes are yielded as the step's own, as a chain's are.

        `chooser` (the chain's draft-length chooser) learns from branch trees, whose first branch is
        the chain; grown trees are measured by the budget chooser instead.
        """
        t0 = time.perf_counter()
        tree: TokenTree = self._within_leaves((yield from drafting))
        last = tree.tokens[0]
        t1 = time.perf_counter()
        room = self.target.n_ctx - self.target.n_past - 1
        if len(tree) > room:
            tree = build_tree(last, [])
        # A tree that is one path (a suffix drafter's, where the history agrees) is sent as a chain.
        chain, base = tree.parents == list(range(-1, len(tree) - 1)), self.target.n_past
        rows = yield Forward(list(tree.tokens), None if chain else list(tree.parents))
        if processor is not None:
            rows = processor.apply(rows, tree.paths())
        verdict = verifier.verify(tree, rows, position)
        kept = [tree.tokens[i] for i in verdict.path[1:]] + [verdict.next_token]
        if processor is not None:
            processor.accept(kept, rows[verdict.path])
        if chain:
            self.target.rollback(base + len(verdict.path))
        else:
            self.target.keep_path(verdict.path)
        self.drafter.accepted(verdict.path[-1])
        t2 = time.perf_counter()
        n_drafted, n_accepted = len(tree) - 1, len(verdict.path) - 1
        if chooser is not None:
            chooser.record_verify(len(tree), t2 - t1)
        if chooser is not None and self.drafter.costly:
            chooser.record_draft(k if n_drafted else 0, t1 - t0)
        if n_drafted:
            if chooser is not None:
                chooser.record_acceptance(min(k, n_drafted), n_accepted)
            stats.record_sources(tree.sources[1:], [tree.sources[i] for i in verdict.path[1:]])
            stats.record_positions(int(tree_depths(tree.parents).max()), n_accepted)  # per depth
        stats.record_step(n_drafted, n_accepted, t1 - t0, t2 - t1)
        return kept

    def _within_leaves(self, tree: TokenTree) -> TokenTree:
        """The tree cut to the leaves the target can hold: a llama.cpp runner or pool gives each leaf a sequence
        id of its own (`max_tree_leaves`), and a wide tree keeps its leading nodes, its most likely chain first."""
        limit = getattr(self.target, "max_tree_leaves", None)
        if not limit:
            return tree
        n = nodes_within_leaves(tree.parents, limit)
        return tree if n == len(tree) else tree.first(n)

    def _emit(self, new: list[int], eos: frozenset[int], stats: Stats, max_tokens: int) -> tuple[list[int], bool]:
        """Cut the step's tokens at EOS, then at max_tokens; say whether the request is finished."""
        done = False
        eos_at = next((i for i, token in enumerate(new) if token in eos), None)
        if eos_at is not None:
            new, done = new[:eos_at], True
            stats.finish_reason = "stop"
        room = max_tokens - stats.generated
        if len(new) >= room:
            new, done = new[:room], True
            stats.finish_reason = "length" if eos_at is None or eos_at > room else stats.finish_reason
        stats.generated += len(new)
        return new, done

    def _chooser(self) -> DraftLengthChooser:
        cfg = self.config
        if self.drafter is None:
            return DraftLengthChooser(k_max=0, fixed=0)
        if cfg.draft_tokens is not None:
            return DraftLengthChooser(k_max=cfg.draft_tokens, fixed=cfg.draft_tokens)
        # While K = 0 nothing is drafted, so acceptance must be re-measured somehow. A costly drafter
        # would first have to catch up on every token it skipped: it is not probed again. A free one
        # is shadowed instead: its proposal is compared with the target's token at no verify cost.
        return DraftLengthChooser(k_max=cfg.draft_max, probe_every=None,
                                  cost_curve=getattr(self.target, "cost_curve", "one-pass"))

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise PromptError("the prompt is empty", "prompt")
        if len(prompt) + 1 > self.target.n_ctx:
            raise PromptError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.target.n_ctx}", "prompt"
            )

