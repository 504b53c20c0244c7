"""Where requests wait, get a sequence, step together and leave: the server's one scheduler thread.

Every model pass of the server runs on this thread: admission, prompt prefill chunks, draft-model
passes, the fused verification decode, and emission to the asyncio side. No thread per request,
no barrier, no polling. Each request is a `Sequence` whose engine steps (Engine.steps, the same
code as `verispec generate`) run in the stepper (verispec/stepper.py), which fuses all target
passes of a step into as few exact pool decodes as it can.

The KV cache is one pool shared by all requests (`runners.open_pool`: runners/llamacpp_pool.py, a
llama.cpp context with a sequence per request and a prefix cache; runners/torch_pool.py, paged
blocks for a torch target), or, with --kv-pool 0 and for torch models the paged pool cannot hold,
one context per slot (runners/context_pool.py: nothing fused). Token trees (--tree) are verified in the
same fused decodes on the llama.cpp pool (KvPool.open_tree); a torch target serving trees gets a context
per slot. A llama.cpp draft model has a pool of its own with a sequence per slot; another draft runner
gets a context per slot.

KV on demand. On a pool that can preempt (the llama.cpp and the paged torch pools), a request is admitted when the
pools can reserve its prompt and `RESERVE_AHEAD` cells more, and its reservation grows by that
much whenever its next step could outgrow it. When the cells run out, the newest request is
preempted: its cells are freed and, once cells are free again (before anyone new is admitted), they
are decoded again, bit for bit (KvPool.resume; the torch pool copies them out and back, PagedPool.resume),
so its output is unchanged. A context per slot reserves the
cells a request can use at most at admission: prompt + max_tokens + its largest pass + 1, capped by --ctx.
A request waits in the queue until its cells are free (first come, first served). Draft caps come from the goodput planner (goodput.py) once two or more requests share the
passes; alone, a request's own chooser decides. A request that joins a running batch does not
draft until planned for, and a draft model whose prompt prefill it skipped stays off for it
(Engine.gate, draft_gate.py): catching up later would stall every other request.

Faults. A fused decode that fails is retried in halves down to the request it cannot run (stepper.py): that request
fails alone with a 5xx naming the cause, or, out of cells, the newest request is preempted (`_make_room`). An exception
anywhere else in the loop kills the engine (`_run`): every request held gets a 503, new ones too, /health answers
503 and `died` is set, on which `serve` drains the connections and exits non-zero. --queue-timeout and
--request-timeout end requests that wait or run too long (`_expire`).

The start-up check of --ctx x --max-batch against the available memory is memory.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


from .draft_choice import AutoChoice
from ..drafters.base import Drafter
from ..drafters.cascade import CascadeDrafter
from ..drafters.draft_model import ModelDrafter
from ..drafters.ngram import NgramDrafter
from ..drafters.suffix import SuffixDrafter
from ..drafters.suffix_store import SuffixStore
from ..draft_length import CarriedCosts
from ..engine import Engine, SpeculativeConfig, Stats
from ..errors import InvalidParameter, VerispecError
from ..runners import open_pool
from ..runners.base import Runner
from ..runners.context_pool import ContextPool, clone_runner
from ..runners.llamacpp import LlamaCppRunner
from ..runners.llamacpp_pool import DirectSeqRunner, KvPool
from ..runners.pool import Preempted, position_limit
from ..sampling import SamplingParams
from ..stepper import Member, Stepper
from ..text import TextAssembler
from .goodput import Candidate, GoodputPolicy
from .memory import check_server
from .metrics import Metrics

log = logging.getLogger("verispec.serve")

# Cells a request reserves beyond what it holds, on a pool with KV on demand: its reservation grows once per
# this many tokens, not every step (plus its largest step: draft_max + 2).
RESERVE_AHEAD = 64


class QueueFull(Exception):
    pass


class RequestFailed(Exception):
    """A request ended by the server, not by what the client asked: answered with `status` and `code` (app.py)."""

    status, code = 500, "internal_error"


class EngineDead(RequestFailed):
    """The step loop ended on an exception: every request gets this until the process exits (see `Scheduler._run`)."""

    status, code = 503, "engine_dead"


class ShuttingDown(RequestFailed):
    status, code = 503, "shutting_down"


class QueueTimeout(RequestFailed):
    status, code = 503, "queue_timeout"


class RequestTimeout(RequestFailed):
    status, code = 408, "request_timeout"


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str = ""
    error: Exception | None = None
    logprobs: list | None = None  # of the tokens behind this text (sampling.TokenLogprob), when the request asks


@dataclass
class Sequence:
    """One request: what the client asked for, and its decoding state on the scheduler thread.
    `sink` receives Events on the scheduler thread."""

    tokens: list[int]
    params: SamplingParams
    spec: SpeculativeConfig
    draft: str | None  # "ngram", "suffix", "model", "cascade" or None
    pinned: bool  # the client chose the drafter or K: the planner does not cap it
    sink: Callable[[Event], None] = lambda event: None
    endpoint: str = "completions"
    history: str = ""  # whose earlier requests a suffix drafter may draft from (the server's: a hash of the API key)
    stats: Stats = field(default_factory=Stats)
    arrived: float = field(default_factory=time.perf_counter)
    checked_at: float = 0.0  # when the handler last checked that the client is still connected
    cancelled: bool = False
    timed_out: bool = False  # ran past --request-timeout: finished with a 408 at the next step
    finished: bool = False
    # scheduler-thread state
    slot: int = -1
    need: int = 0  # the most cells it can use: prompt + max_tokens + its largest pass + 1, capped by --ctx
    preempted: Preempted | None = None  # its cells were freed: what resuming them needs
    engine: Engine | None = None
    decoder: TextAssembler | None = None
    last_token_at: float | None = None
    seen_steps: int = 0
    seen_capped: int = 0
    logprobs_sent: int = 0  # entries of stats.logprobs already emitted

    @property
    def disabled_steps(self) -> int:
        return self.stats.capped_steps

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except RuntimeError:  # the client's event loop is gone (server shutting down)
            pass


class Scheduler:
    def __init__(self, target: Runner, spec: SpeculativeConfig, drafter: Drafter | None,
                 max_batch: int = 4, max_queue: int = 64, n_ctx: int | None = None, spec_off_at: int = 0,
                 metrics: Metrics | None = None, pool_cells: int | None = None, fuse_rows: int | None = None,
                 prefill_chunk: int | None = None, prefix_cache: int = 32, prefill_share: float = 1.0,
                 suffix_store: SuffixStore | None = None, request_timeout: float | None = None,
                 queue_timeout: float | None = None) -> None:
        if max_batch < 1:
            raise InvalidParameter(f"max_batch must be >= 1, got {max_batch}", "max_batch")
        if max_queue < 0:
            raise InvalidParameter(f"max_queue must be >= 0, got {max_queue}", "max_queue")
        if prefix_cache < 0:
            raise InvalidParameter(f"--prefix-cache must be >= 0, got {prefix_cache}", "prefix_cache")
        if not 0 < prefill_share < float("inf"):
            raise InvalidParameter(f"--prefill-share must be a number > 0, got {prefill_share}", "prefill_share")
        for name, limit in (("request_timeout", request_timeout), ("queue_timeout", queue_timeout)):
            if limit is not None and not limit > 0:
                raise InvalidParameter(f"--{name.replace('_', '-')} must be > 0 seconds, got {limit}", name)
        self.request_timeout, self.queue_timeout = request_timeout, queue_timeout
        self.target, self.spec = target, spec
        # The loaded drafter (--draft) as the server runs it: its draft model cloned onto every slot, and a cascade
        # rebuilt per slot around that slot's clone.
        self.model_drafter, self.cascade = served_drafters(drafter)
        self.suffix_store = suffix_store or _store_of(drafter) or SuffixStore()  # the suffix drafter's global history
        # What `auto` chooses among: suffix lookup, and the draft model and a suffix-then-model cascade where served.
        self.auto = AutoChoice(["suffix"] + (["model"] if self.model_drafter else [])
                               + (["cascade"] if self.cascade == ("suffix", "model") else []))
        self.n_ctx = position_limit(target, n_ctx or target.n_ctx)
        self.max_queue, self.spec_off_at = max_queue, spec_off_at
        self.metrics = metrics or Metrics()
        self.carried: dict[str | None, CarriedCosts] = {}  # the adaptive K's measurements per drafter key
        cells = self.n_ctx * max_batch if pool_cells is None else pool_cells
        if cells < 0 or 0 < cells < self.n_ctx:
            raise InvalidParameter(f"--kv-pool {cells} is smaller than --ctx {self.n_ctx}: one request could never fit"
                                   " (0 = a context per slot)", "kv_pool")
        self.memory = check_server(target, self.model_drafter, max_batch, self.n_ctx, cells)
        self.pool = self.draft_pool = None
        self.slots: list[Sequence | None] = [None] * max_batch
        self._drafters: list[ModelDrafter | None] = [None] * max_batch
        self._cascades: list[CascadeDrafter | None] = [None] * max_batch
        try:
            self.pool = (ContextPool(target, self.n_ctx, max_batch) if cells == 0
                         else open_pool(target, cells, max_batch, prefix_cache, trees=spec.uses_trees))  # PoolUnsupported: see app.py
            self.n_ctx = min(self.n_ctx, getattr(self.pool, "n_ctx", self.n_ctx))
            if fuse_rows is not None:
                if fuse_rows < 1:
                    raise InvalidParameter(f"fuse_rows must be >= 1, got {fuse_rows}", "fuse_rows")
                self.pool.fuse_rows = min(fuse_rows, self.pool.n_batch)
            self._open_drafters(max_batch, prefix_cache)
        except BaseException:
            self.close()
            raise
        self.stepper = Stepper(self.pool, prefill_chunk, prefill_share)
        self.policy = GoodputPolicy(self.pool.fuse_rows, cost_curve=target.cost_curve)
        self.policy.pass_seconds = self.pool.pass_seconds
        self.metrics.slots.set(max_batch)
        self.metrics.pool_cells.set(0 if cells == 0 else self.pool.n_cells)
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self.dead: EngineDead | None = None  # set when the step loop ended on an exception
        self.died = threading.Event()  # ... and then, once every request it held has been told
        self._thread = threading.Thread(target=self._run, name="verispec-scheduler", daemon=True)
        self._thread.start()

    def _open_drafters(self, slots: int, prefix_cache: int) -> None:
        """A draft model per slot: on a sequence of one draft pool when it runs on llama.cpp and the target
        shares a pool, else on a context of its own. A cascade per slot, around the slot's draft model."""
        if self.model_drafter is not None:
            runner = self.model_drafter.runner
            if isinstance(runner, LlamaCppRunner) and not isinstance(self.pool, ContextPool):
                self.draft_pool = KvPool(runner, self.pool.n_cells, slots, pad_single_rows=False,
                                         prefix_entries=prefix_cache, exact_prefixes=False)
            for seq in range(slots):
                view = (DirectSeqRunner(self.draft_pool, seq, self.n_ctx) if self.draft_pool is not None
                        else clone_runner(runner, self.n_ctx))
                self._drafters[seq] = ModelDrafter(view, self.model_drafter.min_prob, self.spec.draft_max)
        if self.cascade is not None:
            for seq in range(slots):
                levels = [self._drafters[seq] if level == "model" else self._drafter(level, seq) for level in self.cascade]
                self._cascades[seq] = CascadeDrafter(levels, self.target.n_vocab, self.spec.draft_max)

    # -- called from request handlers -----------------------------------------------------------

    def submit(self, job: Sequence) -> None:
        with self._cond:
            if self.dead is not None:
                raise EngineDead(str(self.dead))
            if self._stop:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue + self._free_slots():
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()

    def cancel(self, job: Sequence) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def counts(self) -> tuple[int, int]:
        """(active, waiting)"""
        with self._cond:
            return sum(s is not None for s in self.slots), len(self._waiting)

    def close(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            thread.join()
        for drafter in self._drafters:
            if drafter is not None and self.draft_pool is None:
                drafter.runner.close()
        self._drafters = []
        for pool in (self.pool, self.draft_pool):
            if pool is not None:
                pool.close()
        self.pool = self.draft_pool = None

    # -- the scheduler thread ---------------------------------------------------------------------

    def _free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def _run(self) -> None:
        """The step loop. An exception that ends it (anywhere but inside a step, whose failures stay with the requests
        they hit) kills the engine: `dead` is set, so /health answers 503 and new requests get 503 at once, every
        request it held is told so, and `died` is set (`serve` then stops the process, non-zero)."""
        try:
            self._loop()
            ending: RequestFailed = ShuttingDown("the server is shutting down")
        except BaseException as exc:  # noqa: BLE001 - whatever it was, the loop is gone: say so instead of hanging
            log.critical("the scheduler's step loop failed: the engine is dead", exc_info=exc)
            with self._cond:
                self.dead = ending = EngineDead(f"the engine stopped after an internal error ({type(exc).__name__}: "
                                                f"{exc}); the server is exiting")
        try:
            self._fail_all(ending)
        finally:
            if self.dead is not None:
                self.died.set()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self.stepper.members:
                    self._cond.wait()
                if self._stop:
                    return
                self._expire()
                self._admit()
                if not self.stepper.members:  # the queue's head waits for cells: wait for a change
                    self._cond.wait(0.05)
                    continue
            self._drop_cancelled()
            self._resume()
            self._grow()
            self._plan()
            try:
                members = self.stepper.step()
            except Exception:  # noqa: BLE001 - a step's own failure fails its requests, not the server
                log.exception("scheduler step failed")
                members = []
                for job in [j for j in self.slots if j is not None]:
                    self._finish(job, "error", Event("error", error=RequestFailed("internal error while decoding")))
            for member in members:
                self._deliver(member)
            self._make_room()
            self._publish()

    def _fail_all(self, error: RequestFailed) -> None:
        """Tell every request held, running or queued, that it ends with `error`, freeing what it holds."""
        outcome = "cancelled" if isinstance(error, ShuttingDown) else "error"
        for job in [j for j in self.slots if j is not None]:
            try:
                self._finish(job, outcome, Event("error", error=error))
            except Exception:  # noqa: BLE001 - whatever broke must not keep the others from being told
                log.exception("finishing a request failed; freeing its cells piece by piece")
                self._abandon(job, error)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            self.metrics.queue_depth.set(0)
        for job in waiting:
            job.emit(Event("error", error=error))

    def _abandon(self, job: Sequence, error: RequestFailed) -> None:
        """What `_finish` does, each part on its own, so that one that fails does not keep the rest from running."""
        job.finished = True
        parts = [lambda: self.stepper.remove(job.slot), lambda: self.pool.release(job.slot),
                 lambda: self.draft_pool is not None and self.draft_pool.release(job.slot),
                 lambda: job.emit(Event("error", error=error))]
        for part in parts:
            try:
                part()
            except Exception:  # noqa: BLE001 - logged; the next part still runs
                log.exception("freeing a request of a dead engine")
        with self._cond:
            self.slots[job.slot] = None

    def _expire(self) -> None:
        """Fail queued requests past --queue-timeout and running ones past --request-timeout (lock held)."""
        now = time.perf_counter()
        for job in list(self._waiting):
            error = None
            if self.queue_timeout is not None and now - job.arrived > self.queue_timeout:
                error = QueueTimeout(f"the request waited {self.queue_timeout:g} s for a slot (--queue-timeout); "
                                     "retry later")
            elif self.request_timeout is not None and now - job.arrived > self.request_timeout:
                error = RequestTimeout(f"the request ran past {self.request_timeout:g} s (--request-timeout)")
            if error is not None:
                self._waiting.remove(job)
                self.metrics.requests.labels(job.endpoint, "timeout").inc()
                job.emit(Event("error", error=error))
        self.metrics.queue_depth.set(len(self._waiting))
        if self.request_timeout is not None:
            for job in [j for j in self.slots if j is not None and now - j.arrived > self.request_timeout]:
                job.timed_out = True  # finished on the loop, outside the lock

    def _make_room(self) -> None:
        """A request whose pass found the pool out of cells: the newest request is preempted, as when a reservation
        cannot grow, and the starved one runs again next step. One that is alone fails: no cells can be freed for it."""
        for member in [m for m in self.stepper.members.values() if m.starved is not None]:
            job = self.slots[member.seq]
            running = [j for j in self.slots if j is not None and not j.preempted]
            if job is None or job.preempted:
                continue
            if not self.pool.preemptible or running == [job]:
                self._finish(job, "error", Event("error", error=RequestFailed(
                    f"the KV pool has no cells left for this request ({member.starved})")))
            else:
                self._preempt(max(running, key=lambda j: j.arrived))

    def _admit(self) -> None:
        """Give free slots to waiting requests whose cells the pools can reserve (lock held)."""
        for seq, held in enumerate(self.slots):
            if held is not None:
                continue
            while self._waiting and self._waiting[0].cancelled:
                self.metrics.requests.labels(self._waiting.popleft().endpoint, "cancelled").inc()
            if not self._waiting:
                break
            if any(j is not None and j.preempted for j in self.slots):
                break  # preempted requests get their cells back first
            job = self._waiting[0]
            job.need = min(self.n_ctx, len(job.tokens) + job.params.max_tokens + job.spec.max_pass_rows() + 1)
            if not self._reserve(job, seq, self._ahead(job, len(job.tokens))):
                break  # first come, first served: the head waits for cells
            self._waiting.popleft()
            self._start(job, seq, job.need)
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.active.set(sum(s is not None for s in self.slots))

    def _ahead(self, job: Sequence, holds: int) -> int:
        """The cells to reserve for a request holding `holds` tokens: all it can use, or on demand, RESERVE_AHEAD more."""
        if not self.pool.preemptible:
            return job.need
        return min(job.need, holds + RESERVE_AHEAD + self._step_cells(job))

    @staticmethod
    def _step_cells(job: Sequence) -> int:
        """The most cells one step can add: the target's largest pass (draft_max + 1 rows, or a tree's nodes) and
        its bonus token, and a draft model's run ahead of it by as many."""
        return 2 * (job.spec.max_pass_rows() + 1)

    def _reserve(self, job: Sequence, seq: int, cells: int) -> bool:
        """Reserve `cells` for the request in the target pool and the draft pool; False (nothing changed) if they are not free."""
        before = self.pool.reserved[seq]
        if not self.pool.reserve(seq, cells):
            return False
        if self.draft_pool is not None and not self.draft_pool.reserve(seq, cells):
            self.pool.reserve(seq, before)
            return False
        return True

    def _grow(self) -> None:
        """Grow the reservation of every request whose next step could outgrow it, oldest first; when the cells
        run out, preempt the newest request (KV on demand, see the module docstring)."""
        if not self.pool.preemptible:
            return
        for job in sorted((j for j in self.slots if j is not None and not j.preempted), key=lambda j: j.arrived):
            holds = self.pool.live[job.slot]
            if holds + self._step_cells(job) <= self.pool.reserved[job.slot] or job.preempted:
                continue
            while not self._reserve(job, job.slot, self._ahead(job, holds)):
                newest = max((j for j in self.slots if j is not None and not j.preempted), key=lambda j: j.arrived)
                self._preempt(newest)
                if newest is job:
                    break

    def _preempt(self, job: Sequence) -> None:
        job.preempted = self.stepper.preempt(job.slot)
        if self.draft_pool is not None:
            self.draft_pool.release(job.slot)  # its drafter catches up from the context when it drafts again
        self.metrics.preemptions.inc()

    def _resume(self) -> None:
        """Give preempted requests their cells back, oldest first, as soon as they are free."""
        for job in sorted((j for j in self.slots if j is not None and j.preempted), key=lambda j: j.arrived):
            holds = job.preempted.held if job.preempted.prompt_len is not None else len(job.tokens)
            if not self._reserve(job, job.slot, self._ahead(job, holds)):
                return
            saved, job.preempted = job.preempted, None
            try:
                self.stepper.resume(job.slot, saved)
            except Exception as exc:  # noqa: BLE001 - the request fails, the server keeps serving
                log.exception("resuming a preempted request failed")
                self._finish(job, "error", Event("error", error=RequestFailed(f"resuming the request failed: {exc}")))

    def _start(self, job: Sequence, seq: int, need: int) -> None:
        target = self.pool.view(seq, need)
        drafter = self._drafter(job.draft, seq, job.history)
        job.engine = Engine(target, drafter, job.spec, self.carried.setdefault(job.draft, CarriedCosts()))
        if drafter is not None and not job.pinned:
            job.engine.gate.plan(self._initial_cap())
        job.decoder = TextAssembler(self.target.tokenizer, job.params.stop)
        job.slot = seq
        self.slots[seq] = job
        self.stepper.add(seq, job.engine.steps(job.tokens, job.params, job.stats))
        self.metrics.prompt_tokens.inc(len(job.tokens))

    def _drafter(self, key: str | None, seq: int, history: str = "") -> Drafter | None:
        if key == "model":
            return self._drafters[seq]
        if key == "cascade":
            for level in self._cascades[seq].levels:
                if isinstance(level, SuffixDrafter):
                    level.history = history  # the slot's cascade serves this request now
            return self._cascades[seq]
        if key == "ngram":
            return self._ngram()
        if key == "suffix":
            return SuffixDrafter(self.suffix_store, history)
        return None

    def _ngram(self) -> NgramDrafter:
        return NgramDrafter(self.spec.ngram_min, self.spec.ngram_max)

    def _initial_cap(self) -> int | None:
        """No drafting for a request that joins a running batch until the planner has planned for it.

        Its chooser would otherwise decide alone, from pass times measured while others shared the
        step, and a draft model's prefill would stall every request. Alone, the request's own chooser
        decides (None: no cap). A draft model whose prefill was skipped never drafts for the request
        (DraftGate.stays_off): its first draft would catch up on prompt + generated tokens while
        every other request waits, a one-time cost that only the tokens still to come could repay,
        and the server does not know how many will come.

        Requests admitted in the same pass count as others: the first of a burst is not alone (docs/server.md).
        """
        running = sum(s is not None for s in self.slots)  # before this request takes its slot
        others = running + min(len(self._waiting), len(self.slots) - running - 1)
        if self.spec_off_at > 0 and 1 + others >= self.spec_off_at:
            return 0
        return 0 if others else None

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.slots if j is not None and (j.cancelled or j.timed_out)]:
            if job.cancelled:
                self._finish(job, "cancelled")
            else:
                self._finish(job, "timeout", Event("error", error=RequestTimeout(
                    f"the request ran past {self.request_timeout:g} s (--request-timeout)")))

    def _plan(self) -> None:
        """Re-plan every unpinned request's draft cap from the measured pass costs (goodput.py)."""
        active = [j for j in self.slots if j is not None and not j.preempted]
        if not active:
            return
        if self.spec_off_at > 0:
            caps = [0 if len(active) >= self.spec_off_at else None] * len(active)
        elif len(active) == 1:  # nothing shares the pass: the engine's own chooser is the goodput rule
            caps = [None]
        else:
            caps = self.policy.plan([self._candidate(job) for job in active])
        gated = [(job, cap) for job, cap in zip(active, caps) if job.engine.gate.gated]
        for job, cap in gated:
            if self.stepper.members[job.slot].started:  # a joiner's first step runs with its initial cap
                job.engine.gate.plan(cap)
        self.metrics.spec_disabled.set(1 if gated and all(cap == 0 or j.engine.gate.stays_off for j, cap in gated) else 0)
        self.metrics.draft_budget.set(sum(cap or 0 for j, cap in gated if not j.engine.gate.stays_off))

    def _candidate(self, job: Sequence) -> Candidate:
        """The request as the planner sees it, with its drafter's carried measurements as priors."""
        # A draft model still to be prefilled is planned no drafts: its catch-up would stall everyone (Engine).
        gate = job.engine.gate
        k_max = 0 if not job.draft or gate.stays_off or gate.prefill_pending else job.spec.draft_max
        candidate = Candidate(job.stats, k_max, not gate.gated)
        carried = self.carried.get(job.draft)
        if carried is not None and carried.acceptance is not None:
            candidate.prior_acceptance = carried.acceptance
            candidate.prior_draft_seconds = carried.draft_seconds_per_token or 0.0
        return candidate

    def _deliver(self, member: Member) -> None:
        """Emit what a request's step wrote; finish it if it is done."""
        job = self.slots[member.seq]
        if job is None:
            return
        if member.out:
            self._emit_tokens(job, member.out)
            member.out = []
        if job.decoder.stopped:
            job.stats.finish_reason = "stop"
            self._finish(job, "stop")
        elif member.error is not None:
            if isinstance(member.error, VerispecError):
                self._finish(job, "invalid", Event("error", error=member.error))
            else:
                log.error("request failed", exc_info=member.error)
                self._finish(job, "error", Event("error", error=RequestFailed(f"decoding failed: {member.error}")))
        elif member.finished:
            self._finish(job, job.stats.finish_reason)

    def _emit_tokens(self, job: Sequence, tokens: list[int]) -> None:
        now, n = time.perf_counter(), len(tokens)
        self.metrics.generated_tokens.inc(n)
        if job.last_token_at is None:
            self.metrics.ttft.observe(now - job.arrived)
        else:
            for _ in range(n):
                self.metrics.inter_token.observe((now - job.last_token_at) / n)
        job.last_token_at = now
        job.seen_steps = self.metrics.record_steps(job.stats, job.seen_steps)
        if job.stats.capped_steps > job.seen_capped:
            self.metrics.spec_disabled_steps.inc(job.stats.capped_steps - job.seen_capped)
            job.seen_capped = job.stats.capped_steps
        text = job.decoder.add(tokens)
        entries = None
        if job.params.logprobs is not None:
            entries, job.logprobs_sent = job.stats.logprobs[job.logprobs_sent :], len(job.stats.logprobs)
        if text or entries:
            job.emit(Event("text", text, logprobs=entries))

    def _finish(self, job: Sequence, outcome: str, event: Event | None = None) -> None:
        """Stop the request's steps, free its cells, tell the client, free the slot."""
        job.finished = True
        self.stepper.remove(job.slot)
        self.pool.release(job.slot)
        if self.draft_pool is not None:
            self.draft_pool.release(job.slot)
        if event is None and outcome != "cancelled":
            tail = "" if job.decoder.stopped else job.decoder.flush()
            if tail:
                job.emit(Event("text", tail))
            event = Event("done", finish_reason=outcome)
        if event is not None:
            job.emit(event)
        if outcome in ("stop", "length") and job.draft:
            self.auto.record(job.draft, job.stats)
        self.metrics.requests.labels(job.endpoint, outcome).inc()
        with self._cond:
            self.slots[job.slot] = None
            self.metrics.active.set(sum(s is not None for s in self.slots))

    def _publish(self) -> None:
        m, pool = self.metrics, self.pool
        for rows in pool.take_rows():
            m.fused_rows.observe(rows)
        for rows, seconds in list(pool.pass_seconds.items()):
            m.pass_seconds.labels(str(rows)).set(seconds)
        m.goodput.set(self.policy.predicted)
        m.pool_live.set(sum(pool.live))
        m.pool_reserved.set(sum(pool.reserved))
        m.pool_compactions.set(pool.compactions)
        m.preempted.set(sum(1 for job in self.slots if job is not None and job.preempted))
        m.draft_pool_live.set(sum(self.draft_pool.live) if self.draft_pool is not None else 0)
        m.draft_shared_decodes.set(self.draft_pool.shared_decodes if self.draft_pool is not None else 0)
        m.tree_passes.set(getattr(pool, "trees", 0))
        m.tree_redecodes.set(getattr(pool, "tree_redecodes", 0))
        m.suffix_bytes.set(self.suffix_store.nbytes)
        m.suffix_requests.set(self.suffix_store.requests)
        m.suffix_evicted.set(self.suffix_store.evicted)
        m.publish_prefix_cache("target", pool.prefixes)
        if self.draft_pool is not None:
            m.publish_prefix_cache("draft", self.draft_pool.prefixes)


