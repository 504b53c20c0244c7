"""Which finished requests' prompt prefixes the KV pool still holds, for later requests that start the same way.

Bookkeeping only: the pool (llamacpp_pool.py) owns the cells and does the llama.cpp work. Each entry is a
sequence id of the pool whose cells hold `tokens` at positions 0..len-1; a request whose prompt
starts with (part of) those tokens shares the cells instead of prefilling them again. Entries are
kept least recently used first: the pool evicts from the front when it runs out of entry ids, and
keeps the most recently used ones that fit when it compacts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class CachedPrefix:
    seq: int  # the pool sequence that holds the cells
    tokens: np.ndarray  # int32, the prefix's tokens from position 0


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    def __init__(self, seqs: Iterable[int]) -> None:
        self._free = sorted(seqs)
        self.capacity = len(self._free)
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()  # by seq, least recently used first
        self.lookups = 0
        self.hits = 0
        self.tokens_saved = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def most_recent_first(self) -> list[CachedPrefix]:
        return list(reversed(self._entries.values()))

    def cached_tokens(self) -> int:
        return sum(len(e.tokens) for e in self._entries.values())

    def match(self, tokens: np.ndarray) -> tuple[CachedPrefix | None, int]:
        """The entry sharing the longest prefix with `tokens`, and the length shared (0: none)."""
        best, length = None, 0
        for entry in self._entries.values():
            n = common_prefix(entry.tokens, tokens)
            if n > length:
                best, length = entry, n
        return best, length

    def record_lookup(self, entry: CachedPrefix | None, reused: int) -> None:
        self.lookups += 1
        if entry is not None and reused > 0:
            self.hits += 1
            self.tokens_saved += reused
            self._entries.move_to_end(entry.seq)

    def plan_store(self, tokens: np.ndarray) -> tuple[bool, list[CachedPrefix]]:
        """Whether `tokens` is worth a new entry, and the entries it makes redundant (prefixes of it).

        An entry that already starts with `tokens` covers it: it is marked used and nothing is stored."""
        redundant = []
        for entry in self._entries.values():
            n = common_prefix(entry.tokens, tokens)
            if n == len(tokens):
                self._entries.move_to_end(entry.seq)
                return False, []
            if n == len(entry.tokens):
                redundant.append(entry)
        return self.capacity > 0, redundant

    def add(self, tokens: np.ndarray) -> tuple[CachedPrefix, CachedPrefix | None]:
        """A new most recently used entry, and the least recently used one it pushed out (None if there was room).

        The caller moves the pushed-out entry's cells away before it gives the new entry any."""
        evicted = None
        if not self._free:
            evicted = self._entries[next(iter(self._entries))]
            self.remove(evicted)
            self.evictions += 1
        entry = CachedPrefix(self._free.pop(0), np.asarray(tokens, dtype=np.int32))
        self._entries[entry.seq] = entry
        return entry, evicted

    def remove(self, entry: CachedPrefix) -> None:
        del self._entries[entry.seq]
        self._free.append(entry.seq)
        self._free.sort()

    def keep_only(self, kept: Sequence[CachedPrefix]) -> None:
        """After a compaction: only `kept` survived (in least recently used order as before)."""
        keep = {e.seq for e in kept}
        for entry in list(self._entries.values()):
            if entry.seq not in keep:
                self.remove(entry)
                self.evictions += 1
