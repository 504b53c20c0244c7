"""The reduced draft vocabulary (FR-Spec, EAGLE-3): heads score only the K most frequent tokens.

The target still verifies against its full vocabulary, so a token outside the draft vocabulary is
simply never proposed; nothing is lost but the chance to draft it.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100  # a label outside the draft vocabulary (or past a sequence's end): no loss


class DraftVocab:
    def __init__(self, ids: np.ndarray, n_vocab: int) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)  # reduced id -> full token id
        self.n_vocab = n_vocab
        self.to_reduced = np.full(n_vocab, -1, dtype=np.int64)  # full token id -> reduced id, -1 outside
        self.to_reduced[self.ids] = np.arange(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def most_frequent(cls, tokens: np.ndarray, n_vocab: int, size: int) -> "DraftVocab":
        """The `size` most frequent ids in `tokens` (fewer if fewer distinct tokens occur), ties by id."""
        counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=n_vocab)
        seen = np.flatnonzero(counts)
        order = seen[np.lexsort((seen, -counts[seen]))]
        return cls(order[:size], n_vocab)

    def labels(self, tokens: np.ndarray) -> np.ndarray:
        """Full ids -> reduced ids, IGNORE for tokens outside the draft vocabulary."""
        reduced = self.to_reduced[tokens]
        return np.where(reduced >= 0, reduced, IGNORE)

    def coverage(self, tokens: np.ndarray) -> float:
        return float((self.to_reduced[tokens] >= 0).mean()) if len(tokens) else 0.0
