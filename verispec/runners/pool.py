"""The seam between a model's runner and the server: a KV pool that holds many sequences at once.

`Pool` is what the stepper and the scheduler use; `runners.open_pool()` opens a model's own:
- llamacpp_pool.py: one llama.cpp context, a sequence per request, a prefix cache;
- torch_pool.py: paged KV blocks for a transformers model;
- context_pool.py: a context per sequence (nothing fused), for models neither can hold.
The exactness rules (how many rows a decode may fuse, prompt pass sizes, cell order) live in the
pools, next to the kernels they come from.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..ema import ema
from ..errors import InvalidParameter
from .base import Runner
from .passes import DraftPass, Forward
from .prefix_cache import PrefixCache


class PoolUnsupported(InvalidParameter):
    """This model cannot share a pool of this kind (the server falls back to a context per slot)."""


def position_limit(target: Runner, n_ctx: int) -> int:
    """n_ctx capped by a transformers model's position limit, as TorchRunner caps its own context."""
    config = getattr(getattr(target, "model", None), "config", None)
    return min(n_ctx, int(getattr(config, "max_position_embeddings", None) or n_ctx))


def chunk_sizes(n_rows: int, fuse_rows: int) -> list[int]:
    """Rows per decode: full chunks, but 2 + 2 rather than 3 + 1 (a lone row may need a dummy row, see the docstring)."""
    sizes = [fuse_rows] * (n_rows // fuse_rows) + ([n_rows % fuse_rows] if n_rows % fuse_rows else [])
    if len(sizes) > 1 and sizes[-1] == 1 and fuse_rows > 2:
        sizes[-2] -= 1
        sizes[-1] += 1
    return sizes


class PoolFull(RuntimeError):
    pass


class ReservationExceeded(RuntimeError):
    """A request needs more cells than it reserved: the server's reservation was wrong, not the client's request."""


@dataclass
class Preempted:
    """What a pool needs to give a preempted sequence its cells back (Pool.resume): the tokens to decode again
    (llamacpp_pool, by recompute) or the cells' keys and values (torch_pool, swapped out to the host)."""

    held: int  # cells it held: what resuming takes back
    prompt_len: int | None  # how many of them its prompt passes decoded (None: its prompt was not done)
    # A recomputing pool's: the token of each cell, in position order; a swapping pool's: its prompt's (to share
    # the cached prefix back).
    tokens: list[int] = field(default_factory=list)
    swapped: tuple[list, list] | None = None  # a swapping pool's: keys and values of each cell, per layer


class Pool(ABC):
    """The KV cache of many sequences of one model, as the stepper (verispec/stepper.py) and the server's
    scheduler drive it, from one thread. A sequence reserves the cells it can use at most, the engine
    sees it through a Runner view (`view`), and its target passes come here (`score`, `prefill_pass`).

    Attributes every pool has: n_cells, n_vocab, n_batch, live / reserved (tokens held and cells
    reserved per sequence), fuse_rows (rows one fused decode may take), pass_rows (most rows per prompt
    pass; a stepper may lower it once, before the first prefill), compactions, prefixes (its
    prefix cache; empty where it has none), pass_seconds and rows_per_decode (below).
    """

    base: Runner
    n_cells: int
    n_vocab: int
    n_batch: int
    fuse_rows: int
    pass_rows: int
    live: list[int]
    reserved: list[int]
    compactions: int = 0
    prefixes: PrefixCache = PrefixCache(())
    # Can free a sequence's cells and decode them again bit for bit later (preempt / resume); a pool that
    # cannot has every request reserve the most cells it can use at admission.
    preemptible: bool = False
    mixes_prompts: bool = False  # prompt rows ride in scoring decodes (FusedScoring.mixes_prompts)
    rows_invariant: bool = False  # every decode of up to default_fuse_rows rows gives each row its one-row bits
    pass_seconds: dict[int, float]  # EMA of one scoring decode's seconds, by rows: the goodput planner's T(n)
    rows_per_decode: list[int]  # scoring decodes since the last take_rows() (for metrics)
    _row_buffers: dict[int, np.ndarray]  # FusedScoring's reply rows per sequence, reused

    def reserved_cells(self, n: int) -> int:
        """The cells a reservation of n takes (a paged pool rounds up to whole blocks)."""
        return n

    def free_cells(self) -> int:
        """Cells not reserved by any admitted request."""
        return self.n_cells - sum(self.reserved_cells(r) for r in self.reserved)

    def reserve(self, seq: int, n: int) -> bool:
        """Reserve n cells for `seq` (its most so far; it may grow later); False when they are not free."""
        if self.reserved_cells(n) > self.free_cells() + self.reserved_cells(self.reserved[seq]):
            return False
        self.reserved[seq] = n
        return True

    @abstractmethod
    def release(self, seq: int) -> None:
        """The sequence's request left: free (or cache) its cells and its reservation."""

    @abstractmethod
    def score(self, works: Sequence[tuple[int, Forward]]) -> list:
        """The logits of every row of each (sequence, target pass)."""

    @abstractmethod
    def drop(self, seq: int, from_pos: int) -> None:
        """Forget positions >= from_pos of `seq` (a rollback, or a failed decode taken back)."""

    @abstractmethod
    def prefill_pass(self, seq: int, tokens: Sequence[int], last: bool):
        """One prompt pass; its last row's logits when `last`, else None."""

    @abstractmethod
    def close(self) -> None: ...

    def view(self, seq: int, n_ctx: int) -> Runner:
        """The runner a request's engine gets for `seq` (its passes come back here through the stepper)."""
        return SequenceView(self, seq, n_ctx)

    def prompt_pass(self, done: int, n_tokens: int, budget: int) -> int:
        """Rows of the next pass of an n-token prompt with `done` tokens in the pool (a shared prefix
        included), about `budget` rows where exactness allows. Here a fixed layout, whatever the budget:
        `pass_rows` passes from where the prompt starts (a context's prompt rows depend on pass sizes)."""
        return min(self.pass_rows, n_tokens - done)

    def adopt_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """Share a cached prefix of a prompt about to be prefilled on an empty `seq`; its length (0: none)."""
        return 0

    def preempt(self, seq: int) -> Preempted:
        """Free the sequence's cells and reservation; what `resume` needs to decode them again."""
        raise NotImplementedError(f"{type(self).__name__} cannot preempt")

    def resume(self, seq: int, saved: Preempted) -> None:
        """Give a preempted sequence its cells back, bit for bit as they were (its reservation is made)."""
        raise NotImplementedError(f"{type(self).__name__} cannot preempt")

    def remember_prompt(self, seq: int, tokens: Sequence[int]) -> None:
        """`seq` has prefilled `tokens` from position 0 (a pool with a prefix cache keeps it at release)."""

    # Leaf sequences a request's token tree may use (llamacpp_pool.KvPool gives each leaf a sequence id); 0: this
    # pool runs chains only, and the server serves trees on a context per slot (context_pool.py) instead.
    tree_leaves: int = 0

    def keep_path(self, seq: int, path: Sequence[int]) -> None:
        """After a tree pass of `seq`: commit one root-to-node path of the tree, drop the rest."""
        raise InvalidParameter(f"token trees are not supported on the {type(self).__name__} (serve with --kv-pool 0)",
                               "tree")

    def _record(self, rows: int, seconds: float) -> None:
        self.pass_seconds[rows] = ema(self.pass_seconds.get(rows), seconds, 0.2)
        self.rows_per_decode.append(rows)

    def take_rows(self) -> list[int]:
        rows, self.rows_per_decode = self.rows_per_decode, []
        return rows


@dataclass(frozen=True)
class TreeRow:
    """Where a token tree's node is decoded: the sequence ids it carries (its first one sees exactly its ancestors
    and the sequence's committed cells) and its position (the sequence's next position plus its depth)."""

    seq_ids: tuple[int, ...]
    pos: int


@dataclass
class PromptPart:
    """Rows of a prompt riding in a scoring decode (FusedScoring.mixes_prompts)."""

    seq: int
    tokens: Sequence[int]
    last: bool  # they end the prompt: `logits` gets the last row's
    logits: np.ndarray | None = None


class FusedScoring(Pool):
    """How a shared pool runs the target passes of many sequences at once (stepper.py asks it).

    Scoring rows (verification passes, all logits) of all sequences are packed into decodes of at
    most `fuse_rows` rows: by default `default_fuse_rows`, the most that keeps a sequence's logits
    bit-identical to its rows decoded alone however they are packed with other sequences' rows.
    On llama.cpp that is 64 with verispec's batch-invariant build (llama_lib.exact_pass_rows); on
    another build it is 3 (ggml's matmul takes other kernels from 4 rows, logits up to ~0.9 apart), and a larger
    `fuse_rows` is faster per row but not batch-invariant: greedy output may then differ from a solo
    run at near-ties (the server's --verify one-pass). The torch pool pads every decode to a multiple
    of 4 rows, where torch's matmul is row-independent, so its default is all of a step's rows in one
    decode; its prompt passes run alone, in the pool's own pass sizes.

    A token tree's rows are fused like a chain's, in node order, where the pool says (`open_tree`);
    the request then keeps one path (`keep_path`). Cells are made room for before any tree opens, so
    nothing moves them while a tree's leaves are tagged.
    """

    def decode(self, seqs: Sequence[int], tokens: Sequence[int], want: Sequence[bool],
               places: Sequence[TreeRow | None] | None = None) -> np.ndarray:
        """One decode: row i appends tokens[i] to seqs[i], or where places[i] is given, decodes a tree node there."""
        raise NotImplementedError

    def open_tree(self, seq: int, tokens: Sequence[int], parents: Sequence[int]) -> list[TreeRow]:
        """Where each node of a token tree on `seq` is decoded (its cells stay uncommitted until keep_path)."""
        raise InvalidParameter(f"token trees are not supported on the {type(self).__name__} (serve with --kv-pool 0)",
                               "tree")

    def make_room(self, n_rows: int) -> None:
        """Make sure n_rows more cells can be decoded without the pool moving cells in between (trees are open)."""

    @property
    def mixes_prompts(self) -> bool:
        """Past the exact row count, nothing is bit-identical to solo runs any more: prompt rows may then ride in
        the scoring decode too (PromptPart), as llama-server mixes them (the server's --verify one-pass). On a
        batch-invariant pool mixing them would be exact too; not done yet (the draft-model gate's prefill
        phases were built around prompts passing alone: docs/batch-invariance.md)."""
        return self.fuse_rows > self.default_fuse_rows

    def score(self, works: Sequence[tuple[int, Forward]], prompts: Sequence["PromptPart"] = ()) -> list[np.ndarray]:
        """The logits of every row of each (sequence, pass), the passes fused into as few decodes as exactness
        allows; then the rows of `prompts` (only where `mixes_prompts`), whose `logits` get their last row's
        logits when it ends the prompt."""
        rows = [(w, i) for w, (_, f) in enumerate(works) for i in range(len(f.tokens))]
        rows += [(-1 - p, i) for p, part in enumerate(prompts) for i in range(len(part.tokens))]
        outs = [self._rows_buffer(seq, len(f.tokens)) for seq, f in works]
        trees: dict[int, list[TreeRow]] = {}
        if any(f.parents is not None for _, f in works):
            self.make_room(len(rows))
            trees = {w: self.open_tree(seq, f.tokens, f.parents) for w, (seq, f) in enumerate(works) if f.parents is not None}
        start = 0
        for size in chunk_sizes(len(rows), self.fuse_rows):
            part = rows[start : start + size]
            start += size
            seqs, tokens, want, places = [], [], [], []
            for w, i in part:
                if w >= 0:
                    seqs.append(works[w][0]), tokens.append(works[w][1].tokens[i]), want.append(True)
                    places.append(trees[w][i] if w in trees else None)
                else:
                    prompt = prompts[-1 - w]
                    seqs.append(prompt.seq), tokens.append(prompt.tokens[i]), places.append(None)
                    want.append(prompt.last and i == len(prompt.tokens) - 1)
            t0 = time.perf_counter()
            logits = self.decode(seqs, tokens, want, places if trees else None)
            for j, (w, i) in enumerate(row for row, wanted in zip(part, want) if wanted):
                if w >= 0:
                    outs[w][i] = logits[j]
                else:
                    prompts[-1 - w].logits = logits[j : j + 1].copy()
            self._record(size, time.perf_counter() - t0)
        return outs

    def last_rows(self, passes: Sequence[tuple[int, Sequence[int]]]) -> list[np.ndarray]:
        """The last row's logits of each (sequence, tokens) pass, all of them in shared decodes of up to n_batch
        rows: a draft model's passes (fused_last_rows), whose numerics do not change the output, so no
        exactness rule bounds the rows of a decode. Each row lands in its sequence's reply buffer (reused: a
        drafter is done with one pass's logits before its next pass), not in llama.cpp's, which the next
        decode overwrites while the round's other requests may still draft."""
        rows = [(p, i) for p, (_, tokens) in enumerate(passes) for i in range(len(tokens))]
        out: list[np.ndarray] = [None] * len(passes)  # type: ignore[list-item]
        for start in range(0, len(rows), self.n_batch):
            part = rows[start : start + self.n_batch]
            want = [i == len(passes[p][1]) - 1 for p, i in part]
            logits = self.decode([passes[p][0] for p, _ in part], [passes[p][1][i] for p, i in part], want)
            for j, (p, _) in enumerate(row for row, wanted in zip(part, want) if wanted):
                out[p] = self._rows_buffer(passes[p][0], 1)[0]
                out[p][:] = logits[j]
            self.shared_decodes += len({passes[p][0] for p, _ in part}) > 1
        return out

    shared_decodes: int = 0  # last_rows decodes that held passes of 2+ sequences

    def _rows_buffer(self, seq: int, n_rows: int) -> np.ndarray:
        """The sequence's reply rows, reused from step to step (its engine is done with them by its next pass)."""
        buf = self._row_buffers.get(seq)
        if buf is None or len(buf) < n_rows:
            buf = self._row_buffers[seq] = np.empty((n_rows, self.n_vocab), dtype=np.float32)
        return buf[:n_rows]

    def prefill_pass(self, seq: int, tokens: Sequence[int], last: bool) -> np.ndarray | None:
        """One prompt pass; the logits of its last row when `last` (a copy: the next decode overwrites them)."""
        logits = self.decode([seq] * len(tokens), tokens, [False] * (len(tokens) - 1) + [last])
        return logits.copy() if last else None


class PrefixSharing:
    """A finished request's prompt prefix kept in the pool for later prompts that start the same way, and
    shared with them (runners/prefix_cache.py keeps the books). A pool says how much of a prompt another
    prompt may share bit for bit (`shareable_prefix`, in whole `prefix_unit`s) and how its cells are
    shared (`_share`, `_keep`, `_forget`)."""

    prefixes: PrefixCache
    live: list[int]
    reserved: list[int]
    _prompts: list[np.ndarray | None]  # each sequence's prefilled prompt, cached when it leaves

    def drop(self, seq: int, from_pos: int) -> None:
        raise NotImplementedError

    def _open_prefixes(self, n_seqs: int, entry_ids: range) -> None:
        self.prefixes = PrefixCache(entry_ids)
        self._prompts = [None] * n_seqs

    @property
    def prefix_unit(self) -> int:
        return 1

    def shareable_prefix(self, n_tokens: int) -> int:
        """Leading tokens of an n-token prompt whose cells another prompt may share (at least one token is
        left to prefill: its logits are the reply)."""
        return max(0, n_tokens - 1)

    def adopt_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """Share the longest cached prefix of a prompt about to be prefilled on an empty `seq`; its length."""
        if not len(self.prefixes) or self.live[seq]:
            return 0
        prompt = np.asarray(tokens, dtype=np.int32)
        entry, length = self.prefixes.match(prompt)
        reused = self._whole_units(min(length, self.shareable_prefix(len(prompt))))
        self.prefixes.record_lookup(entry, reused)
        if reused <= 0:
            return 0
        self._share(entry.seq, seq, reused)
        self.live[seq] = reused
        return reused

    def remember_prompt(self, seq: int, tokens: Sequence[int]) -> None:
        """`seq` has prefilled `tokens` from position 0: worth caching when it leaves."""
        self._prompts[seq] = np.asarray(tokens, dtype=np.int32)

    def release(self, seq: int) -> None:
        """The sequence's request left (or was preempted): its prompt's shareable prefix is cached, its cells and
        reservation are freed."""
        self._cache_prompt(seq)
        self.drop(seq, 0)
        self.reserved[seq] = 0

    def _cache_prompt(self, seq: int) -> None:
        """Keep the leaving sequence's shareable prompt prefix as a cache entry (called before its cells go)."""
        prompt, self._prompts[seq] = self._prompts[seq], None
        if prompt is None or self.prefixes.capacity == 0:
            return
        keep = self._whole_units(min(self.shareable_prefix(len(prompt)), self.live[seq]))
        if keep <= 0:
            return
        store, redundant = self.prefixes.plan_store(prompt[:keep])
        if not store:
            return
        for entry in redundant:
            self.prefixes.remove(entry)
            self._forget(entry.seq)
        entry, evicted = self.prefixes.add(prompt[:keep])
        if evicted is not None:
            self._forget(evicted.seq)
        self._keep(seq, entry.seq, keep)

    def _whole_units(self, n: int) -> int:
        return n - n % self.prefix_unit

    def _share(self, entry_seq: int, seq: int, n: int) -> None:
        """Give `seq` the entry's first n cells."""
        raise NotImplementedError

    def _keep(self, seq: int, entry_seq: int, n: int) -> None:
        """Give the new entry the sequence's first n cells."""
        raise NotImplementedError

    def _forget(self, entry_seq: int) -> None:
        """The entry is gone: its cells go when nothing else holds them."""
        raise NotImplementedError


def fused_last_rows(passes: Sequence[DraftPass]) -> list[np.ndarray]:
    """The last row's logits of each draft model pass of a step's round (stepper.Stepper._draft): passes on
    sequences of one shared pool that decode at once (a server's draft pool, `decodes_at_once`) go together
    (FusedScoring.last_rows); any other runs alone. A sequence with nothing in its cells yet runs alone too:
    its first pass is a prompt, which may share a cached prefix (DirectSeqRunner.forward)."""
    out: list[np.ndarray] = [None] * len(passes)  # type: ignore[list-item]
    shared: dict[int, list[int]] = {}
    for i, p in enumerate(passes):
        runner = p.runner
        if getattr(runner, "decodes_at_once", False) and runner.n_past > 0 and isinstance(runner.pool, FusedScoring):
            shared.setdefault(id(runner.pool), []).append(i)
        else:
            out[i] = p.run()
    for group in shared.values():
        pool = passes[group[0]].runner.pool
        for i, logits in zip(group, pool.last_rows([(passes[i].runner.seq, passes[i].tokens) for i in group])):
            out[i] = logits
    return out


class SequenceView(Runner):
    """A request's target as its engine sees it: one sequence of a shared pool (llamacpp_pool.KvPool, or
    torch_pool.PagedPool). The engine's passes do not come here: its steps yield them (Engine.steps) and the
    stepper runs them fused with other requests' passes. Rollbacks drop the sequence's cells."""

    def __init__(self, pool, seq: int, n_ctx: int) -> None:
        self.pool, self.seq = pool, seq
        self.name = pool.base.name
        self.source = getattr(pool.base, "source", None)  # a TorchRunner has none
        self.n_ctx = n_ctx
        self.n_vocab = pool.n_vocab
        self.tokenizer = pool.base.tokenizer
        self.n_params = pool.base.n_params

    @property
    def n_past(self) -> int:
        return self.pool.live[self.seq]

    @property
    def cost_curve(self) -> str:
        return self.pool.base.cost_curve

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None, all_logits: bool = True) -> np.ndarray:
        raise RuntimeError("a pool sequence's passes run through the stepper (verispec/stepper.py)")

    def rollback(self, n_past: int) -> None:
        self.pool.drop(self.seq, n_past)

    @property
    def max_tree_leaves(self) -> int:
        return self.pool.tree_leaves

    def keep_path(self, path: Sequence[int]) -> None:
        self.pool.keep_path(self.seq, path)

    def reset(self) -> None:
        self.rollback(0)
