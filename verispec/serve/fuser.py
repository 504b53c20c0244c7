"""Fused verification: the target passes of all active requests in as few pool decodes as exactness allows.

Each request runs its engine in its own thread; its SeqRunner.forward() hands the rows to the
fuser and blocks. Once every attached request is blocked here (a barrier: their drafting and
verification in Python are done), `tick()` decodes everything pending:

- scoring rows (verification passes, all logits) of all requests are packed into decodes of at
  most `fuse_rows` rows; by default the pool's `default_fuse_rows`, the most that keeps a
  request's logits bit-identical to its solo run however its rows are packed with other
  requests' rows. On llama.cpp (KvPool) that is 3: ggml's CPU matmul is row-independent only
  below 4 rows (4+ rows take another kernel path whose logits differ by up to ~0.5;
  tests/test_scheduler_pool.py checks the 3). A larger `fuse_rows` there is faster per row but
  not batch-invariant: greedy output may then differ from a solo run at near-ties. The torch
  pool (paged.py) pads every decode to a multiple of 4 rows, where torch's matmul is
  row-independent, so its default is n_batch: all of a tick's rows in one decode, each request's
  logits bit-identical to its rows decoded alone on the pool (tests/test_paged_pool.py; a solo
  TorchRunner, which does not pad, differs from both by float rounding).
- a prefill (one logits row) runs alone, one `prefill_chunk` of one prompt (the least advanced) per tick:
  chunked prefill, so a long prompt delays the others' next step by one chunk, not by its whole
  prefill, and requests arriving together get their first tokens one after another. A chunk (by
  default the pool's n_batch, 512) is whole passes of the prompt's layout (`pool.prefill_passes`:
  at most 63 rows on llama.cpp, where 64+ rows take an attention kernel whose sums depend on the
  cell layout), after the cells of a cached prefix the pool lets it share (`pool.adopt_prefix`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .pool import KvPool, chunk_sizes

if TYPE_CHECKING:
    from .paged import PagedPool


@dataclass
class _Work:
    seq: int
    tokens: list[int]
    all_logits: bool
    done: int = 0  # tokens decoded so far (a prompt's shared cached prefix included)
    passes: list[int] | None = None  # a prompt's decodes still to run, rows each
    out: np.ndarray | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class Fuser:
    def __init__(self, pool: KvPool | PagedPool, fuse_rows: int | None = None,
                 prefill_chunk: int | None = None) -> None:
        fuse_rows = pool.default_fuse_rows if fuse_rows is None else fuse_rows
        if fuse_rows < 1:
            raise ValueError(f"fuse_rows must be >= 1, got {fuse_rows}")
        self.pool = pool
        self.fuse_rows = min(fuse_rows, pool.n_batch)
        self.prefill_chunk = min(prefill_chunk or pool.n_batch, pool.n_batch)
        # A chunk is whole prompt passes; set before the first prefill, as the cached prefixes' boundaries follow it.
        pool.pass_rows = min(pool.pass_rows, self.prefill_chunk)
        self._cond = threading.Condition()
        self._pending: dict[int, _Work] = {}
        self._attached: set[int] = set()
        self._closed = False
        self.pass_seconds: dict[int, float] = {}  # EMA of one scoring decode's time, by rows
        self.rows_per_decode: list[int] = []  # scoring decodes since the last take_rows() (for metrics)

    # -- request threads ---------------------------------------------------------------------------

    def attach(self, seq: int) -> None:
        """A request thread starts working on `seq`: ticks wait for it."""
        with self._cond:
            self._attached.add(seq)

    def detach(self, seq: int) -> None:
        with self._cond:
            self._attached.discard(seq)
            self._cond.notify_all()

    def run(self, seq: int, tokens: list[int], all_logits: bool) -> np.ndarray:
        """Called by SeqRunner.forward from the request's thread; returns when the rows are decoded."""
        work = _Work(seq, tokens, all_logits)
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._pending[seq] = work
            self._cond.notify_all()
        work.finished.wait()
        if work.error is not None:
            raise work.error
        return work.out

    # -- the scheduler thread ----------------------------------------------------------------------

    def tick(self, timeout: float = 0.05) -> bool:
        """Wait (up to `timeout`) until every attached request is blocked here, then decode. True if it decoded."""
        with self._cond:
            ready = self._cond.wait_for(lambda: self._closed or (self._pending and self._all_blocked()), timeout)
            if not ready or self._closed:
                return False
            works = list(self._pending.values())
        scoring = [w for w in works if w.all_logits]
        # One prompt chunk per tick, for the prompt with the fewest chunks done (then the oldest): a short
        # prompt is not stuck behind a long one, and prompts that arrive together finish one by one.
        prefills = sorted((w for w in works if not w.all_logits), key=lambda w: w.done)[:1]
        with self.pool.lock:
            self._guard(scoring, self._score)
            for work in prefills:
                self._guard([work], self._prefill_chunk)
        with self._cond:
            for work in scoring + prefills:
                if work.done == len(work.tokens) or work.error is not None:
                    del self._pending[work.seq]
                    work.finished.set()  # only now: the request may submit its next work at once
        return True

    def _all_blocked(self) -> bool:
        return self._attached <= self._pending.keys()

    def _guard(self, works: list[_Work], fn) -> None:
        try:
            fn(works)
        except BaseException as exc:  # hand the error to the requests; the server keeps running
            for work in works:
                work.error = exc

    def _score(self, works: list[_Work]) -> None:
        rows = [(w, i) for w in works for i in range(len(w.tokens))]
        for w in works:
            w.out = np.empty((len(w.tokens), self.pool.n_vocab), dtype=np.float32)
        start = 0
        for size in chunk_sizes(len(rows), self.fuse_rows):
            part = rows[start : start + size]
            start += size
            t0 = time.perf_counter()
            logits = self.pool.decode([w.seq for w, _ in part], [w.tokens[i] for w, i in part], [True] * len(part))
            for j, (w, i) in enumerate(part):
                w.out[i] = logits[j]
            self._record(len(part), time.perf_counter() - t0)
        for w in works:
            w.done = len(w.tokens)

    def _prefill_chunk(self, works: list[_Work]) -> None:
        """Up to `prefill_chunk` rows of a prompt, in the passes its length gives it (pool.prefill_passes),
        after the cells a cached prefix already holds (which are whole leading passes)."""
        (w,) = works
        if w.passes is None:
            w.done = self.pool.adopt_prefix(w.seq, w.tokens)
            passes, skipped = self.pool.prefill_passes(len(w.tokens)), 0
            while skipped < w.done:
                skipped += passes.pop(0)
            w.passes = passes
        rows_this_tick = 0
        while w.passes and (rows_this_tick == 0 or rows_this_tick + w.passes[0] <= self.prefill_chunk):
            size = w.passes.pop(0)
            rows = w.tokens[w.done : w.done + size]
            logits = self.pool.decode([w.seq] * size, rows, [False] * (size - 1) + [not w.passes])
            w.done += size
            rows_this_tick += size
        if not w.passes:
            w.out = logits.copy()
            self.pool.remember_prompt(w.seq, w.tokens)

    def _record(self, rows: int, seconds: float) -> None:
        old = self.pass_seconds.get(rows)
        self.pass_seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds
        self.rows_per_decode.append(rows)

    def take_rows(self) -> list[int]:
        rows, self.rows_per_decode = self.rows_per_decode, []
        return rows

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for work in self._pending.values():
                work.error = RuntimeError("the server is shutting down")
                work.finished.set()
            self._pending.clear()
            self._cond.notify_all()
