"""One KV cache for every request: a llama.cpp context with a sequence id per slot, and a Runner view per sequence.

(torch_pool.py is the same for a transformers target: paged KV blocks; pool.py holds what they share.)

Memory is one pool of `n_cells` KV cells shared by all requests, so it is sized for the tokens in
flight, not for context x slots; a request reserves the cells it can use at most when it is admitted
(`reserve`), and waits in the queue while they are not free. A server with a llama.cpp draft model
keeps a second pool of the same size for the draft (one sequence per slot, `DirectSeqRunner`), so
the draft's memory too is sized for the tokens in flight (vLLM #9995).

Exactness. llama.cpp's attention (flash attention on the CPU) visits a sequence's cells in cell
order and skips cells masked out for it; it is exact only when a sequence's later positions sit in
higher cells than its earlier ones (LLAMACPP.md, `LlamaCppRunner.keep_path`). llama.cpp hands out
the lowest free cell from its search head, so a cell freed by one request's rollback could receive
another request's next token below that request's earlier cells. The pool therefore never frees a
cell while others may sit above it: rolled-back and finished cells are *parked* (given to the park
sequence, which nothing attends to), so every decoded token lands above all occupied cells. When
the cells run out, `compact()` copies each live sequence out (`llama_state_seq_get_data`), clears
the cache and writes them back, packed and in order. The bytes are copied verbatim, so compaction
changes no logit.

Single-row decodes. With verispec's build of llama.cpp, one-row passes never split the KV range
(llama_lib.py, `init_backend`), and nothing below applies: no row is padded. Without it (a llama-cpp-python built without verispec's patch), ggml's CPU flash attention splits the KV range across threads for a batch of
one query row once 512+ cells are in view (its "split-KV" path), and the split points depend on
where the cells lie, so such a row is not reproducible across cache layouts; batches of 2+ rows
visit the cells in order on one thread per row. So once the view reaches 512 cells, a one-row
decode gets a dummy second row (on its own sequence, no logits, removed at once) *unless its
sequence is alone and packed* (no other request's cells, nothing parked): that layout is a solo
run's, and the row is decoded exactly as plain llama.cpp decodes it, at full speed (a dummy row
costs T(2)/T(1) ~ 1.5x per token). A request's rows are then equal to its rows alone on the server
while its context holds <= 256 tokens; beyond, they can differ at near-ties, as plain llama.cpp's
one-row passes differ from its own multi-row passes there (see the report in the README). A draft
model's pool never pads (`pad_single_rows=False`): draft numerics do not change greedy output.

Batch invariance. On verispec's build of llama.cpp (build-support/ggml-batch-invariant.patch) every
decode of up to 64 rows gives each row the bits it gets alone, whatever shares the decode and wherever
its cells lie (tests/test_long_context.py, tests/test_kernels.py). The pool then fuses up to 64 rows per
decode, prefills prompts in passes of any size up to 64, and shares any common prefix: every cell
holds the bits a token-by-token run would give it. The rules below (3-row decodes, prompt passes in
groups of 4) are for a build without the patch (llama_lib.exact_pass_rows).

Prompts. A prompt row's keys, values and logits depend on the passes it is prefilled in, as ggml
picks kernels by the rows of a decode. Measured on the Qwen2.5-Coder 1.5B and 0.5B Q4_K_M files
with 2 threads (tests/test_long_context.py), a prompt gets the same bits in every layout of passes
that (a) stay under 64 rows: 64+ take ggml's tiled flash attention, whose sums depend on where the
cells lie (a 72-token prompt prefilled above another request's cells was ~1 apart in logits);
(b) start at multiples of 4 from position 0: the repacked Q4_K/Q6_K matmul computes rows in groups
of 4 and a pass's last 1-3 rows with another kernel; and (c) hold at least 8 rows: passes of 4-7
rows took other kernels again (logits up to 16 apart). Within those rules the pass sizes are free,
so `prompt_pass` sizes each pass to the stepper's budget: a long prompt is prefilled 8 rows at a
time while others decode and 60 at a time alone, and its output is the same. The price of (a):
a server prompt is not computed as a solo llama.cpp runner computes it (512-row passes), so for
prompts of 64+ tokens its output equals itself alone on the server bit for bit, and a solo
runner's only up to near-ties; and prefill is slower than in 512-row passes.

Prefix cache. When a request leaves, the cells of its prompt's leading rows, in whole groups of 4, stay in
the pool under a sequence id of the prefix cache (prefix_cache.py; `llama_memory_seq_cp` only
tags the cells, nothing is copied). A later prompt that starts with the same tokens shares those
cells and prefills from there, at least 8 rows (`shareable_prefix`). The shared cells were computed
under the same rules, on the same tokens at the same positions, as its own prefill would have
computed them, so a hit changes no logit: output with a hit is token for token the output
without one. Cached cells are never freed while others may sit above them: an evicted entry's
cells are parked. A compaction keeps the most recently used entries that fit in the cells no
admitted request has reserved and drops the rest, so the cache never keeps a request waiting.
A draft model's pool (`exact_prefixes=False`) may share any common prefix: draft numerics do not
change the output. So may a pool past exactness (`mixes_prompts`, the server's --verify one-pass), where
nothing is bit-identical to a solo run: a prompt then prefills only what it does not share, down to its
last token.

Token trees (the server's --tree). A slot owns `tree_leaves` sequence ids for a tree's leaves. A tree
pass tags them on the request's committed cells (`llama_memory_seq_cp`: nothing is copied) and decodes
each node with the ids of the leaves below it, at the sequence's next position plus its depth, as
`LlamaCppRunner` runs trees: a node attends to its ancestors and the committed cells, in cell order,
in rows fused like any others (at most `fuse_rows` per decode), so a node on the accepted path gets the bits its
row gets in a chain. `keep_path` keeps the path in place when it is the tree's leading nodes (they were
decoded first, so they lie below the rest) and decodes it again as a chain otherwise; the other
nodes' cells are parked (freed when the sequence is alone and packed). The pool compacts, if it
must, before a tree opens (`make_room`), never while one is open.

Preemption. The pool remembers the token of every cell of a sequence, so `preempt` can free a
sequence's cells (parked until the next compaction; its prompt's prefix goes to the prefix cache)
and `resume` can decode them again: the prompt in prompt passes, the generated tokens in chunks of
at most `default_fuse_rows` rows. Both rules give every row the bits it had (see Prompts, and FusedScoring),
so a resumed request goes on exactly as if it had never left.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidParameter
from ..llama_lib import FALLBACK_EXACT_ROWS, decode, exact_pass_rows
from ..token_tree import leaf_sequences, tree_depths
from .llamacpp import ZERO_KV_BUFFERS, LlamaCppRunner, open_context
from .pool import (FusedScoring, PoolFull, Preempted, PrefixSharing, ReservationExceeded, SequenceView,  # noqa: F401
                   TreeRow, chunk_sizes)  # (PoolFull: raised here)

LLAMA_MAX_SEQ = 256  # sequence ids one llama.cpp context can hold (llama-cparams.h)


class KvPool(PrefixSharing, FusedScoring):
    """The shared context. Not thread-safe: one thread drives it (the server's scheduler thread)."""

    # On a build that is not batch-invariant (llama_lib.exact_pass_rows() == 3), the prompt pass rules of the
    # docstring: under 64 rows, starting at multiples of 4, at least 8 rows. On verispec's batch-invariant build
    # every pass of up to 64 rows gives each row its one-row bits, so any pass size and start will do.
    prefill_rows = 63  # the most rows of a pass: 64+ take the tiled flash attention
    row_group = 4  # the repacked matmul's group of rows: every pass but a prompt's last is whole groups
    min_prompt_pass = 8  # passes of 4-7 rows take other kernels

    def __init__(self, base: LlamaCppRunner, n_cells: int, n_seqs: int, n_batch: int = 512,
                 pad_single_rows: bool | None = None,
                 prefix_entries: int = 0, exact_prefixes: bool = True, tree_leaves: int = 0) -> None:
        import llama_cpp as L

        self._L = L
        self.base = base
        self.n_seqs = n_seqs
        self.park = n_seqs  # the sequence holding cells nobody attends to any more
        self.pad = n_seqs + 1  # the dummy second row of a one-row decode
        if n_seqs + 2 + prefix_entries > LLAMA_MAX_SEQ:
            raise InvalidParameter(f"{n_seqs} slots and {prefix_entries} cached prefixes exceed llama.cpp's "
                                   f"{LLAMA_MAX_SEQ} sequences per context", "prefix_cache")
        self._open_prefixes(n_seqs, range(n_seqs + 2, n_seqs + 2 + prefix_entries))
        self.tree_leaves = _tree_leaves(tree_leaves, n_seqs, prefix_entries)
        self._leaf_ids = n_seqs + 2 + prefix_entries  # slot s's leaves: the tree_leaves ids from here + s * tree_leaves
        self._trees: dict[int, _OpenTree] = {}
        self.trees = 0  # tree passes decoded
        self.tree_redecodes = 0  # accepted paths that were not the tree's leading nodes (keep_path)
        self.exact_prefixes = exact_prefixes
        n_seq_max = self._leaf_ids + n_seqs * self.tree_leaves
        self._ctx = open_context(base._model, n_ctx=n_cells, n_batch=n_batch, n_seq_max=n_seq_max,
                                 n_threads=base.n_threads)
        if not self._ctx:
            raise InvalidParameter(f"llama.cpp could not create a KV pool of {n_cells} cells", "kv_pool")
        self._mem = L.llama_get_memory(self._ctx)
        self.n_cells = L.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self.default_fuse_rows = exact_pass_rows()  # rows per decode that stay bit-identical to one-row passes
        self.rows_invariant = self.default_fuse_rows > FALLBACK_EXACT_ROWS
        if self.rows_invariant:
            self.prefill_rows, self.row_group, self.min_prompt_pass = self.default_fuse_rows, 1, 1
        self.pass_rows = min(self.prefill_rows, n_batch)  # rows per prompt pass; a stepper may set fewer, once
        self.fuse_rows = self.default_fuse_rows
        self.pass_seconds: dict[int, float] = {}
        self.rows_per_decode: list[int] = []
        self._row_buffers: dict[int, np.ndarray] = {}
        self.n_vocab = base.n_vocab
        self._batch = L.llama_batch_init(n_batch + 1, 0, max(1, self.tree_leaves))
        self.bump = 0  # cells handed out since the last compaction; every cell below it is occupied
        self.live = [0] * n_seqs  # committed tokens per sequence
        self.history: list[list[int]] = [[] for _ in range(n_seqs)]  # the token of each, for preemption
        self.reserved = [0] * n_seqs
        self.compactions = 0
        self.decodes = 0
        self.padded = 0  # one-row decodes that got a dummy row
        self.recomputed = 0  # cells decoded again by resume()
        # With verispec's build (llama_lib.py, init_backend) a one-row decode never takes upstream's split-KV path.
        self.pad_single_rows = (not base.exact_attention) if pad_single_rows is None else pad_single_rows

    # -- cells ------------------------------------------------------------------------------------

    def release(self, seq: int) -> None:
        self._close_tree(seq, kept=0)
        super().release(seq)
        if not any(self.live) and not len(self.prefixes):  # idle: start again from cell 0, as a solo run does
            self._L.llama_memory_clear(self._mem, ZERO_KV_BUFFERS)
            self.bump = 0

    # -- prompts and the prefix cache -------------------------------------------------------------

    def prompt_pass(self, done: int, n_tokens: int, budget: int) -> int:
        """About `budget` rows in whole groups of 4, at least 8, at most `pass_rows`, never leaving a last pass
        of under 8 rows; a prompt that fits in one pass goes whole. (The rules: see the docstring.)"""
        left = n_tokens - done
        group, least = self.row_group, self.min_prompt_pass
        size = max(least, min(budget, self.pass_rows) // group * group)
        if left <= size:
            return left
        if left - size >= least:
            return size
        if left <= min(self.prefill_rows, self.n_batch):
            return left
        return size - group

    @property
    def _exact_prompts(self) -> bool:
        """Whether a shared prefix must hold the bits the prompt's own prefill would compute. Not on a draft pool
        (`exact_prefixes=False`), nor once prompt rows ride in scoring decodes (`mixes_prompts`, --verify
        one-pass): nothing is bit-identical to a solo run there, and any common prefix is shared. Nor on a
        batch-invariant pool, where every cell holds its token-by-token bits however it was prefilled."""
        return self.exact_prefixes and not self.mixes_prompts and not self.rows_invariant

    @property
    def prefix_unit(self) -> int:
        return self.row_group if self._exact_prompts else 1

    def shareable_prefix(self, n_tokens: int) -> int:
        """Leading prompt tokens whose cells another prompt's prefill would compute bit for bit the same: whole
        groups of 4, leaving at least 8 rows (so that the prompt's own passes keep to the rules too)."""
        if not self._exact_prompts:
            return super().shareable_prefix(n_tokens)
        return max(0, n_tokens - self.min_prompt_pass) // self.row_group * self.row_group

    def adopt_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        reused = super().adopt_prefix(seq, tokens)
        self.history[seq] = list(tokens[:reused])
        return reused

    def _share(self, entry_seq: int, seq: int, n: int) -> None:
        self._L.llama_memory_seq_cp(self._mem, entry_seq, seq, 0, n)  # tags the cells: nothing is copied

    def _keep(self, seq: int, entry_seq: int, n: int) -> None:
        self._L.llama_memory_seq_cp(self._mem, seq, entry_seq, 0, n)

    def _forget(self, entry_seq: int) -> None:
        self._park(entry_seq)

    def _park(self, seq: int) -> None:
        """Hand all of `seq`'s cells to the park sequence (they stay occupied, see the docstring)."""
        self._L.llama_memory_seq_cp(self._mem, seq, self.park, 0, -1)
        self._L.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def drop(self, seq: int, from_pos: int) -> None:
        """Forget positions >= from_pos of `seq`, parking their cells.

        A sequence alone and packed in the pool frees them instead: they are the top cells, so the
        next tokens land in them again, in order, as after a solo runner's rollback.
        """
        self._close_tree(seq, kept=0)  # a tree pass that failed is taken back whole
        if from_pos >= self.live[seq]:
            return
        alone = self.bump == self.live[seq] and not len(self.prefixes)
        if not alone:
            self._L.llama_memory_seq_cp(self._mem, seq, self.park, from_pos, -1)
        self._L.llama_memory_seq_rm(self._mem, seq, from_pos, -1)
        self.live[seq] = from_pos
        del self.history[seq][from_pos:]
        if alone:
            self.bump = from_pos

    def compact(self) -> None:
        """Copy the live sequences out, clear every cell (parked ones too), copy them back packed; then the
        most recently used cached prefixes that fit in the cells no admitted request has reserved."""
        saved = [(seq, self._save(seq)) for seq in range(self.n_seqs) if self.live[seq]]
        room = self.n_cells - sum(max(r, n) for r, n in zip(self.reserved, self.live))
        kept = []
        for entry in self.prefixes.most_recent_first():
            if len(entry.tokens) <= room:
                room -= len(entry.tokens)
                kept.append((entry, self._save(entry.seq)))
        self._L.llama_memory_clear(self._mem, ZERO_KV_BUFFERS)
        for seq, state in saved + [(entry.seq, state) for entry, state in kept]:
            self._restore(seq, state)
        self.prefixes.keep_only([entry for entry, _ in kept])
        self.bump = sum(self.live) + sum(len(entry.tokens) for entry, _ in kept)
        self.compactions += 1

    # -- token trees -------------------------------------------------------------------------------

    def open_tree(self, seq: int, tokens: Sequence[int], parents: Sequence[int]) -> list[TreeRow]:
        """As LlamaCppRunner runs a tree: leaf k of the tree gets a sequence id of the slot's own, tagged on the
        sequence's committed cells (nothing is copied), and each node carries the ids of the leaves below it."""
        if not self.tree_leaves:
            return super().open_tree(seq, tokens, parents)
        node_leaves = leaf_sequences(parents)
        n_leaves = max(max(ids) for ids in node_leaves)
        if n_leaves > self.tree_leaves:
            raise ValueError(f"the tree has {n_leaves} leaves; this pool holds {self.tree_leaves} per sequence")
        first = self._leaf_ids + seq * self.tree_leaves - 1  # leaf k (from 1) is sequence first + k
        ids = [tuple(first + k for k in node) for node in node_leaves]
        for k in range(1, n_leaves + 1):
            self._L.llama_memory_seq_cp(self._mem, seq, first + k, -1, -1)
        base = self.live[seq]
        self.trees += 1
        self._trees[seq] = _OpenTree(list(tokens), ids, range(first + 1, first + n_leaves + 1))
        return [TreeRow(node_ids, base + int(depth)) for node_ids, depth in zip(ids, tree_depths(parents))]

    def make_room(self, n_rows: int) -> None:
        """Compact now if n_rows (and a dummy row) could outgrow the cells: not while a tree's leaves are tagged."""
        if not self._trees and self.bump + n_rows + 1 > self.n_cells:
            self.compact()

    def keep_path(self, seq: int, path: Sequence[int]) -> None:
        """Commit a root-to-node path of the tree; park (or, alone, free) the other nodes' cells.

        As in `LlamaCppRunner.keep_path`, the kept cells must lie below every later cell of the sequence: a
        path of the tree's leading nodes 0..m-1 does (they were decoded first, in order) and is kept where it
        is; any other path is decoded again as a chain, in exact chunks, so its cells get the
        bits a chain's decode gives them."""
        tree = self._trees.get(seq)
        if tree is None:
            raise RuntimeError("keep_path() needs a tree pass first")
        path = list(path)
        kept = len(path) if path == list(range(len(path))) else 0
        if kept:
            base = self.live[seq]
            self._L.llama_memory_seq_cp(self._mem, tree.ids[kept - 1][0], seq, base, base + kept)
            self.live[seq] += kept
            self.history[seq].extend(tree.tokens[:kept])
        self._close_tree(seq, kept)
        if kept or not path:
            return
        self.tree_redecodes += 1
        self._decode_chain(seq, [tree.tokens[i] for i in path])

    def _close_tree(self, seq: int, kept: int) -> None:
        """Untag the tree's leaf sequences; its nodes past the `kept` leading ones are parked, or freed when the
        sequence is alone and packed (they are then the top cells, as after a solo runner's tree)."""
        tree = self._trees.pop(seq, None)
        if tree is None:
            return
        base = self.live[seq] - kept  # the tree's root position
        alone = self.bump == base + len(tree.tokens) and not len(self.prefixes)
        shared = {leaf: 0 for leaf in tree.leaves}  # leading kept nodes on each leaf's path
        for node in range(kept):
            for leaf in tree.ids[node]:
                shared[leaf] = node + 1
        for leaf in tree.leaves:
            if not alone:
                self._L.llama_memory_seq_cp(self._mem, leaf, self.park, base + shared[leaf], -1)
            self._L.llama_memory_seq_rm(self._mem, leaf, -1, -1)
        if alone:
            self.bump = base + kept

    # -- preemption ---------------------------------------------------------------------------------

    preemptible = True

    def preempt(self, seq: int) -> Preempted:
        prompt = self._prompts[seq]
        saved = Preempted(len(self.history[seq]), None if prompt is None else len(prompt), tokens=list(self.history[seq]))
        self.release(seq)  # caches the prompt's shareable prefix: resume() may share it back
        return saved

    def resume(self, seq: int, saved: Preempted) -> None:
        """The prompt in prompt passes (after what the prefix cache still holds), the generated tokens in
        exact chunks: each row as it was first decoded (see the docstring)."""
        if saved.prompt_len is None:
            return  # its prompt was not done: the stepper prefills it again
        tokens, prompt_len = saved.tokens, saved.prompt_len
        done = self.adopt_prefix(seq, tokens[:prompt_len])
        self.recomputed += len(tokens) - done
        while done < prompt_len:
            size = self.prompt_pass(done, prompt_len, self.pass_rows)
            self.decode([seq] * size, tokens[done : done + size], [False] * (size - 1) + [True])
            done += size
        self.remember_prompt(seq, tokens[:prompt_len])
        self._decode_chain(seq, tokens[prompt_len:])

    def _decode_chain(self, seq: int, tokens: Sequence[int]) -> None:
        """Append generated tokens to `seq` again, in chunks of exact rows: the bits a scoring pass gave them."""
        done = 0
        for size in chunk_sizes(len(tokens), self.default_fuse_rows):
            self.decode([seq] * size, tokens[done : done + size], [True] * size)  # rows out change no cell
            done += size

    def _save(self, seq: int):
        size = self._L.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        return buf, self._L.llama_state_seq_get_data(self._ctx, buf, size, seq)

    def _restore(self, seq: int, state) -> None:
        buf, size = state
        if self._L.llama_state_seq_set_data(self._ctx, buf, size, seq) != size:
            raise RuntimeError(f"llama.cpp could not restore sequence {seq} while compacting the KV pool")

    # -- decoding ----------------------------------------------------------------------------------

    def decode(self, seqs: Sequence[int], tokens: Sequence[int], want: Sequence[bool],
               places: Sequence[TreeRow | None] | None = None) -> np.ndarray:
        """One llama_decode. Row i appends tokens[i] to seqs[i] at its next position, or decodes a tree node where
        places[i] says (open_tree); returns the wanted rows."""
        n = len(tokens)
        if n > self.n_batch:
            raise ValueError(f"{n} rows exceed the pool's batch size {self.n_batch}")
        pad = self._needs_pad(seqs)
        if self.bump + n + pad > self.n_cells:
            if self._trees:
                raise RuntimeError("the KV pool cannot compact while a token tree is open (make_room first)")
            self.compact()
            pad = self._needs_pad(seqs)
            if self.bump + n + pad > self.n_cells:
                raise PoolFull(f"the KV pool of {self.n_cells} cells is full ({self.bump} live)")
        b = self._batch
        b.n_tokens = n + pad
        for i, (seq, tok, flag) in enumerate(zip(seqs, tokens, want)):
            place = places[i] if places is not None else None
            if place is not None:
                self._put(i, tok, place.pos, place.seq_ids, flag)
                continue
            self._put(i, tok, self.live[seq], (seq,), flag)
            self.live[seq] += 1
            self.history[seq].append(tok)
        if pad:  # last, so that its cell is the highest one and freeing it keeps the cells ordered
            self._put(n, tokens[0], 0, (self.pad,), False)
        status = decode(self._ctx, b)
        if pad:
            self._L.llama_memory_seq_rm(self._mem, self.pad, -1, -1)
            self.padded += 1
        if status != 0:
            self._take_back(b, n, seqs, places)
            raise RuntimeError(f"llama_decode failed with status {status} in the KV pool")
        self.bump += n
        self.decodes += 1
        n_out = sum(bool(w) for w in want)
        return np.ctypeslib.as_array(self._L.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))

    def _take_back(self, b, n: int, seqs: Sequence[int], places: Sequence[TreeRow | None] | None) -> None:
        """A failed decode's rows leave no trace: their cells are freed (llama.cpp may have kept some) and each
        chain row's sequence is as long as before. The cells were above `bump`, so freeing them keeps the order."""
        for i in range(n):
            for j in range(b.n_seq_id[i]):
                self._L.llama_memory_seq_rm(self._mem, b.seq_id[i][j], b.pos[i], b.pos[i] + 1)
        for i, seq in reversed(list(enumerate(seqs))):
            if places is None or places[i] is None:
                self.live[seq] -= 1
                self.history[seq].pop()

    def _put(self, i: int, token: int, pos: int, seq_ids: Sequence[int], want: bool) -> None:
        b = self._batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, len(seq_ids), int(want)
        for j, seq in enumerate(seq_ids):
            b.seq_id[i][j] = seq

    def _needs_pad(self, seqs: Sequence[int]) -> bool:
        """A one-row decode on the split-KV path, with other cells than its own packed sequence's in the pool?"""
        if len(seqs) != 1 or not self.pad_single_rows or not self._split_kv(self.bump + 2):
            return False
        return self.bump != self.live[seqs[0]]  # bump counts every handed-out cell: others' and parked ones too

    def _split_kv(self, used: int) -> bool:
        """Would a one-row decode take ggml's split-KV attention path? (view = used cells padded to 256, >= 512)"""
        return min(self.n_cells, -(-used // 256) * 256) >= 512

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._L.llama_batch_free(self._batch)
            self._L.llama_free(self._ctx)
            self._ctx = None


@dataclass
class _OpenTree:
    """A tree decoded on a sequence and not yet resolved by keep_path."""

    tokens: list[int]
    ids: list[tuple[int, ...]]  # each node's sequence ids: those of the leaves below it
    leaves: range  # the leaf sequences it tags


def _tree_leaves(wanted: int, n_seqs: int, prefix_entries: int) -> int:
    """Leaf sequence ids per slot: `wanted`, or as many as llama.cpp's sequences per context leave (at least 2)."""
    if wanted <= 0:
        return 0
    fit = (LLAMA_MAX_SEQ - n_seqs - 2 - prefix_entries) // n_seqs
    if fit < 2:
        raise InvalidParameter(f"token trees need 2+ sequence ids per slot: {n_seqs} slots and {prefix_entries} cached "
                               f"prefixes leave {max(fit, 0)} of llama.cpp's {LLAMA_MAX_SEQ} (lower --max-batch or "
                               "--prefix-cache)", "tree")
    return min(wanted, fit)


class DirectSeqRunner(SequenceView):
    """A request's draft model on one sequence of the draft pool. A pass called here decodes at once (a prompt
    shares a cached prefix where it can); while drafting, the server's stepper gathers the passes of all
    drafting requests and runs each round of them in one decode (pool.fused_last_rows)."""

    decodes_at_once = True

    def check_fits(self, n_tokens: int) -> None:
        super().check_fits(n_tokens)
        if n_tokens + self.n_past > self.pool.reserved[self.seq]:
            raise ReservationExceeded(f"the request outgrew its {self.pool.reserved[self.seq]} reserved draft KV cells")

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None, all_logits: bool = True) -> np.ndarray:
        """Batches of n_batch, as a solo runner's; the rows are copied (the next pass overwrites llama.cpp's buffer)."""
        if parents is not None:
            raise InvalidParameter("token trees are not supported on the shared KV pool", "tree_width")
        tokens = list(tokens)
        self.check_fits(len(tokens))
        rows, start = [], 0
        prompt = self.n_past == 0 and not all_logits
        if prompt:
            start = self.pool.adopt_prefix(self.seq, tokens)
        for start in range(start, len(tokens), self.pool.n_batch):
            part = tokens[start : start + self.pool.n_batch]
            want = [all_logits] * (len(part) - 1) + [all_logits or start + len(part) == len(tokens)]
            rows.append(self.pool.decode([self.seq] * len(part), part, want).copy())
        if prompt:
            self.pool.remember_prompt(self.seq, tokens)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)
