"""Prompt-lookup / n-gram drafting: continue the latest earlier occurrence of the context's suffix.

Free to run, and strong when the output copies its input (edits, refactors, summaries). The
index maps each n-gram to where its most recent occurrence ended, and grows incrementally.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Draft, Drafter

_KEEP = 8


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, n_min: int = 2, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError("need 1 <= n_min <= n_max")
        self.n_min, self.n_max = n_min, n_max
        self._reset()

    def _reset(self) -> None:
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(self.n_min, self.n_max + 1)}
        # For trees: up to _KEEP earlier occurrences per n-gram, most recent last.
        self._history: dict[tuple[int, ...], list[int]] = {}
        self._indexed_to = 0
        self._context: list[int] = []

    def begin(self, prompt, params, rng) -> None:
        self._reset()

    def _extend(self, context: Sequence[int]) -> None:
        """Index every n-gram that ends before the last token (those have a continuation)."""
        if len(context) < self._indexed_to or list(context[: self._indexed_to]) != self._context[: self._indexed_to]:
            self._reset()
        self._context = list(context)
        for end in range(max(self._indexed_to, self.n_min), len(context)):
            for n, table in self._index.items():
                if end >= n:
                    key = tuple(context[end - n : end])
                    table[key] = end
                    if n == self.n_min:
                        ends = self._history.setdefault(key, [])
                        ends.append(end)
                        del ends[:-_KEEP]
        self._indexed_to = max(self._indexed_to, len(context))

    def propose(self, context: Sequence[int], k: int) -> Draft:
        if k <= 0:
            return Draft([], None, self.name)
        self._extend(context)
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(context) <= n:
                continue
            start = self._index[n].get(tuple(context[-n:]))
            if start is not None:
                return Draft(list(context[start : start + k]), None, self.name)
        return Draft([], None, self.name)

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        """Distinct continuations of the latest matches: the longest-n match first, then older ones."""
        first = self.propose(context, k).tokens
        branches = [first] if first else []
        if len(context) > self.n_min:
            for end in reversed(self._history.get(tuple(context[-self.n_min :]), [])):
                if len(branches) >= width:
                    break
                candidate = list(context[end : end + k])
                if candidate and all(candidate[:1] != b[:1] or candidate != b[: len(candidate)] for b in branches):
                    branches.append(candidate)
        return branches
