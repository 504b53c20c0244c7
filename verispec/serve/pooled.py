"""The scheduler on one shared KV pool with fused verification (llama.cpp and transformers targets).

Each slot is a sequence of the pool (pool.py for llama.cpp, paged.py for torch) and has its own
thread that drives its request's engine generator step by step. The engine's target passes block
in the fuser (fuser.py); the scheduler thread admits requests and, whenever every active request
is blocked there, runs one fused tick and re-plans the draft caps (goodput.py). A llama.cpp draft
model has one pool of its own, as large as the target's, with a sequence per slot (pool.py
`DirectSeqRunner`); other draft runners keep a context per slot. Draft passes are not fused but run under the target pool's lock:
two llama.cpp computations at once on the same cores slow each other down many times over.

A request is admitted when the pool (and the draft pool) can reserve the cells it can use at most:
prompt + max_tokens + draft_max + 1, capped by --ctx. Until then it waits in the queue (first come,
first served).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence

from ..api import Model, TextAssembler
from ..drafters.draft_model import ModelDrafter
from ..errors import InvalidParameter
from ..runners.base import Runner
from ..runners.llamacpp import LlamaCppRunner
from .fuser import Fuser
from .memory import check_server
from .goodput import Candidate, GoodputPolicy
from .metrics import Metrics
from .paged import open_pool, position_limit
from .pool import DirectSeqRunner, KvPool, SeqRunner
from .scheduler import Event, Scheduler, Switchable, clone_runner, drop_cancelled

log = logging.getLogger("verispec.serve")


def _allowed(job, cap: int | None) -> int | None:
    """The cap a request can take (Switchable.allowed); a pinned request has no gate."""
    return cap if job._gate is None else job._gate.allowed(cap)


class Locked(Runner):
    """A runner whose passes take `lock` (a per-slot draft context, when the draft is not on llama.cpp)."""

    def __init__(self, inner: Runner, lock: threading.Lock) -> None:
        self.inner, self.lock = inner, lock
        self.name, self.n_ctx, self.n_vocab, self.tokenizer = inner.name, inner.n_ctx, inner.n_vocab, inner.tokenizer

    @property
    def n_past(self) -> int:
        return self.inner.n_past

    @property
    def cost_curve(self) -> str:
        return self.inner.cost_curve

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None, all_logits: bool = True):
        with self.lock:
            return self.inner.forward(tokens, parents, all_logits)

    def rollback(self, n_past: int) -> None:
        with self.lock:
            self.inner.rollback(n_past)

    def keep_path(self, path: Sequence[int]) -> None:
        with self.lock:
            self.inner.keep_path(path)

    def reset(self) -> None:
        with self.lock:
            self.inner.reset()

    def close(self) -> None:
        self.inner.close()


class PoolSlot:
    """Sequence `seq` of the pool (and of the draft pool), its drafters, its thread and at most one request."""

    def __init__(self, base: Model, pool: KvPool, fuser: Fuser, seq: int, n_ctx: int,
                 model_drafter: ModelDrafter | None, draft_pool: KvPool | None = None) -> None:
        self.seq = seq
        self.model = Model(target=SeqRunner(pool, seq, fuser, n_ctx), backend=base.backend, spec=base.spec,
                           runner_options=base.runner_options)
        self.model_drafter = None
        if model_drafter is not None:
            if draft_pool is not None:
                runner = DirectSeqRunner(draft_pool, seq, n_ctx)
            else:  # a draft runner not on llama.cpp: a context of its own
                runner = Locked(clone_runner(model_drafter.runner, n_ctx), pool.lock)
            self.model_drafter = ModelDrafter(runner, model_drafter.min_prob, base.spec.draft_max)
        self.job = None
        self.cap: int | None = None
        self.thread: threading.Thread | None = None

    def drafter(self, key: str | None):
        return self.model_drafter if key == "model" else self.model.drafter(key)

    def close(self) -> None:
        if self.model_drafter is not None:
            self.model_drafter.close()
        self.model.close()  # the SeqRunner frees nothing: the pool owns the context


class PooledScheduler(Scheduler):
    def __init__(self, base: Model, max_batch: int = 4, max_queue: int = 64, n_ctx: int | None = None,
                 spec_off_at: int = 0, metrics: Metrics | None = None, pool_cells: int | None = None,
                 fuse_rows: int | None = None, prefill_chunk: int | None = None, prefix_cache: int = 8) -> None:
        if max_batch < 1:
            raise InvalidParameter(f"max_batch must be >= 1, got {max_batch}", "max_batch")
        self.n_ctx = position_limit(base.target, n_ctx or base.target.n_ctx)
        self.max_queue = max_queue
        self.spec_off_at = spec_off_at
        self.metrics = metrics or Metrics()
        self.carried = {}  # the adaptive K's measurements per drafter key (Scheduler._engine)
        default = base.drafter(base.spec.draft)
        self.model_drafter = default if isinstance(default, ModelDrafter) else None
        cells = pool_cells or self.n_ctx * max_batch
        if cells < self.n_ctx:
            raise InvalidParameter(f"--kv-pool {cells} is smaller than --ctx {self.n_ctx}: one request could never fit",
                                   "kv_pool")
        self.memory = check_server(base, self.model_drafter, max_batch, self.n_ctx, cells)
        if prefix_cache < 0:
            raise InvalidParameter(f"--prefix-cache must be >= 0, got {prefix_cache}", "prefix_cache")
        self.prefix_cache = prefix_cache
        self.pool = open_pool(base.target, cells, max_batch, prefix_cache)  # PoolUnsupported for a model it cannot hold
        self.fuser = Fuser(self.pool, fuse_rows, prefill_chunk)
        self.policy = GoodputPolicy(self.fuser.fuse_rows)
        self.policy.pass_seconds = self.fuser.pass_seconds
        self.slots: list[PoolSlot] = []
        self._waiting: deque = deque()
        self._cond = threading.Condition()
        self._stop = False
        self.draft_pool: KvPool | None = None
        try:
            self.draft_pool = self._draft_pool(max_batch)
            for seq in range(max_batch):
                self.slots.append(PoolSlot(base, self.pool, self.fuser, seq, self.n_ctx, self.model_drafter,
                                           self.draft_pool))
        except BaseException:
            self.close()
            raise
        self.metrics.slots.set(max_batch)
        self.metrics.pool_cells.set(self.pool.n_cells)
        for slot in self.slots:
            slot.thread = threading.Thread(target=self._slot_loop, args=(slot,), name=f"verispec-slot-{slot.seq}", daemon=True)
            slot.thread.start()
        self._thread = threading.Thread(target=self._run, name="verispec-scheduler", daemon=True)
        self._thread.start()

    def _draft_pool(self, slots: int) -> KvPool | None:
        """One KV pool for every slot's draft model, with the target pool's cells and lock; None when
        there is no draft model or it is not on llama.cpp (its slots then get contexts of their own)."""
        runner = self.model_drafter.runner if self.model_drafter is not None else None
        if not isinstance(runner, LlamaCppRunner):
            return None
        return KvPool(runner, self.pool.n_cells, slots, lock=self.pool.lock, pad_single_rows=False,
                      prefix_entries=self.prefix_cache, exact_prefixes=False)

    # -- the scheduler thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and all(s.job is None for s in self.slots):
                    self._cond.wait()
                if self._stop:
                    break
                self._admit()
            if self.fuser.tick(timeout=0.02):
                self._plan()
                self._publish()

    def _admit(self) -> None:
        """Give free slots to waiting requests whose cells the pools can reserve (lock held).

        The draft sequence never holds more than the target's tokens + draft_max + 1, so `need` fits it too."""
        for slot in self.slots:
            if slot.job is not None:
                continue
            drop_cancelled(self._waiting, self.metrics)
            if not self._waiting:
                break
            job = self._waiting[0]
            need = min(self.n_ctx, len(job.tokens) + job.params.max_tokens + job.spec.draft_max + 2)
            with self.pool.lock:
                if not self.pool.reserve(slot.seq, need):
                    break  # first come, first served: the head waits for cells
                if self.draft_pool is not None and not self.draft_pool.reserve(slot.seq, need):
                    self.pool.release(slot.seq)
                    break
            self._waiting.popleft()
            slot.model.target.n_ctx = need
            drafter = slot.drafter(job.draft)
            if drafter is not None and not job.pinned:
                job._gate = drafter = Switchable(drafter)
                job._gate.cap = slot.cap = self._initial_cap()
            job._gen = self._engine(slot.model.target, drafter, job).generate(job.tokens, job.params, job.stats)
            job._decoder = TextAssembler(slot.model.tokenizer, job.params.stop)
            self.fuser.attach(slot.seq)
            slot.job = job
            self.metrics.prompt_tokens.inc(len(job.tokens))
            self._cond.notify_all()
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.active.set(sum(s.job is not None for s in self.slots))

    def _initial_cap(self) -> int | None:
        """No drafting for a request that joins a running batch until the planner has planned for it.

        Its engine would otherwise decide alone, from pass times that include waiting at the fusion
        barrier (so drafting looks cheap), and a draft model's prefill would stall every request
        on the shared lock. Alone, the request's own chooser decides (None: no cap).

        A draft model whose prefill was skipped (so, or because the request's chooser did not mean
        to draft) never drafts for the request (Switchable.stays_off; Switchable.allowed
        keeps its cap at 0). Its first draft would catch up on prompt + generated tokens under the
        shared lock while every other request waits at the barrier: a one-time cost that only the
        tokens still to come could repay. Pricing it in the plan instead would need what the server
        does not know: how many tokens are to come (max_tokens is a bound, often the whole context;
        EOS comes when it comes) and the draft's prefill rate; and once the request is alone, its
        engine's own chooser decides, blind to catch-up. This loses drafting only for requests that
        join a busy server and outlive it, and only where a draft model pays at all.
        """
        active = sum(s.job is not None for s in self.slots)
        if self.spec_off_at > 0 and 1 + active >= self.spec_off_at:
            return 0
        return 0 if active else None

    def _plan(self) -> None:
        """Re-plan every unpinned request's draft cap from the measured pass costs (goodput.py).

        A request whose draft model was never prefilled stays at 0 (`_initial_cap`)."""
        active = [(s, s.job) for s in self.slots]
        active = [(s, job) for s, job in active if job is not None]  # slot threads may finish jobs meanwhile
        if not active:
            return
        if self.spec_off_at > 0:
            caps = [0 if len(active) >= self.spec_off_at else None] * len(active)
        elif len(active) == 1:  # nothing shares the pass: the engine's own chooser is the goodput rule
            caps = [None]
        else:
            candidates = [self._candidate(job) for _, job in active]
            caps = self.policy.plan(candidates)
        caps = [_allowed(job, cap) for (_, job), cap in zip(active, caps)]
        gated = [(s, cap) for (s, job), cap in zip(active, caps) if job._gate is not None]
        for slot, cap in gated:
            slot.cap = cap
        self.metrics.spec_disabled.set(1 if gated and all(cap == 0 for _, cap in gated) else 0)
        self.metrics.draft_budget.set(sum(cap or 0 for _, cap in gated))

    def _candidate(self, job) -> Candidate:
        """The request as the planner sees it, with its drafter's carried measurements as priors."""
        k_max = _allowed(job, job.spec.draft_max) if job.draft else 0
        candidate = Candidate(job.stats, k_max, job._gate is None)
        carried = self.carried.get(job.draft)
        if carried is not None and carried.acceptance is not None:
            candidate.prior_acceptance = carried.acceptance
            candidate.prior_draft_seconds = carried.draft_seconds_per_token or 0.0
        return candidate

    def _publish(self) -> None:
        m, pool = self.metrics, self.pool
        for rows in self.fuser.take_rows():
            m.fused_rows.observe(rows)
        for rows, seconds in list(self.fuser.pass_seconds.items()):
            m.pass_seconds.labels(str(rows)).set(seconds)
        m.goodput.set(self.policy.predicted)
        m.pool_live.set(sum(pool.live))
        m.pool_reserved.set(sum(pool.reserved))
        m.pool_compactions.set(pool.compactions)
        m.draft_pool_live.set(sum(self.draft_pool.live) if self.draft_pool is not None else 0)
        m.publish_prefix_cache("target", pool.prefixes)
        if self.draft_pool is not None:
            m.publish_prefix_cache("draft", self.draft_pool.prefixes)

    # -- slot threads ----------------------------------------------------------------------------------

    def _slot_loop(self, slot: PoolSlot) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or slot.job is not None)
                if slot.job is None:
                    return
            while slot.job is not None:
                try:
                    self._step(slot, slot.cap)
                except Exception:  # never let one request kill its slot
                    if not self._stop:
                        log.exception("scheduler step failed")
                    if slot.job is not None:
                        message = "the server is shutting down" if self._stop else "internal error while decoding"
                        self._finish(slot, "error", Event("error", error=RuntimeError(message)))

    def _release(self, slot: PoolSlot) -> None:
        """Give back the slot's cells in both pools (before the slot is free: see Scheduler._finish)."""
        with self.pool.lock:
            self.pool.release(slot.seq)
            if self.draft_pool is not None:
                self.draft_pool.release(slot.seq)
        self.fuser.detach(slot.seq)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        fuser = getattr(self, "fuser", None)
        if fuser is not None:
            fuser.close()
        for slot in self.slots:
            if slot.thread is not None:
                slot.thread.join()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join()
        for job in getattr(self, "_waiting", ()):
            job.emit(Event("error", error=RuntimeError("the server is shutting down")))
        for slot in self.slots:
            slot.close()
        self.slots = []
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        if getattr(self, "draft_pool", None) is not None:
            self.draft_pool.close()
