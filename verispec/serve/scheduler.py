"""Where requests wait, get a slot, advance one step at a time and leave: the server's scheduler.

Two schedulers share this file's request plumbing (Job, Event, Switchable, submit/cancel/finish):

- `PooledScheduler` (pooled.py), the default: every request is a sequence of one shared KV pool
  (pool.py: a llama.cpp context; paged.py: paged blocks for a torch target), each slot's engine
  runs in its own thread, and the target passes of all active requests are fused (fuser.py) into
  decodes small enough to keep every request's logits bit-identical to a solo run (<= 3 rows on
  llama.cpp; any number on torch, padded to a multiple of 4, where "solo" means alone on the
  pool). Draft caps come from the goodput planner (goodput.py). Prompts are prefilled in chunks
  between the others' steps.
- `Scheduler` below (`--kv-pool 0`, and torch models the paged pool cannot hold, e.g. with
  sliding-window attention): `max_batch` slots, each a target runner with its own KV cache (a
  llama.cpp sibling context, or a TorchRunner on the shared module) plus its own drafters. One
  worker thread admits waiting requests into free slots and advances every active request's
  engine generator by one step, round-robin. Passes are not fused, so throughput is that of one
  stream shared fairly; a request's extra verify rows cost only its own pass, so the engine's
  per-request adaptive K is already the goodput rule there and drafting is only turned off by
  `spec_off_at` (active requests at which unpinned requests step with K = 0; 0 = never). Such
  steps are counted in `verispec_speculation_disabled_total`. In both, a draft model whose prompt
  prefill a request skipped stays off for that request (`Switchable.stays_off`): catching up
  later would stall every other request.

Both check at start-up that --ctx x --max-batch (target KV, draft KV, compute buffers) fits in the
available memory (memory.py; the torch pool checks its own KV in paged.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..api import Model, TextAssembler
from ..drafters.base import Draft, Drafter
from ..drafters.draft_model import ModelDrafter
from ..draft_length import CarriedCosts
from ..engine import Engine, SpeculativeConfig, Stats
from ..errors import InvalidParameter, VerispecError
from ..runners.base import Runner
from ..sampling import SamplingParams
from .memory import check_server
from .metrics import Metrics

log = logging.getLogger("verispec.serve")


class QueueFull(Exception):
    pass


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str = ""
    error: Exception | None = None


@dataclass
class Job:
    """One request as the scheduler sees it. `sink` receives Events from the worker thread."""

    tokens: list[int]
    params: SamplingParams
    spec: SpeculativeConfig
    draft: str | None  # "ngram", "model" or None
    pinned: bool  # the client chose the drafter: the load threshold does not turn it off
    sink: Callable[[Event], None] = lambda event: None
    endpoint: str = "completions"
    stats: Stats = field(default_factory=Stats)
    arrived: float = field(default_factory=time.perf_counter)
    disabled_steps: int = 0
    checked_at: float = 0.0  # when the handler last checked that the client is still connected
    cancelled: bool = False
    finished: bool = False
    # worker-side state
    _gen: Iterator[list[int]] | None = None
    _gate: "Switchable | None" = None
    _decoder: TextAssembler | None = None
    _last_token_at: float | None = None
    _seen_steps: int = 0

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except RuntimeError:  # the client's event loop is gone (server shutting down)
            pass


class Switchable(Drafter):
    """A drafter the scheduler can cap between steps: `cap` limits K (0 = off: it proposes nothing).

    `stays_off`: a costly drafter (a draft model) whose prompt prefill was skipped, because the
    request started with cap 0 or its chooser did not mean to draft. Its first proposal would have
    to catch up on the whole context (prompt + generated) first, stalling every other request
    (Scheduler._step keeps its cap at 0). `prefill_seconds`: the draft prefill it let through,
    which the engine counts in Stats.prefill_seconds with the target's.
    """

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.name = inner.name
        self.costly = inner.costly
        self.cap: int | None = None
        self.stays_off = False
        self.prefill_seconds = 0.0

    @property
    def enabled(self) -> bool:
        return self.cap != 0

    def allowed(self, cap: int | None) -> int | None:
        """The cap in force when the scheduler asks for `cap`: 0 for good once the draft stays off.

        The one place that rule lives; both schedulers and the planner ask here."""
        return 0 if self.stays_off else cap

    def begin(self, prompt, params, rng, noise=None) -> None:
        self.inner.begin(prompt, params, rng, noise)
        self.stays_off = self.costly  # until prefill() lets the prompt through

    def prefill(self, prompt: Sequence[int]) -> None:
        if self.cap != 0:
            t0 = time.perf_counter()
            self.inner.prefill(prompt)
            self.prefill_seconds += time.perf_counter() - t0
            self.stays_off = False

    def propose(self, context: Sequence[int], k: int) -> Draft:
        if self.cap == 0:
            return Draft([], None, self.name)
        return self.inner.propose(context, k if self.cap is None else min(k, self.cap))

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        if self.cap == 0:
            return []
        return self.inner.propose_branches(context, k if self.cap is None else min(k, self.cap), width)

    def accepted(self, row: int) -> None:
        self.inner.accepted(row)


def drop_cancelled(waiting: deque[Job], metrics: Metrics) -> None:
    """Drop requests cancelled while they waited from the head of the queue, counting them."""
    while waiting and waiting[0].cancelled:
        metrics.requests.labels(waiting.popleft().endpoint, "cancelled").inc()


def clone_runner(runner: Runner, n_ctx: int) -> Runner:
    """A runner with its own KV cache on the same weights."""
    if hasattr(runner, "sibling"):
        return runner.sibling(n_ctx=n_ctx)
    from ..runners.torch import TorchRunner

    if isinstance(runner, TorchRunner):
        return TorchRunner(runner.model, runner.tokenizer, runner.name, n_ctx, device=str(runner.device))
    raise InvalidParameter(f"the server cannot open per-request contexts on a {type(runner).__name__}", "backend")


class Slot:
    """A target context and its drafters; holds at most one request."""

    def __init__(self, base: Model, n_ctx: int, model_drafter: ModelDrafter | None) -> None:
        self.model = Model(target=clone_runner(base.target, n_ctx), backend=base.backend, spec=base.spec,
                           runner_options=base.runner_options)
        self.model_drafter = None
        if model_drafter is not None:
            runner = clone_runner(model_drafter.runner, n_ctx)
            self.model_drafter = ModelDrafter(runner, model_drafter.min_prob, base.spec.draft_max)
        self.job: Job | None = None

    def drafter(self, key: str | None) -> Drafter | None:
        if key == "model":
            return self.model_drafter
        return self.model.drafter(key)  # "ngram" (made once per slot) or None

    def close(self) -> None:
        if self.model_drafter is not None:
            self.model_drafter.close()
        self.model.close()  # siblings only: the base model owns the weights and is closed by its owner


class Scheduler:
    def __init__(self, base: Model, max_batch: int = 4, max_queue: int = 64, n_ctx: int | None = None,
                 spec_off_at: int = 2, metrics: Metrics | None = None) -> None:
        if max_batch < 1:
            raise InvalidParameter(f"max_batch must be >= 1, got {max_batch}", "max_batch")
        if max_queue < 0:
            raise InvalidParameter(f"max_queue must be >= 0, got {max_queue}", "max_queue")
        self.n_ctx = n_ctx or base.target.n_ctx
        self.max_queue = max_queue
        self.spec_off_at = spec_off_at
        self.metrics = metrics or Metrics()
        self.carried: dict[str | None, CarriedCosts] = {}  # per drafter key, shared by the slots
        default = base.drafter(base.spec.draft)
        self.model_drafter = default if isinstance(default, ModelDrafter) else None
        self.memory = check_server(base, self.model_drafter, max_batch, self.n_ctx)
        self.slots: list[Slot] = []
        try:
            for _ in range(max_batch):
                self.slots.append(Slot(base, self.n_ctx, self.model_drafter))
        except BaseException:
            self.close()
            raise
        self.n_ctx = self.slots[0].model.target.n_ctx
        self.metrics.slots.set(max_batch)
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="verispec-scheduler", daemon=True)
        self._thread.start()

    # -- called from request handlers -----------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue + self._free_slots():
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def counts(self) -> tuple[int, int]:
        """(active, waiting)"""
        with self._cond:
            return sum(s.job is not None for s in self.slots), len(self._waiting)

    def close(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            thread.join()
        for slot in self.slots:
            slot.close()
        self.slots = []

    # -- the worker thread ------------------------------------------------------------------------

    def _free_slots(self) -> int:
        return sum(s.job is None for s in self.slots)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and all(s.job is None for s in self.slots):
                    self._cond.wait()
                if self._stop:
                    break
                self._admit()
            active = [s for s in self.slots if s.job is not None]
            speculate = self.spec_off_at <= 0 or len(active) < self.spec_off_at
            self.metrics.spec_disabled.set(0 if speculate else 1)
            for slot in active:
                try:
                    self._step(slot, None if speculate else 0)
                except Exception:  # never let one request kill the worker
                    log.exception("scheduler step failed")
                    if slot.job is not None:
                        self._finish(slot, "error", Event("error", error=RuntimeError("internal error while decoding")))
        for slot in self.slots:
            if slot.job is not None:
                self._finish(slot, "cancelled", Event("error", error=RuntimeError("the server is shutting down")))
        for job in self._waiting:
            job.emit(Event("error", error=RuntimeError("the server is shutting down")))

    def _admit(self) -> None:
        """Move waiting requests into free slots (called with the lock held)."""
        for slot in self.slots:
            if slot.job is not None:
                continue
            drop_cancelled(self._waiting, self.metrics)
            if not self._waiting:
                break
            job = self._waiting.popleft()
            drafter = slot.drafter(job.draft)
            if drafter is not None and not job.pinned:
                job._gate = drafter = Switchable(drafter)
            job._gen = self._engine(slot.model.target, drafter, job).generate(job.tokens, job.params, job.stats)
            job._decoder = TextAssembler(slot.model.tokenizer, job.params.stop)
            slot.job = job
            self.metrics.prompt_tokens.inc(len(job.tokens))
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.active.set(sum(s.job is not None for s in self.slots))

    def _engine(self, target: Runner, drafter: Drafter | None, job: Job) -> Engine:
        """An engine whose adaptive K starts from what earlier requests on the same drafter measured."""
        carried = self.carried.setdefault(job.draft, CarriedCosts())
        return Engine(target, drafter, job.spec, carried)

    def _step(self, slot: Slot, cap: int | None) -> None:
        """One engine step of the slot's request; `cap` limits an unpinned request's K (None = no limit;
        0 while its draft model stays off)."""
        job = slot.job
        if job.cancelled:
            self._finish(slot, "cancelled")
            return
        if job._gate is not None:
            job._gate.cap = cap = job._gate.allowed(cap)
            if cap == 0 and job._last_token_at is not None:  # a decode step, not the prefill
                job.disabled_steps += 1
                self.metrics.spec_disabled_steps.inc()
        generated = job.stats.generated
        try:
            new = next(job._gen)
        except StopIteration:
            self._finish(slot, job.stats.finish_reason)
            return
        except VerispecError as exc:
            self._finish(slot, "invalid", Event("error", error=exc))
            return
        now = time.perf_counter()
        n = job.stats.generated - generated
        self.metrics.generated_tokens.inc(n)
        if job._last_token_at is None:
            self.metrics.ttft.observe(now - job.arrived)
        elif n:
            for _ in range(n):
                self.metrics.inter_token.observe((now - job._last_token_at) / n)
        job._last_token_at = now
        job._seen_steps = self.metrics.record_steps(job.stats, job._seen_steps)
        text = job._decoder.add(new)
        if text:
            job.emit(Event("text", text))
        if job._decoder.stopped:
            job.stats.finish_reason = "stop"
            self._finish(slot, "stop")

    def _finish(self, slot: Slot, outcome: str, event: Event | None = None) -> None:
        """Close the generator, free the slot's KV cache, tell the client, and only then free the slot:
        another thread may hand a free slot to the next request at once (the pooled scheduler does)."""
        job = slot.job
        job.finished = True
        if job._gen is not None:
            job._gen.close()
        self._release(slot)
        if event is None and outcome != "cancelled":
            tail = "" if job._decoder.stopped else job._decoder.flush()
            if tail:
                job.emit(Event("text", tail))
            event = Event("done", finish_reason=outcome)
        if event is not None:
            job.emit(event)
        self.metrics.requests.labels(job.endpoint, outcome).inc()
        with self._cond:
            slot.job = None
            self.metrics.active.set(sum(s.job is not None for s in self.slots))
            self._cond.notify_all()

    def _release(self, slot: Slot) -> None:
        slot.model.target.reset()
