"""A token history that finds where a context's recent suffix occurred before, and what followed it there.

The history is one numpy buffer of documents (a request's context, or finished requests' outputs), each
closed by SEP. For every n-gram of KEY_LENGTHS tokens the index keeps where its occurrences end (absolute
positions, oldest first, the latest KEEP), under a 64-bit hash. A lookup takes the occurrences of the
context's last 8 tokens (else its last 2), extends each one backwards, vectorised, up to MAX_PATTERN tokens,
and keeps those of the longest match. Stacked, their continuations form a trie whose node counts are the
empirical frequency of each continuation (SuffixDecoding, Oliaro et al., NeurIPS 2025, keeps the same
counts in a suffix tree). A hash collision only costs a candidate: every candidate is compared token by token.

Positions are absolute, so that evicting the oldest documents (global history) or cutting the open
document's tail (a request's context after a rejected hypothetical path) only drops list entries at one
end of each list: the oldest at the front, the newest at the back.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SEP = -1  # closes a document; never a token
KEY_LENGTHS = (2, 8)  # n-grams indexed; a lookup tries the longest first
MAX_PATTERN = 32  # the longest suffix matched
CANDIDATES = 256  # latest occurrences of an n-gram compared with the pattern
MAX_OCCURRENCES = 64  # latest occurrences of the longest match whose continuations are counted
KEEP = 2048  # occurrences remembered per n-gram (the oldest are dropped in halves past 2 x KEEP)
# Estimated Python heap per list entry (pointer + int object) and per distinct n-gram (dict slot, key, list);
# measured with tracemalloc in tests/test_suffix.py.
POSITION_BYTES = 40
KEY_BYTES = 160
_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram of `tokens`, indexed by where it starts."""
    count = len(tokens) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    wide = tokens.astype(np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    for i in range(n):
        h = h * _MULT + wide[i : i + count]
    return h


@dataclass
class Match:
    length: int  # tokens of the context's suffix matched (<= MAX_PATTERN)
    ends: np.ndarray  # buffer indices where the matched occurrences end, latest first


class SuffixIndex:
    """Documents of tokens and where each n-gram of KEY_LENGTHS ended. Not thread-safe (see SuffixStore)."""

    def __init__(self) -> None:
        self._buf = np.full(1024, SEP, dtype=np.int32)
        self._base = 0  # absolute position of _buf[0]
        self._size = 0  # buffer entries in use
        self._docs: deque[tuple[int, int]] = deque()  # (start, end) absolute; closed documents have SEP at end
        self._open = False  # the last document still grows (a request's context)
        self._ends: dict[int, dict[int, list[int]]] = {n: {} for n in KEY_LENGTHS}
        self.positions = 0  # list entries over all n-grams

    # -- size -------------------------------------------------------------------------------------

    @property
    def documents(self) -> int:
        return len(self._docs)

    @property
    def tokens(self) -> int:
        return sum(end - start for start, end in self._docs)

    @property
    def nbytes(self) -> int:
        keys = sum(len(table) for table in self._ends.values())
        return self._buf.nbytes + POSITION_BYTES * self.positions + KEY_BYTES * keys

    def document(self, i: int) -> np.ndarray:
        start, end = self._docs[i]
        return self._buf[start - self._base : end - self._base].copy()

    # -- writing ----------------------------------------------------------------------------------

    def add_document(self, tokens: Sequence[int]) -> None:
        """A finished document: every n-gram followed by a token of its own is indexed."""
        self._close()
        start = self._append(tokens)
        self._append([SEP])
        self._docs.append((start, start + len(tokens)))
        self._index(start, start, start + len(tokens))

    def extend(self, tokens: Sequence[int]) -> None:
        """Grow the open document (a request's context); n-grams whose continuation now exists are indexed."""
        if not self._open:
            self._open = True
            self._docs.append((self._base + self._size, self._base + self._size))
        start, end = self._docs[-1]
        self._append(tokens)
        self._docs[-1] = (start, end + len(tokens))
        self._index(start, end - 1, end + len(tokens))

    def open_length(self) -> int:
        if not self._open:
            return 0
        start, end = self._docs[-1]
        return end - start

    def truncate(self, length: int) -> None:
        """Cut the open document to its first `length` tokens."""
        if not self._open:
            return
        start, end = self._docs[-1]
        cut = start + length
        if cut >= end:
            return
        for n, table in self._ends.items():
            lo = max(start, cut - n)  # the n-grams that end at cut - 1 or later lose their continuation
            hashes = ngram_hashes(self._window(lo, end - 1), n).tolist()
            for i in range(len(hashes) - 1, -1, -1):
                ends = table.get(hashes[i])
                if ends and ends[-1] == lo + i + n - 1:
                    ends.pop()
                    self.positions -= 1
                    if not ends:
                        del table[hashes[i]]
        self._size = cut - self._base
        self._buf[self._size : self._size + (end - cut)] = SEP
        self._docs[-1] = (start, cut)

    def evict_oldest(self) -> int:
        """Forget the oldest document; returns its length."""
        start, end = self._docs.popleft()
        for n, table in self._ends.items():
            for key in set(ngram_hashes(self._window(start, end), n).tolist()):
                ends = table.get(key)
                if not ends:
                    continue
                cut = bisect_left(ends, end)
                del ends[:cut]
                self.positions -= cut
                if not ends:
                    del table[key]
        if not self._docs:
            self._base, self._size, self._open = self._base + self._size, 0, False
        elif self._docs[0][0] - self._base > self._size // 2:
            self._compact(self._docs[0][0] - 1)  # keep the SEP before the first document
        return end - start

    def _close(self) -> None:
        if self._open:
            self._append([SEP])
            self._open = False

    def _append(self, tokens: Sequence[int]) -> int:
        n = len(tokens)
        if self._size + n > len(self._buf):
            grown = np.full(max(2 * len(self._buf), self._size + n), SEP, dtype=np.int32)
            grown[: self._size] = self._buf[: self._size]
            self._buf = grown
        self._buf[self._size : self._size + n] = tokens
        self._size += n
        return self._base + self._size - n

    def _compact(self, keep_from: int) -> None:
        live = self._buf[keep_from - self._base : self._size]
        self._buf = np.full(max(1024, 2 * len(live)), SEP, dtype=np.int32)
        self._buf[: len(live)] = live
        self._base, self._size = keep_from, len(live)

    def _window(self, start: int, end: int) -> np.ndarray:
        return self._buf[start - self._base : max(start, end) - self._base]

    def _index(self, doc_start: int, first: int, stop: int) -> None:
        """Index the n-grams of the document from `doc_start` that end at `first` .. stop - 2 (a token follows)."""
        for n, table in self._ends.items():
            lo = max(doc_start, first - n + 1)
            hashes = ngram_hashes(self._window(lo, stop - 1), n).tolist()
            first_end = lo + n - 1
            for i, key in enumerate(hashes):
                ends = table.get(key)
                if ends is None:
                    table[key] = [first_end + i]
                else:
                    ends.append(first_end + i)
                    if len(ends) > 2 * KEEP:
                        del ends[:KEEP]
                        self.positions -= KEEP
            self.positions += len(hashes)

    # -- reading ----------------------------------------------------------------------------------

    def match(self, pattern: np.ndarray) -> Match | None:
        """The latest occurrences of the longest suffix of `pattern` (MAX_PATTERN tokens at most) seen before."""
        pattern = pattern[-MAX_PATTERN:]
        for n in sorted(KEY_LENGTHS, reverse=True):
            if len(pattern) < n:
                continue
            ends = self._ends[n].get(int(ngram_hashes(pattern[-n:], n)[0]))
            if not ends:
                continue
            candidates = np.array(ends[-CANDIDATES:], dtype=np.int64) - self._base
            lengths = self._matched_lengths(candidates, pattern)
            best = int(lengths.max())
            if best >= n:
                return Match(best, candidates[lengths == best][::-1][:MAX_OCCURRENCES])
        return None

    def _matched_lengths(self, ends: np.ndarray, pattern: np.ndarray) -> np.ndarray:
        """How many tokens before each end (inclusive) equal the pattern's tail."""
        m = len(pattern)
        at = ends[:, None] - np.arange(m)[None, :]
        window = np.where(at >= 0, self._buf[np.maximum(at, 0)], SEP)
        equal = window == pattern[::-1][None, :]
        return np.where(equal.all(axis=1), m, equal.argmin(axis=1))

    def continuations(self, ends: np.ndarray, depth: int) -> np.ndarray:
        """(len(ends), depth): the tokens after each end, SEP past the end of its document."""
        at = ends[:, None] + 1 + np.arange(depth)[None, :]
        rows = np.where(at < self._size, self._buf[np.minimum(at, self._size - 1)], SEP)
        rows[np.logical_or.accumulate(rows == SEP, axis=1)] = SEP
        return rows


@dataclass
class Trie:
    """Continuations merged into a trie. Node 0 is the root (the matched context); parents precede children."""

    tokens: np.ndarray
    parents: np.ndarray
    counts: np.ndarray  # occurrences through each node; counts[0] = all of them
    depths: np.ndarray  # the root is at depth 0


def continuation_trie(rows: np.ndarray) -> Trie:
    """The trie of the rows (SEP-padded continuations), vectorised: sort the rows, and a node starts wherever
    a row's prefix up to that depth differs from the row above it."""
    n, depth = rows.shape
    root = (np.array([SEP]), np.array([-1]), np.array([n]), np.array([0]))
    if n == 0 or depth == 0:
        return Trie(*root)
    s = rows[np.lexsort(rows.T[::-1])]
    same = np.zeros((n, depth), dtype=bool)
    same[1:] = np.logical_and.accumulate(s[1:] == s[:-1], axis=1)
    boundary = ~same
    row = np.arange(n)[:, None]
    group = np.maximum.accumulate(np.where(boundary, row, 0), axis=0)  # first row of each row's node, per depth
    following = np.minimum.accumulate(np.where(boundary, row, n)[::-1], axis=0)[::-1]
    size = np.vstack([following[1:], np.full((1, depth), n)]) - row  # rows in the node that starts at a row
    node_r, node_d = np.nonzero(boundary & (s != SEP))
    ids = np.full((n, depth), -1)
    ids[node_r, node_d] = np.arange(1, len(node_r) + 1)
    parents = np.where(node_d == 0, 0, ids[group[node_r, np.maximum(node_d - 1, 0)], np.maximum(node_d - 1, 0)])
    return Trie(np.concatenate([root[0], s[node_r, node_d]]), np.concatenate([root[1], parents]),
                np.concatenate([root[2], size[node_r, node_d]]), np.concatenate([root[3], node_d + 1]))
