"""Where a server's `auto` picks the drafter of each request: the one whose finished requests decoded fastest.

The candidates are drafter keys (the server's: "suffix", "model", "cascade"). What is measured per request is
what its drafting and verification cost and bought: generated tokens over the seconds of its draft passes, its
draft prefill and its verify passes (Stats). That folds acceptance, how often a drafter has a draft at all
(suffix lookup has none where the text is new), draft costs and verify costs into one number, measured on this
machine and this traffic. Each candidate is tried `warmup` times first, in turn; afterwards the fastest runs,
and every `explore_every`-th request goes to another candidate in turn, since the traffic drifts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..ema import ema
from ..engine import Stats

MIN_TOKENS = 8  # shorter requests say too little about a drafter


class AutoChoice:
    def __init__(self, candidates: Sequence[str], warmup: int = 2, explore_every: int = 8, weight: float = 0.3) -> None:
        if not candidates:
            raise ValueError("auto needs at least one candidate drafter")
        self.candidates = list(candidates)
        self.warmup, self.explore_every, self.weight = warmup, explore_every, weight
        self.rates: dict[str, float] = {}  # tokens per second of drafting and verification, a moving average
        self.tries: dict[str, int] = {}
        self._chosen = 0
        self._lock = threading.Lock()  # HTTP threads choose, the scheduler thread records

    def choose(self) -> str:
        with self._lock:
            self._chosen += 1
            for key in self.candidates:
                if self.tries.get(key, 0) < self.warmup:
                    self.tries[key] = self.tries.get(key, 0) + 1  # counted now: concurrent choices spread out
                    return key
            best = self.best()
            others = [key for key in self.candidates if key != best]
            if others and self._chosen % self.explore_every == 0:
                return others[(self._chosen // self.explore_every) % len(others)]
            return best

    def best(self) -> str:
        measured = [key for key in self.candidates if key in self.rates]
        return max(measured, key=self.rates.__getitem__) if measured else self.candidates[0]

    def record(self, key: str, stats: Stats) -> None:
        seconds = stats.draft_seconds + stats.draft_prefill_seconds + stats.verify_seconds
        if key not in self.candidates or stats.generated < MIN_TOKENS or seconds <= 0:
            return
        with self._lock:
            self.rates[key] = ema(self.rates.get(key), stats.generated / seconds, self.weight)
