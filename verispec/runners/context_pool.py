"""A context per sequence behind the pool interface (runners/pool.py): for `--kv-pool 0`, and for models
no shared pool can hold (a torch model with sliding-window attention)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..errors import InvalidParameter
from .base import Runner
from .passes import Forward
from .pool import Pool


def clone_runner(runner: Runner, n_ctx: int) -> Runner:
    """A runner with its own KV cache on the same weights."""
    if hasattr(runner, "sibling"):
        return runner.sibling(n_ctx=n_ctx)
    from .torch import TorchRunner

    if isinstance(runner, TorchRunner):
        return TorchRunner(runner.model, runner.tokenizer, runner.name, n_ctx, device=str(runner.device))
    raise InvalidParameter(f"the server cannot open per-request contexts on a {type(runner).__name__}", "backend")


class ContextPool(Pool):
    """One context per slot (--kv-pool 0, or a torch model the paged pool cannot hold), behind the pool
    interface the stepper uses. Nothing is fused: each sequence's pass runs on its own context, so its
    throughput is that of one stream shared fairly. Token trees work here (a context runs them)."""

    default_fuse_rows = 1

    def __init__(self, base: Runner, n_ctx: int, n_seqs: int) -> None:
        self.base = base
        self.runners: list[Runner] = []
        try:
            for _ in range(n_seqs):
                self.runners.append(clone_runner(base, n_ctx))
        except BaseException:
            self.close()
            raise
        self.n_ctx = self.runners[0].n_ctx
        self.n_cells = self.n_ctx * n_seqs
        self.n_vocab = base.n_vocab
        self.n_batch = self.pass_rows = getattr(self.runners[0], "n_batch", 512)
        self.fuse_rows = 1
        self.reserved = [0] * n_seqs
        self.pass_seconds: dict[int, float] = {}
        self.rows_per_decode: list[int] = []

    @property
    def live(self) -> list[int]:
        return [r.n_past for r in self.runners]

    def view(self, seq: int, n_ctx: int) -> Runner:
        return self.runners[seq]

    def reserve(self, seq: int, n: int) -> bool:
        self.reserved[seq] = n
        return True  # the slot's context holds --ctx; the engine stops a request at its end

    def release(self, seq: int) -> None:
        self.runners[seq].reset()
        self.reserved[seq] = 0

    def drop(self, seq: int, from_pos: int) -> None:
        self.runners[seq].rollback(min(from_pos, self.runners[seq].n_past))

    def score(self, works: Sequence[tuple[int, Forward]]) -> list:
        outs = []
        for seq, f in works:
            t0 = time.perf_counter()
            outs.append(self.runners[seq].forward_native(f.tokens, f.parents))
            self._record(len(f.tokens), time.perf_counter() - t0)
        return outs

    def prefill_pass(self, seq: int, tokens: Sequence[int], last: bool):
        rows = self.runners[seq].forward_native(list(tokens), all_logits=False)
        return rows[-1:] if last else None

    def close(self) -> None:
        for runner in self.runners:
            runner.close()  # siblings only: the base runner owns the weights and is closed by its owner
        self.runners = []