def served_drafters(drafter: Drafter | None) -> tuple[ModelDrafter | None, tuple[str, ...] | None]:
    """What the server makes of the loaded drafter: its draft model, if any (cloned onto every slot), and for a
    cascade its levels as drafter keys ("ngram", "suffix", "model"), rebuilt per slot. Heads read the target's hidden
    states, which a pool's sequences do not keep, so a server does not draft with them, and says so at start-up."""
    if drafter is None or isinstance(drafter, (NgramDrafter, SuffixDrafter)):
        return None, None
    if isinstance(drafter, ModelDrafter):
        return drafter, None
    levels = drafter.levels if isinstance(drafter, CascadeDrafter) else [drafter]
    models = [level for level in levels if isinstance(level, ModelDrafter)]
    if len(models) > 1 or any(not isinstance(level, (ModelDrafter, NgramDrafter, SuffixDrafter)) for level in levels):
        raise InvalidParameter(f"the server drafts with n-gram lookup, suffix lookup, a draft model or a cascade of "
                               f"these with one draft model; {drafter.name} is for `verispec generate`", "draft")
    keys = tuple(_LEVEL_KEYS[type(level)] for level in levels)
    if not models and "suffix" not in keys:  # n-gram levels alone: the server's n-gram lookup
        return None, None
    return (models[0] if models else None), keys


_LEVEL_KEYS = {ModelDrafter: "model", NgramDrafter: "ngram", SuffixDrafter: "suffix"}


def _store_of(drafter: Drafter | None) -> SuffixStore | None:
    """The global suffix history of the loaded drafter (its Model's), so that the server and the Model share it."""
    levels = drafter.levels if isinstance(drafter, CascadeDrafter) else [drafter]
    return next((level.store for level in levels if isinstance(level, SuffixDrafter)), None)
