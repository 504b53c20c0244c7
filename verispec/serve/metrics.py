"""Prometheus metrics of one server. Each server has its own registry, so several can live in one process."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine import Stats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_INTER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("verispec_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("verispec_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("verispec_generated_tokens", "Tokens generated", registry=r)
        self.target_passes = Counter("verispec_target_passes", "Target forward passes after prefill (one per step)", registry=r)
        self.drafted = Counter("verispec_drafted_tokens", "Draft tokens sent to verification", registry=r)
        self.accepted = Counter("verispec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.drafted_at = Counter("verispec_drafted_at_position", "Draft tokens verified, by 1-based draft position",
                                  ["position"], registry=r)
        self.accepted_at = Counter("verispec_accepted_at_position", "Draft tokens accepted, by 1-based draft position",
                                   ["position"], registry=r)
        self.accepted_length = Histogram("verispec_accepted_length", "Tokens gained per target pass (bonus token included)",
                                         buckets=_LENGTHS[1:], registry=r)
        self.mean_accepted_length = Gauge("verispec_mean_accepted_length", "Mean tokens gained per target pass since start",
                                          registry=r)
        self.draft_length = Histogram("verispec_draft_length", "Draft length K chosen per step (0 = no speculation)",
                                      buckets=_LENGTHS, registry=r)
        self.spec_disabled_steps = Counter("verispec_speculation_disabled",
                                           "Steps run without drafting because the batch was too full for speculation to pay",
                                           registry=r)
        self.spec_disabled = Gauge("verispec_speculation_disabled_now", "1 while the scheduler has drafting turned off",
                                   registry=r)
        self.queue_depth = Gauge("verispec_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("verispec_active_requests", "Requests holding a slot (the running batch)", registry=r)
        self.slots = Gauge("verispec_slots", "Slots (--max-batch)", registry=r)
        self.ttft = Histogram("verispec_time_to_first_token_seconds", "Arrival to first generated token", buckets=_LATENCY,
                              registry=r)
        self.inter_token = Histogram("verispec_inter_token_latency_seconds",
                                     "Time between steps divided over the tokens the step produced, once per token",
                                     buckets=_INTER_TOKEN, registry=r)
        self.draft_budget = Gauge("verispec_draft_budget", "Draft tokens per step the goodput planner allows all "
                                  "unpinned requests together", registry=r)
        self.goodput = Gauge("verispec_goodput_predicted_tokens_per_second", "Tokens/s the goodput planner predicts "
                             "for its current caps", registry=r)
        self.pass_seconds = Gauge("verispec_fused_pass_seconds", "Measured seconds of one fused target decode, by rows",
                                  ["rows"], registry=r)
        self.fused_rows = Histogram("verispec_fused_rows", "Rows (tokens of all requests) per fused target decode",
                                    buckets=_LENGTHS[1:], registry=r)
        self.pool_cells = Gauge("verispec_kv_pool_cells", "KV cells of the shared pool (0: per-slot contexts)", registry=r)
        self.pool_live = Gauge("verispec_kv_pool_live_tokens", "Tokens the active requests hold in the pool", registry=r)
        self.pool_reserved = Gauge("verispec_kv_pool_reserved_cells", "Cells reserved by admitted requests", registry=r)
        self.pool_compactions = Gauge("verispec_kv_pool_compactions", "Times the pool was compacted", registry=r)
        self.preemptions = Counter("verispec_preemptions", "Requests whose cells were freed for an older request's "
                                   "(resumed by recompute or swap, output unchanged)", registry=r)
        self.preempted = Gauge("verispec_preempted_requests", "Requests preempted and waiting to resume", registry=r)
        self.draft_pool_live = Gauge("verispec_kv_draft_pool_live_tokens", "Tokens the draft model holds in its pool", registry=r)
        self.draft_shared_decodes = Gauge("verispec_draft_shared_decodes", "Draft-model decodes that held the draft "
                                          "passes of 2+ requests", registry=r)
        self.tree_passes = Gauge("verispec_tree_passes", "Token-tree verification passes in the shared pool", registry=r)
        self.tree_redecodes = Gauge("verispec_tree_redecodes", "Accepted tree paths decoded again as a chain (not the "
                                    "tree's leading nodes)", registry=r)
        self.prefix_lookups = Counter("verispec_prefix_cache_lookups", "Prompts prefilled with the prefix cache "
                                      "holding entries, by pool", ["pool"], registry=r)
        self.prefix_hits = Counter("verispec_prefix_cache_hits", "Prompts that shared a cached prefix's KV cells, by pool",
                                   ["pool"], registry=r)
        self.prefix_tokens_saved = Counter("verispec_prefix_cache_tokens_saved", "Prompt tokens not prefilled thanks "
                                           "to the prefix cache, by pool", ["pool"], registry=r)
        self.prefix_entries = Gauge("verispec_prefix_cache_entries", "Prompt prefixes the pool keeps, by pool", ["pool"],
                                    registry=r)
        self.suffix_bytes = Gauge("verispec_suffix_history_bytes", "Estimated memory of the suffix drafter's global "
                                  "history (all keys)", registry=r)
        self.suffix_requests = Gauge("verispec_suffix_history_requests", "Finished requests the suffix drafter's "
                                     "global history holds", registry=r)
        self.suffix_evicted = Gauge("verispec_suffix_history_evicted", "Requests the suffix history forgot to stay "
                                    "within its memory limit, oldest first", registry=r)
        self._published_prefix: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        self._steps = 0
        self._gained = 0

    def record_steps(self, stats: Stats, seen: int) -> int:
        """Count the steps `stats` recorded since index `seen`; return the new index."""
        with self._lock:
            return self._record_steps(stats, seen)

    def _record_steps(self, stats: Stats, seen: int) -> int:
        for drafted, gained in zip(stats.draft_lengths[seen:], stats.accepted_lengths[seen:]):
            accepted = gained - 1
            self.target_passes.inc()
            self.draft_length.observe(drafted)
            self.accepted_length.observe(gained)
            self.drafted.inc(drafted)
            self.accepted.inc(accepted)
            for i in range(drafted):
                self.drafted_at.labels(str(i + 1)).inc()
                if i < accepted:
                    self.accepted_at.labels(str(i + 1)).inc()
            self._steps += 1
            self._gained += gained
        if self._steps:
            self.mean_accepted_length.set(self._gained / self._steps)
        return len(stats.draft_lengths)

    def publish_prefix_cache(self, pool: str, cache) -> None:
        """Bring the counters up to a PrefixCache's own (which only grow)."""
        now = (cache.lookups, cache.hits, cache.tokens_saved)
        before = self._published_prefix.get(pool, (0, 0, 0))
        for counter, n in zip((self.prefix_lookups, self.prefix_hits, self.prefix_tokens_saved), (a - b for a, b in zip(now, before))):
            if n:
                counter.labels(pool).inc(n)
        self._published_prefix[pool] = now
        self.prefix_entries.labels(pool).set(len(cache))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
