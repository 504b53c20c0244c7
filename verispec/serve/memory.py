"""The start-up memory check: do --ctx, --max-batch (and --kv-pool) fit in the memory that is available?

What a server allocates on top of the loaded weights, per llama.cpp context:
- the target's KV cache: n_layer x n_head_kv x (key + value head size) x 2 bytes (f16) per token,
  computed from the model (`kv_bytes_per_token`; it equals llama.cpp's own "KV buffer size");
- the draft model's KV cache, the same way: its memory is easy to forget (vLLM #9995);
- compute and output buffers, which llama.cpp sizes from the batch size, not the context: measured
  by creating two small probe contexts and reading llama.cpp's "buffer size" log lines, then
  extrapolated linearly in n_ctx.
Per-slot contexts (--kv-pool 0) pay all of it once per slot, for the target and for the draft; the
shared pool pays the target's KV for the pool's cells and one set of compute buffers, and the same
again for a llama.cpp draft, whose pool has as many cells (runners/llamacpp_pool.py). Any other draft keeps a cache
per slot beside the pool (scheduler.py), so it is counted per slot.

A transformers (torch) model counts its KV cache only (layers x KV heads x head dim x K and V x
the weights' element size per token): torch allocates its activations per pass, with no buffers
sized up front to read off. On the CPU its paged pool's preemption copies cells out into the same
memory, so the worst case of those copies is counted too.

Available memory: runners/device_memory.py. This file only adds up what a server allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runners.device_memory import GiB, MiB, InsufficientMemory, available_bytes

_PROBES = (512, 2048)  # n_ctx of the two probe contexts


@dataclass(frozen=True)
class ContextCost:
    """Bytes one llama.cpp context of a model takes, as a function of its n_ctx."""

    name: str
    kv_per_token: int
    buffers: float  # compute + output buffers at n_ctx = 0
    buffers_per_token: float

    def bytes(self, n_ctx: int) -> int:
        return int(self.kv_per_token * n_ctx + self.buffers + self.buffers_per_token * n_ctx)


def measure(runner, n_seq_max: int = 1, n_batch: int | None = None) -> ContextCost | None:
    """The context cost of a llama.cpp or torch runner; None for other backends (not checked)."""
    from ..runners.llamacpp import LlamaCppRunner, context_buffers
    from ..runners.torch import TorchRunner

    if isinstance(runner, TorchRunner):
        return ContextCost(runner.name, runner.kv_bytes_per_token(), 0.0, 0.0)
    if not isinstance(runner, LlamaCppRunner):
        return None
    small, large = (context_buffers(runner, n, n_seq_max, n_batch) for n in _PROBES)
    other = [sum(v for k, v in sizes.items() if k != "KV") * MiB for sizes in (small, large)]
    slope = max(0.0, (other[1] - other[0]) / (_PROBES[1] - _PROBES[0]))
    return ContextCost(runner.name, runner.kv_bytes_per_token(), max(0.0, other[0] - slope * _PROBES[0]), slope)


@dataclass
class MemoryPlan:
    target: ContextCost
    draft: ContextCost | None
    slots: int
    ctx: int
    pool: int = 0  # cells of the shared KV pool(s); 0 = one context per slot
    draft_pooled: bool = True  # with a pool, the draft has a pool of its own (llama.cpp) or a cache per slot
    # The pool preempts by copying a request's cells out (the paged torch pool) into this same memory (a CPU
    # target): at worst every slot but one is preempted holding a whole context, (slots - 1) x ctx tokens of copies.
    swaps: bool = False

    def parts(self) -> dict[str, int]:
        parts = self._parts("target", self.target, self.pool)
        if self.draft is not None:
            parts.update(self._parts("draft", self.draft, self.pool if self.draft_pooled else 0))
        if self.swaps and self.pool:
            held = min(self.ctx, self.pool)
            parts[f"preempted requests' swapped KV, at worst ({self.slots - 1} x {held} tokens)"] = \
                (self.slots - 1) * held * self.target.kv_per_token
        return {name: size for name, size in parts.items() if size}  # torch models have no buffers to count

    def _parts(self, role: str, cost: ContextCost, pool: int) -> dict[str, int]:
        kib = f"{cost.kv_per_token / 1024:.1f} KiB"
        if pool:
            return {f"{role} KV pool ({pool} tokens x {kib})": cost.kv_per_token * pool,
                    f"{role} compute buffers (1 context)": cost.bytes(pool) - cost.kv_per_token * pool}
        return {f"{role} KV ({self.slots} x {self.ctx} tokens x {kib})": self.slots * cost.kv_per_token * self.ctx,
                f"{role} compute buffers ({self.slots} contexts)":
                    self.slots * (cost.bytes(self.ctx) - cost.kv_per_token * self.ctx)}

    def needed(self) -> int:
        return sum(self.parts().values())

    def with_(self, **changes) -> "MemoryPlan":
        return MemoryPlan(**{**self.__dict__, **changes})


def check(plan: MemoryPlan, available: int | None = None) -> None:
    """Raise InsufficientMemory, with what would fit, if the plan needs more than is available."""
    available = available_bytes() if available is None else available
    need = plan.needed()
    if need <= available:
        return
    detail = ", ".join(f"{name} {size / MiB:,.0f} MiB" for name, size in plan.parts().items())
    raise InsufficientMemory(
        f"--ctx {plan.ctx} --max-batch {plan.slots}" + (f" --kv-pool {plan.pool}" if plan.pool else "")
        + f" needs {need / GiB:.2f} GiB ({detail}) but {available / GiB:.2f} GiB is available. "
        + _what_fits(plan, available), "max_batch")


def _largest(fits, lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with fits(n) (fits is monotone), or lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _what_fits(plan: MemoryPlan, available: int) -> str:
    def fits(**changes) -> bool:
        return plan.with_(**changes).needed() <= available

    options = []
    slots = _largest(lambda n: fits(slots=n), 1, plan.slots)
    if 1 <= slots < plan.slots:
        options.append(f"--max-batch {slots} at --ctx {plan.ctx}")
    if plan.pool:
        pool = _largest(lambda n: fits(pool=n, ctx=min(plan.ctx, n)), 1, plan.pool) // 256 * 256
        if pool >= 256:
            options.append(f"--kv-pool {pool}" + (f" --ctx {pool}" if pool < plan.ctx else "") + f" at --max-batch {plan.slots}")
    else:
        ctx = _largest(lambda n: fits(ctx=n), 1, plan.ctx) // 256 * 256
        if ctx >= 256:
            options.append(f"--ctx {ctx} at --max-batch {plan.slots}")
    if not options:
        ctx = _largest(lambda n: fits(slots=1, ctx=n, pool=n if plan.pool else 0), 1, plan.ctx) // 256 * 256
        if ctx >= 256:
            options.append(f"--max-batch 1 --ctx {ctx}" + (f" --kv-pool {ctx}" if plan.pool else ""))
    if not options:
        return "Nothing fits: even one slot with a 256-token context needs more; free memory or use a smaller model."
    return "What would fit: " + "; or ".join(options) + "."


def plan_server(target, model_drafter, slots: int, ctx: int, pool: int = 0) -> MemoryPlan | None:
    """The memory plan of a server on `target` (None when its backend is not known here: not checked)."""
    from ..runners.llamacpp import LlamaCppRunner

    target_cost = measure(target, slots + 1 if pool else getattr(target, "max_tree_leaves", 0) + 1)
    if target_cost is None:
        return None
    draft = model_drafter.runner if model_drafter is not None else None
    draft_pooled = isinstance(draft, LlamaCppRunner)  # with the pool, a llama.cpp draft gets one like the target's
    n_seq = slots + 1 if pool and draft_pooled else getattr(draft, "max_tree_leaves", 0) + 1
    draft_cost = measure(draft, n_seq) if draft is not None else None
    return MemoryPlan(target_cost, draft_cost, slots, ctx, pool, draft_pooled, swaps=_swaps_in_place(target))


def _swaps_in_place(target) -> bool:
    """A torch target on the CPU: its paged pool's preempted cells are copied into the memory checked here. (On a
    GPU they go to host memory, which this check does not count.)"""
    from ..runners.torch import TorchRunner

    return isinstance(target, TorchRunner) and target.device.type == "cpu"


def check_server(target, model_drafter, slots: int, ctx: int, pool: int = 0) -> MemoryPlan | None:
    plan = plan_server(target, model_drafter, slots, ctx, pool)
    if plan is not None:
        check(plan, available_bytes(getattr(target, "device", None)))
    return plan
