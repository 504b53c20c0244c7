"""Many requests' steps at once: each request's draft -> verify -> accept coroutine (Engine.steps) runs
up to its next target pass, and the passes of all of them run together on one KV pool.

One call of `step()`:
1. every request that has not started runs up to its first pass (the prompt prefill; a draft model
   prefills its own copy of the prompt on the way);
2. every drafting request runs its draft model's passes, in rounds: each round, one pass of every request
   that needs one, together in one decode of the shared draft pool (`fused_last_rows`), until all
   have drafted (a draft's numerics do not change the output, so no exactness rule bounds the rows);
3. the pool decodes: all requests' scoring rows (verification passes) fused in as few decodes as
   exactness allows (`pool.score`), then prompt rows of one prompt, the one with the least done.
   While other requests are decoding, the prompt gets a budget of rows that takes about
   `prefill_share` times as long as their decodes just took (measured each step) for each prompt
   waiting, so one long prompt arriving raises their inter-token latency by about that share
   instead of stalling them for its whole prefill, and a burst of prompts still gets prefilled
   soon; with nobody decoding it gets up to `prefill_chunk` rows. The pool sizes the passes
   (`pool.prompt_pass`): on llama.cpp every budget gives the same bits (runners/llamacpp_pool.py);
   other pools keep one fixed layout, whatever the budget. A pool past exactness (`pool.mixes_prompts`,
   the server's --verify one-pass) takes the prompt rows, of as many prompts as the budget holds, into
   the scoring decode itself, as llama-server does;
4. every request whose pass completed gets its logits and runs on: it verifies, accepts, rolls back,
   emits its tokens, and runs on to its next pass (its next draft's first pass: step 2 of the next step).

A fused decode that fails (a pool out of cells, a failed llama_decode) is taken back and run again in halves,
down to the request it cannot run (`_isolated`): that request alone fails, and the others' rows get the same
bits in the smaller decodes (any packing of exact rows gives a row the same logits, runners/pool.py). A request
whose pass finds the pool out of cells does not fail: it is `starved`, its pass kept, and the scheduler frees
cells for it (by preemption) before it runs again.

Everything runs on the caller's thread: the server's scheduler thread (serve/scheduler.py), or a
test's. Engine.generate drives the same coroutine for a single request with no pool in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .ema import ema
from .engine import StepEvent
from .runners.passes import DraftPass, Forward
from .runners.pool import PoolFull, PromptPart, fused_last_rows

if TYPE_CHECKING:
    from .runners.pool import Pool, Preempted


@dataclass
class Member:
    """One request in the stepper. `out` collects what it emitted since the caller last looked."""

    seq: int  # its sequence in the pool
    run: Generator[StepEvent, object, None]
    pending: Forward | DraftPass | None = None
    started: bool = False
    finished: bool = False
    error: BaseException | None = None
    out: list[int] = field(default_factory=list)
    prefill_done: int | None = None  # prompt tokens in the pool (a shared cached prefix included); None: not begun
    paused: bool = False  # preempted: its cells are freed and it does not step until resumed
    starved: PoolFull | None = None  # its pass found no free cells: kept, to run once the scheduler makes room


# A waiting prompt's rows in a step may take about as long as the running requests' decodes in that step: their
# inter-token latency then at most about doubles while it is prefilled (issue 17: p95 <= 2x their p50 alone).
PREFILL_SHARE = 1.0


class Stepper:
    def __init__(self, pool: Pool, prefill_chunk: int | None = None, prefill_share: float = PREFILL_SHARE) -> None:
        self.pool = pool
        self.prefill_chunk = min(prefill_chunk or pool.n_batch, pool.n_batch)
        # A pool with a fixed prompt layout (a context per slot, torch) keeps it for every prompt: set once.
        pool.pass_rows = min(pool.pass_rows, self.prefill_chunk)
        self.prefill_share = prefill_share
        self.scoring_seconds: float | None = None  # EMA of a step's scoring decodes
        self.prompt_row_seconds: float | None = None  # EMA of a prompt pass's seconds per row
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

    def preempt(self, seq: int) -> Preempted:
        """Free a request's cells (the pool keeps what it needs to decode them again); it waits, its
        coroutine suspended at its pending pass, until `resume`."""
        member = self.members[seq]
        while isinstance(member.pending, DraftPass):  # its draft's passes assume the draft cells the caller frees next
            try:
                reply = member.pending.run()
            except Exception as exc:  # noqa: BLE001 - the request fails (the caller sees `error`), the others go on
                member.error, member.finished, member.pending = exc, True, None
                break
            member.pending = None
            self._advance(member, reply)
        saved = self.pool.preempt(seq)
        member.paused = True
        if saved.prompt_len is None:
            member.prefill_done = None  # its prompt is prefilled again from the start
        return saved

    def resume(self, seq: int, saved: Preempted) -> None:
        """Decode a preempted request's cells again (the caller has reserved them); it steps on as if it had never left."""
        self.pool.resume(seq, saved)
        self.members[seq].paused = False

    def step(self) -> list[Member]:
        """One step of every request not preempted (see the module docstring); returns the members, to read
        `out`, `finished` and `error` from."""
        active = [m for m in self.members.values() if not m.paused]
        for member in active:
            member.starved = None  # the caller has read it (and made room) since the last step
            if not member.started:
                member.started = True
                self._advance(member, None)
        self._draft(active)
        scoring = [m for m in active if isinstance(m.pending, Forward) and m.pending.all_logits]
        prompts = [m for m in active if isinstance(m.pending, Forward) and not m.pending.all_logits]
        replies: list[tuple[Member, np.ndarray]] = []
        if self.pool.mixes_prompts:
            if scoring or prompts:
                replies += self._isolated(scoring + prompts, self._target_mark, self._mixed_decode)
        else:
            if scoring:
                t0 = time.perf_counter()
                replies += self._isolated(scoring, self._target_mark, self._score)
                self.scoring_seconds = ema(self.scoring_seconds, time.perf_counter() - t0, 0.3)
            if prompts:
                member = min(prompts, key=lambda m: m.prefill_done or 0)
                budget = self._prompt_budget(len(prompts)) if scoring else self.prefill_chunk  # decode rows first
                replies += self._isolated([member], self._target_mark, lambda ms: self._prefill_chunk(ms[0], budget))
        for member, logits in replies:
            member.pending = None
            self._advance(member, logits)
        return list(self.members.values())

    def _draft(self, active: list[Member]) -> None:
        """Run every drafting request's draft-model passes, in rounds: each round, the passes of all requests that
        need one go together (`fused_last_rows`: one decode of the shared draft pool), until every request
        has drafted and waits for its target pass."""
        while True:
            drafting = [m for m in active if isinstance(m.pending, DraftPass) and not m.starved]
            if not drafting:
                return
            replies = self._isolated(drafting, self._draft_mark,
                                     lambda ms: list(zip(ms, fused_last_rows([m.pending for m in ms]))))
            for member, logits in replies:
                member.pending = None
                self._advance(member, logits)

    def _score(self, members: list[Member]) -> list[tuple[Member, np.ndarray]]:
        return list(zip(members, self.pool.score([(m.seq, m.pending) for m in members])))

    def _isolated(self, members: list[Member], mark: Callable[[Member], Callable[[], None]],
                  decode: Callable[[list[Member]], list[tuple[Member, np.ndarray]]]) -> list[tuple[Member, np.ndarray]]:
        """Run a fused decode for `members`. If it fails, what it wrote is taken back (`mark` gives each member's undo,
        taken before) and each half runs apart, down to the request that cannot run: out of cells, it is starved
        (its pass kept); otherwise it fails with the decode's error. The others go on."""
        undo = [mark(m) for m in members]
        try:
            return decode(members)
        except Exception as exc:  # noqa: BLE001 - isolated to the request it comes from; the server keeps running
            for take_back in undo:
                take_back()
            if len(members) > 1:
                half = len(members) // 2
                return self._isolated(members[:half], mark, decode) + self._isolated(members[half:], mark, decode)
            member = members[0]
            if isinstance(exc, PoolFull):
                member.starved = exc
            else:
                member.error, member.finished, member.pending = exc, True, None
            return []

    def _target_mark(self, member: Member) -> Callable[[], None]:
        """Undo a target decode for the member: its cells back to what they hold now, its prompt progress too."""
        live, done = self.pool.live[member.seq], member.prefill_done

        def undo() -> None:
            self.pool.drop(member.seq, live)
            member.prefill_done = done
        return undo

    @staticmethod
    def _draft_mark(member: Member) -> Callable[[], None]:
        """Undo a draft decode for the member: its draft model's cells back to what they hold now."""
        runner = member.pending.runner
        n_past = runner.n_past
        return lambda: runner.rollback(n_past)

    def _advance(self, member: Member, reply) -> None:
        """Run the request's coroutine up to its next pass, collecting what it emits."""
        try:
            event = next(member.run) if reply is None else member.run.send(reply)
            while isinstance(event, list):
                member.out.extend(event)
                event = next(member.run)
            member.pending = event
            if isinstance(event, Forward) and not event.all_logits:
                member.prefill_done = None
        except StopIteration:
            member.finished = True
        except Exception as exc:  # noqa: BLE001 - the request fails, the others go on
            member.error, member.finished = exc, True

    def _mixed_decode(self, members: list[Member]) -> list[tuple[Member, np.ndarray]]:
        """Scoring rows and prompt rows in one decode (a pool past exactness, pool.mixes_prompts), as llama-server
        mixes them: prompts least done first, up to the budget. The prompt rows' cost is measured as what they
        add to the scoring rows' decode."""
        scoring = [m for m in members if m.pending.all_logits]
        prompts = [m for m in members if not m.pending.all_logits]
        budget = self._prompt_budget(len(prompts)) if scoring else self.prefill_chunk
        parts: list[tuple[Member, PromptPart]] = []
        for member in sorted(prompts, key=lambda m: m.prefill_done or 0):
            if budget <= 0:
                break
            tokens = member.pending.tokens
            if member.prefill_done is None:
                member.prefill_done = self.pool.adopt_prefix(member.seq, tokens)
            start = member.prefill_done
            end = min(len(tokens), start + budget, start + self.pool.n_batch)
            parts.append((member, PromptPart(member.seq, tokens[start:end], last=end == len(tokens))))
            member.prefill_done, budget = end, budget - (end - start)
        if not scoring and not parts:
            return []
        t0 = time.perf_counter()
        outs = self.pool.score([(m.seq, m.pending) for m in scoring], [part for _, part in parts])
        elapsed, prompt_rows = time.perf_counter() - t0, sum(len(part.tokens) for _, part in parts)
        if not parts:
            self.scoring_seconds = ema(self.scoring_seconds, elapsed, 0.3)
        elif scoring and self.scoring_seconds is not None:
            added = max(elapsed - self.scoring_seconds, 0.05 * elapsed)
            self.prompt_row_seconds = ema(self.prompt_row_seconds, added / prompt_rows, 0.3)
        elif not scoring:
            self.prompt_row_seconds = ema(self.prompt_row_seconds, elapsed / prompt_rows, 0.3)
        replies = list(zip(scoring, outs))
        for member, part in parts:
            if part.last:
                self.pool.remember_prompt(member.seq, member.pending.tokens)
                replies.append((member, part.logits))
        return replies

    def _prompt_budget(self, waiting: int) -> int:
        """Prompt rows that take about `prefill_share` of the step's scoring decodes for each of the `waiting`
        prompts, at most `prefill_chunk` (the pool's least before anything is measured). Per waiting prompt:
        a step then gives every request, decoding or waiting for its first token, about the same progress,
        so one long prompt arriving barely slows the streams, and a burst of prompts is prefilled sooner."""
        if self.scoring_seconds is None or self.prompt_row_seconds is None:
            return 1
        rows = self.prefill_share * waiting * self.scoring_seconds / self.prompt_row_seconds
        return max(1, min(self.prefill_chunk, int(rows)))

    def _prefill_chunk(self, member: Member, budget: int) -> list[tuple[Member, np.ndarray]]:
        """About `budget` rows of a prompt (at least one pass), after the cells of a cached prefix the pool lets
        it share (pool.adopt_prefix), in the passes the pool sizes (pool.prompt_pass). Returns the reply once
        the prompt is done."""
        pool, tokens = self.pool, member.pending.tokens
        if member.prefill_done is None:
            member.prefill_done = pool.adopt_prefix(member.seq, tokens)
        rows_this_step, logits = 0, None
        while member.prefill_done < len(tokens) and (rows_this_step == 0 or rows_this_step < budget):
            start = member.prefill_done
            size = pool.prompt_pass(start, len(tokens), budget - rows_this_step)
            last = start + size == len(tokens)
            t0 = time.perf_counter()
            logits = pool.prefill_pass(member.seq, tokens[start : start + size], last=last)
            self.prompt_row_seconds = ema(self.prompt_row_seconds, (time.perf_counter() - t0) / size, 0.3)
            member.prefill_done += size
            rows_this_step += size
        if member.prefill_done < len(tokens):
            return []
        pool.remember_prompt(member.seq, tokens)
        return [(member, logits)]
