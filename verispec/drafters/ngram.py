"""Prompt-lookup / n-gram drafting: continue the latest earlier occurrence of the context's suffix.

Free to run, and strong when the output copies its input (edits, refactors, summaries). For each
n-gram the index keeps where its most recent occurrences ended. It follows the context as it
grows and, when a tree explores a hypothetical path or a draft is rejected, gives back exactly the
positions past the point where the new context departs from the old one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Candidates, Draft, Drafter

_KEEP = 8  # occurrences remembered per n-gram, most recent last


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, n_min: int = 2, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError("need 1 <= n_min <= n_max")
        self.n_min, self.n_max = n_min, n_max
        self._reset()

    def _reset(self) -> None:
        self._ends: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in range(self.n_min, self.n_max + 1)}
        self._context: list[int] = []

    def begin(self, prompt, params, rng, noise=None, processor=None) -> None:
        self._reset()

    def _sync(self, context: Sequence[int]) -> None:
        """Index `context`: forget what lies past the shared prefix with the last context, add the rest."""
        old = self._context
        common = 0
        limit = min(len(old), len(context))
        if limit and old[limit - 1] == context[limit - 1] and old[:limit] == list(context[:limit]):
            common = limit
        else:
            while common < limit and old[common] == context[common]:
                common += 1
        # An n-gram ending at `end` is indexed once its continuation context[end] exists.
        for end in range(len(old) - 1, max(common, self.n_min) - 1, -1):
            self._forget(old, end)
        self._context = list(context)
        for end in range(max(common, self.n_min), len(context)):
            self._remember(context, end)

    def _remember(self, context: Sequence[int], end: int) -> None:
        for n, table in self._ends.items():
            if end >= n:
                ends = table.setdefault(tuple(context[end - n : end]), [])
                ends.append(end)
                if len(ends) > _KEEP:
                    del ends[0]

    def _forget(self, context: Sequence[int], end: int) -> None:
        for n, table in self._ends.items():
            if end >= n:
                ends = table.get(tuple(context[end - n : end]))
                if ends and ends[-1] == end:
                    ends.pop()

    def _matches(self, context: Sequence[int], n: int) -> list[int]:
        """Where continuations of the context's last n tokens start, most recent first."""
        if len(context) <= n:
            return []
        return self._ends[n].get(tuple(context[-n:]), [])[::-1]

    def propose(self, context: Sequence[int], k: int) -> Draft:
        if k <= 0:
            return Draft([], None, self.name)
        self._sync(context)
        for n in range(self.n_max, self.n_min - 1, -1):
            starts = self._matches(context, n)
            if starts:
                return Draft(list(context[starts[0] : starts[0] + k]), None, self.name)
        return Draft([], None, self.name)

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        """Distinct continuations of the latest matches: the longest-n match first, then older ones."""
        first = self.propose(context, k).tokens
        branches = [first] if first else []
        for start in self._matches(context, self.n_min):
            if len(branches) >= width:
                break
            candidate = list(context[start : start + k])
            if candidate and all(candidate != b[: len(candidate)] for b in branches):
                branches.append(candidate)
        return branches

    def expand(self, context: Sequence[int], width: int) -> Candidates:
        """Next tokens seen after the context's suffix, scored by how long and how often they matched."""
        self._sync(context)
        scores: dict[int, float] = {}
        for n in range(self.n_min, self.n_max + 1):
            for rank, start in enumerate(self._matches(context, n)):
                token = context[start]
                scores[token] = scores.get(token, 0.0) + n / (1 + rank)
        if not scores:
            return Candidates([], np.empty(0), self.name)
        ranked = sorted(scores, key=scores.get, reverse=True)[:width]
        total = sum(scores.values())
        return Candidates(ranked, np.array([scores[t] / total for t in ranked]), self.name)
