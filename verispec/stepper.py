"""Many requests' steps at once: each request's draft -> verify -> accept coroutine (Engine.steps) runs
up to its next target pass, and the passes of all of them run together on one KV pool.

One call of `step()`:
1. every request that has not started runs up to its first pass (the prompt prefill; a draft model
   prefills its own copy of the prompt on the way);
2. the pool decodes: all requests' scoring rows (verification passes) fused in as few decodes as
   exactness allows (`pool.score`), then prompt rows of one prompt, the one with the least done:
   while other requests are decoding, one prompt pass (at most 63 rows on llama.cpp), else up to
   `prefill_chunk` rows (chunked prefill: a long prompt delays the others' next step by one pass,
   not by its whole prefill);
3. every request whose pass completed gets its logits and runs on: it verifies, accepts, rolls back,
   emits its tokens, and drafts its next step, up to its next pass.

Everything runs on the caller's thread: the server's scheduler thread (serve/scheduler.py), or a
test's. Engine.generate drives the same coroutine for a single request with no pool in between.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .engine import Forward, StepEvent

if TYPE_CHECKING:
    from .runners.pool import Pool


@dataclass
class Member:
    """One request in the stepper. `out` collects what it emitted since the caller last looked."""

    seq: int  # its sequence in the pool
    run: Generator[StepEvent, object, None]
    pending: Forward | None = None
    started: bool = False
    finished: bool = False
    error: BaseException | None = None
    out: list[int] = field(default_factory=list)
    prefill_done: int = 0  # prompt tokens in the pool (a shared cached prefix included)
    prefill_passes: list[int] | None = None  # the prompt's decodes still to run, rows each


class Stepper:
    def __init__(self, pool: Pool, prefill_chunk: int | None = None) -> None:
        self.pool = pool
        self.prefill_chunk = min(prefill_chunk or pool.n_batch, pool.n_batch)
        # A chunk is whole prompt passes; set before the first prefill, as the cached prefixes' boundaries follow it.
        pool.pass_rows = min(pool.pass_rows, self.prefill_chunk)
        self.members: dict[int, Member] = {}

    def add(self, seq: int, run: Generator[StepEvent, object, None]) -> Member:
        member = Member(seq, run)
        self.members[seq] = member
        return member

    def remove(self, seq: int) -> None:
        """Stop a request (finished, cancelled or failed): its coroutine is closed; the caller frees its cells."""
        member = self.members.pop(seq, None)
        if member is not None:
            member.run.close()

    def step(self) -> list[Member]:
        """One step of every request (see the module docstring); returns the members, to read `out`,
        `finished` and `error` from."""
        for member in self.members.values():
            if not member.started:
                member.started = True
                self._advance(member, None)
        scoring = [m for m in self.members.values() if m.pending is not None and m.pending.all_logits]
        prompts = [m for m in self.members.values() if m.pending is not None and not m.pending.all_logits]
        replies: list[tuple[Member, np.ndarray]] = []
        if scoring:
            replies += self._guard(scoring, lambda: list(zip(scoring, self.pool.score(
                [(m.seq, m.pending) for m in scoring]))))
        if prompts:
            member = min(prompts, key=lambda m: m.prefill_done)
            budget = self.pool.pass_rows if scoring else self.prefill_chunk  # decode rows first
            replies += self._guard([member], lambda: self._prefill_chunk(member, budget))
        for member, logits in replies:
            member.pending = None
            self._advance(member, logits)
        return list(self.members.values())

    def _guard(self, members: list[Member], decode) -> list[tuple[Member, np.ndarray]]:
        """Run a pool decode; a failure fails the requests it was for, and the others go on."""
        try:
            return decode()
        except Exception as exc:  # noqa: BLE001 - handed to the requests, the server keeps running
            for member in members:
                member.error, member.finished, member.pending = exc, True, None
            return []

    def _advance(self, member: Member, reply) -> None:
        """Run the request's coroutine up to its next pass, collecting what it emits."""
        try:
            event = next(member.run) if reply is None else member.run.send(reply)
            while not isinstance(event, Forward):
                member.out.extend(event)
                event = next(member.run)
            member.pending = event
            if not event.all_logits:
                member.prefill_done, member.prefill_passes = 0, None
        except StopIteration:
            member.finished = True
        except Exception as exc:  # noqa: BLE001 - the request fails, the others go on
            member.error, member.finished = exc, True

    def _prefill_chunk(self, member: Member, budget: int) -> list[tuple[Member, np.ndarray]]:
        """Up to `budget` rows of a prompt (at least one pass), after the cells of a cached prefix the pool lets
        it share (pool.adopt_prefix), in the passes the pool gives the rest (pool.prefill_passes). Returns
        the reply once the prompt is done."""
        pool, tokens = self.pool, member.pending.tokens
        if member.prefill_passes is None:
            member.prefill_done = pool.adopt_prefix(member.seq, tokens)
            # What a shared prefix leaves, in the passes the whole prompt has there (the llama.cpp pool shares
            # whole leading passes, so the tail's layout is the whole prompt's; see runners/llamacpp_pool.py).
            member.prefill_passes = pool.prefill_passes(len(tokens) - member.prefill_done)
        rows_this_step, logits = 0, None
        while member.prefill_passes and (rows_this_step == 0 or rows_this_step + member.prefill_passes[0] <= budget):
            size = member.prefill_passes.pop(0)
            start = member.prefill_done
            logits = pool.prefill_pass(member.seq, tokens[start : start + size], last=not member.prefill_passes)
            member.prefill_done += size
            rows_this_step += size
        if member.prefill_passes:
            return []
        pool.remember_prompt(member.seq, tokens)
        return [(member, logits)]
