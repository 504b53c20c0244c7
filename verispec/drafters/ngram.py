"""Prompt-lookup / n-gram drafting: continue the latest earlier occurrence of the context's suffix.

Free to run, and strong when the output copies its input (edits, refactors, summaries). The
index maps each n-gram to where its most recent occurrence ended, and grows incrementally.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Draft, Drafter


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, n_min: int = 2, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError("need 1 <= n_min <= n_max")
        self.n_min, self.n_max = n_min, n_max
        self._reset()

    def _reset(self) -> None:
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(self.n_min, self.n_max + 1)}
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
                    table[tuple(context[end - n : end])] = end
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
