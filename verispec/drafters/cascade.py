"""A cascade of drafters: the cheapest level proposes first, the next one drafts where it runs out.

`cascade:ngram,qwen2.5-coder-0.5b` makes a three-stage pipeline target <- draft model <- n-gram:
n-gram lookup proposes a continuation for free; the draft model then continues after it. The model
catches up on the n-gram tokens in one batched draft pass instead of one pass per token, so when
the n-grams hit, the model's own drafting is sped up by them as well. Every token remembers which
level proposed it, and the engine's stats count acceptance per level.

With several candidate branches wanted (prefix mode, trees), the levels' proposals are put side
by side instead, and the target keeps the longest valid one.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np

from ..runners.passes import DraftPass
from ..sampling import SamplingParams
from .base import Candidates, Draft, Drafter, run_passes


class CascadeDrafter(Drafter):
    def __init__(self, levels: Sequence[Drafter], n_vocab: int, max_tokens: int = 32) -> None:
        if len(levels) < 2:
            raise ValueError("a cascade needs at least two drafters")
        self.levels = list(levels)
        self.name = "cascade:" + ",".join(level.name for level in self.levels)
        self.costly = any(level.costly for level in self.levels)
        self.params = SamplingParams()
        # Draft distributions for the chain: one-hot rows for deterministic levels, q rows for sampled ones.
        self._q = np.zeros((max_tokens, n_vocab), dtype=np.float64)

    def begin(self, prompt, params: SamplingParams, rng: np.random.Generator, noise=None, processor=None) -> None:
        self.params = params
        for level in self.levels:
            level.begin(prompt, params, rng, noise, processor)

    def prefill(self, prompt: Sequence[int]) -> None:
        for level in self.levels:
            level.prefill(prompt)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        return run_passes(self.propose_steps(context, k))

    def propose_steps(self, context: Sequence[int], k: int) -> Generator[DraftPass, np.ndarray, Draft]:
        """Each level continues after the levels before it; a model level's passes are yielded (a server fuses
        them with other requests' draft passes)."""
        tokens: list[int] = []
        sources: list[str] = []
        parts: list[Draft] = []
        for level in self.levels:
            if len(tokens) >= k:
                break
            part = yield from level.propose_steps(list(context) + tokens, k - len(tokens))
            parts.append(part)
            tokens += part.tokens
            sources += [part.source or level.name] * len(part.tokens)
        return Draft(tokens, self._probs(parts, len(tokens)), self.name, sources)

    def _probs(self, parts: list[Draft], n: int) -> np.ndarray | None:
        """Stack the levels' draft distributions; deterministic tokens get one-hot rows."""
        if self.params.greedy or n == 0:
            return None
        if n > self._q.shape[0]:
            self._q = np.zeros((n, self._q.shape[1]), dtype=np.float64)
        row = 0
        for part in parts:
            m = len(part.tokens)
            if part.probs is not None:
                self._q[row : row + m] = part.probs[:m]
            else:
                self._q[row : row + m] = 0.0
                self._q[np.arange(row, row + m), part.tokens] = 1.0
            row += m
        return self._q[:n]

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        return run_passes(self.branch_steps(context, k, width))[0]

    def branch_steps(self, context: Sequence[int], k: int, width: int) -> Generator[DraftPass, np.ndarray,
                                                                                      tuple[list[list[int]], list[str]]]:
        """Each level's own proposals side by side (the cheapest first), for prefix and tree verification."""
        branches: list[list[int]] = []
        sources: list[str] = []
        for level in self.levels:
            level_branches, _ = yield from level.branch_steps(context, k, width)
            for branch in level_branches:
                if branch and branch not in branches:
                    branches.append(branch)
                    sources.append(level.name)
        return branches, sources

    def expand(self, context: Sequence[int], width: int) -> Candidates:
        return run_passes(self.expand_steps(context, width))

    def expand_steps(self, context: Sequence[int], width: int) -> Generator[DraftPass, np.ndarray, Candidates]:
        """The first level with candidates answers; deeper (costlier) levels only when it has none."""
        for level in self.levels:
            candidates = yield from level.expand_steps(context, width)
            if candidates.tokens:
                return candidates
        return Candidates([], np.empty(0), self.name)

    def accepted(self, row: int) -> None:
        for level in self.levels:
            level.accepted(row)

    def finish(self, context: Sequence[int]) -> None:
        for level in self.levels:
            level.finish(context)

    def close(self) -> None:
        for level in self.levels:
            level.close()
