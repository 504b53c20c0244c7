"""One KV cache for every request on a transformers target: paged blocks, the torch counterpart of
llamacpp_pool.KvPool (runners.open_pool).

Memory. Per layer, keys and values live in [n_blocks, BLOCK, n_kv_heads, head_dim] tensors (the
model's dtype) allocated once for the pool's cells. A sequence holds a table of blocks taken from a
free list as it grows and given back by `drop` / `release`, so the blocks in use follow the tokens
in flight; rollback is a position change (nothing is copied, nothing compacted: `compactions` stays
0). Free blocks are handed out lowest first and the tensors are allocated uninitialised, so the
pages the OS actually backs stay close to the peak of tokens in flight.

A decode is one model forward over all its rows (batch 1, rows flattened, explicit position_ids, no
transformers cache). The attention is ours (`paged_attention`, registered in transformers'
AttentionInterface, with an AttentionMaskInterface entry that builds no mask): per sequence, it
writes the new rows' keys/values into the sequence's cells and attends over that sequence's cells
only, causally inside its new rows. The per-decode plan reaches it as a model kwarg
(`verispec_plan`): the Llama/Qwen2/Mistral-style modeling code passes **kwargs from the causal LM
down to the attention function. The model's attention implementation is switched to ours only for
the forward, under the pool's lock, by setting `config._attn_implementation` (~40 us per decode for
the switch and back; `set_attn_implementation` costs ~180 us, walks the modules and logs), so the
module stays usable by a solo TorchRunner between decodes; nothing else runs the target module
while the server's pool decodes. Every decode checks that each layer ran our attention with the
plan, and a probe decode at construction turns a model that does not (no kwargs forwarding, no
AttentionInterface) into `PoolUnsupported` instead of wrong logits.

Exactness. torch's CPU linear (fp32) computes each row bit-identically whatever the other rows only
when the number of rows is a multiple of some block size, which depends on the CPU and the weight's
shape: 4 on the AVX2 machines this was written on; on an AVX-512/AMX Xeon, 8 for 64x128 weights and
16 for 576x1536 and larger. So the pool measures it at construction (`row_multiple`: the smallest of
ROW_MULTIPLES at which every linear of the model gives each row the same bits in 1-3 blocks) and
every decode is padded to a multiple of it with
dummy rows (token 0 at position 0, attending only to themselves, never cached; counted in
`padded`), and so are the rows given to the lm_head. Attention is per sequence, so a request's
logits are bit-identical whether its rows are decoded alone or fused with other requests' rows
(tests/test_paged_pool.py, which fails without the padding). Hence `default_fuse_rows` = n_batch:
a step's scoring rows go into one forward, where llama.cpp's pool is exact only up to 3 rows per
decode. (FusedScoring splits a step's rows only beyond n_batch rows; a request split across two
decodes would attend in two segments and could differ in rounding.)

Preemption (KV on demand in the server's scheduler) swaps a sequence's cells out and back rather than
decoding them again; see `preempt` for why.

Not supported (`PoolUnsupported` at construction, serve with --kv-pool 0): sliding-window or other
non-full attention layers (Gemma 2/3, Mistral v0.1), attention logit soft-capping, attention sinks.
Trees: chains only. `runners.open_pool(trees=True)` raises PoolUnsupported, and the server gives each
slot a context of its own instead (context_pool.py), where trees run.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .device_memory import GiB, MiB, InsufficientMemory, available_bytes
from .pool import FusedScoring, PoolFull, PoolUnsupported, Preempted, PrefixSharing

if TYPE_CHECKING:
    import torch

    from .torch import TorchRunner

BLOCK = 16  # cells per block
ROW_MULTIPLES = (4, 8, 16, 32, 64)  # candidate paddings of a decode's rows, measured per model (see Exactness)
ATTN = "verispec_paged"  # our key in transformers' AttentionInterface and AttentionMaskInterface
PLAN = "verispec_plan"  # the model kwarg carrying the _Plan
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux")  # attention features the pool does not implement


@dataclass
class _Segment:
    """One sequence's rows [start, stop) of a decode: they attend to `cells` (the sequence's past, then themselves)."""

    start: int
    stop: int
    cells: torch.Tensor  # cell of each position 0 .. past + rows - 1
    mask: torch.Tensor | None  # bool [rows, past + rows], causal inside the new rows; None for one row


@dataclass
class _Plan:
    """What the attention needs for one decode; built once, read by every layer."""

    keys: list[torch.Tensor]  # per layer: [cells, n_kv_heads, head_dim] views of the pool
    values: list[torch.Tensor]
    rows: int  # real rows; the padding rows follow them
    writes: torch.Tensor  # cell of each real row
    segments: list[_Segment]
    calls: int = 0  # layers that ran paged_attention


class PagedPool(PrefixSharing, FusedScoring):
    """The shared paged cache of a TorchRunner's model. Not thread-safe: one thread drives it (the server's
    scheduler thread)."""

    block_size = BLOCK

    def __init__(self, base: TorchRunner, n_cells: int, n_seqs: int, n_batch: int = 512, prefix_entries: int = 0) -> None:
        import torch

        from ..runners.torch import kv_shape

        self._torch = torch
        self.base = base
        self.model = base.model
        config = self.model.config
        reason = unsupported(config)
        if reason:
            raise PoolUnsupported(f"{base.name} cannot share a paged KV pool: {reason} (serve with --kv-pool 0)",
                                  "kv_pool")
        self.n_layers, n_kv, head_dim = kv_shape(config)
        n_blocks = -(-n_cells // BLOCK)
        self.n_cells = n_blocks * BLOCK
        check_memory(self.n_cells, base.kv_bytes_per_token(), base.name, available_bytes(base.device))
        shape = (n_blocks, BLOCK, n_kv, head_dim)
        self._keys = [torch.empty(shape, dtype=base.dtype, device=base.device) for _ in range(self.n_layers)]
        self._values = [torch.empty(shape, dtype=base.dtype, device=base.device) for _ in range(self.n_layers)]
        self._free = list(range(n_blocks))  # a heap: the lowest free block first
        self._refs = [0] * n_blocks  # sequence tables and cached prefixes holding each block
        self._tables: list[list[int]] = [[] for _ in range(n_seqs)]  # blocks of each sequence, in position order
        self._cells = [self._cells_of([]) for _ in range(n_seqs)]  # cell of each position the blocks can hold
        self.n_seqs = n_seqs
        self.n_batch = n_batch
        self.default_fuse_rows = n_batch  # rows are batch-invariant at any count (see Exactness)
        self.prefill_rows = n_batch  # and so are prompt rows, whatever the cell layout
        self.pass_rows = n_batch  # rows per prompt pass; a stepper may set fewer, once
        self.fuse_rows = self.default_fuse_rows
        self.pass_seconds: dict[int, float] = {}
        self.rows_per_decode: list[int] = []
        self._row_buffers: dict[int, np.ndarray] = {}
        self.n_vocab = base.n_vocab
        self.live = [0] * n_seqs  # committed tokens per sequence
        self.reserved = [0] * n_seqs
        self.compactions = 0
        self.decodes = 0
        self.padded = 0  # dummy rows added to reach a multiple of row_multiple
        self.swapped_out = 0  # cells preempt() copied out (and resume() back)
        self.row_multiple = row_multiple(self.model)
        self._open_prefixes(n_seqs, range(prefix_entries))
        self._entry_blocks: dict[int, list[int]] = {}  # the blocks of each cached prefix
        _register()
        self._probe()

    # -- cells ------------------------------------------------------------------------------------

    def reserved_cells(self, n: int) -> int:
        return _round_up(n, BLOCK)  # a reservation takes whole blocks

    def used_cells(self) -> int:
        """Cells of the blocks sequences and cached prefixes hold now, rounded up to blocks."""
        return self.n_cells - len(self._free) * BLOCK

    def cached_cells(self) -> int:
        """Cells of blocks only cached prefixes hold (given back whenever a sequence needs them)."""
        return BLOCK * sum(1 for blocks in self._entry_blocks.values() for b in blocks if self._refs[b] == 1)

    def reserved_cells(self, n: int) -> int:
        return _round_up(n, BLOCK)  # a reservation takes whole blocks
    # -- the prefix cache: whole blocks of finished prompts, shared by reference ---------------------

    prefix_unit = BLOCK
    # Any whole blocks of a prompt are shareable (PrefixSharing.shareable_prefix): rows are batch-invariant
    # here, so a token's keys and values do not depend on the rows it was decoded with, and attention reads
    # a sequence's cells by position, wherever they lie.

    def _share(self, entry_seq: int, seq: int, n: int) -> None:
        self._tables[seq] = self._ref(self._entry_blocks[entry_seq][: n // BLOCK])
        self._cells[seq] = self._cells_of(self._tables[seq])

    def _keep(self, seq: int, entry_seq: int, n: int) -> None:
        self._entry_blocks[entry_seq] = self._ref(self._tables[seq][: n // BLOCK])

    def _forget(self, entry_seq: int) -> None:
        self._unref(self._entry_blocks.pop(entry_seq))

    def _evict_for(self, n_blocks: int) -> None:
        """Drop least recently used prefixes until `n_blocks` blocks are free (or none is left)."""
        while len(self._free) < n_blocks and len(self.prefixes):
            entry = self.prefixes.most_recent_first()[-1]
            self.prefixes.remove(entry)
            self.prefixes.evictions += 1
            self._forget(entry.seq)

    def _ref(self, blocks: list[int]) -> list[int]:
        """One more holder of each block; returns them (a new list)."""
        for block in blocks:
            self._refs[block] += 1
        return list(blocks)

    def _unref(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                heapq.heappush(self._free, block)

    def _take(self, n: int) -> list[int]:
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    # -- blocks -------------------------------------------------------------------------------------

    def drop(self, seq: int, from_pos: int) -> None:
        """Forget positions >= from_pos of `seq`; blocks left empty go back to the free list. A kept partial
        block that a cached prefix shares is copied first: the sequence writes its next tokens into it."""
        self.live[seq] = min(self.live[seq], from_pos)
        self._trim(seq)
        table = self._tables[seq]
        if self.live[seq] % BLOCK and self._refs[table[-1]] > 1:
            self._evict_for(1)
            (fresh,) = self._take(1)
            for keys, values in zip(self._keys, self._values):
                keys[fresh], values[fresh] = keys[table[-1]], values[table[-1]]
            self._unref([table[-1]])
            table[-1] = fresh
            self._cells[seq] = self._cells_of(table)

    def _grow(self, rows: dict[int, list[int]]) -> None:
        """Give each sequence the blocks its new rows need, or raise PoolFull before changing anything."""
        need = {seq: -(-(self.live[seq] + len(r)) // BLOCK) - len(self._tables[seq]) for seq, r in rows.items()}
        total = sum(max(0, n) for n in need.values())
        self._evict_for(total)
        if total > len(self._free):
            raise PoolFull(f"the KV pool of {self.n_cells} cells is full ({self.used_cells()} in use)")
        for seq, n in need.items():
            if n > 0:
                self._tables[seq] += self._take(n)
                self._cells[seq] = self._cells_of(self._tables[seq])

    def _trim(self, seq: int) -> None:
        keep = -(-self.live[seq] // BLOCK)
        table = self._tables[seq]
        if len(table) > keep:
            self._unref(table[keep:])
            del table[keep:]
            self._cells[seq] = self._cells_of(table)

    def _cells_of(self, table: list[int]) -> torch.Tensor:
        torch = self._torch
        blocks = torch.tensor(table, dtype=torch.long, device=self.base.device)
        return (blocks[:, None] * BLOCK + torch.arange(BLOCK, device=self.base.device)).flatten()

    # -- decoding ----------------------------------------------------------------------------------

    def decode(self, seqs: Sequence[int], tokens: Sequence[int], want: Sequence[bool], places=None) -> np.ndarray:
        """One model forward. Row i appends tokens[i] to seqs[i] at its next position; returns the wanted rows.
        `places` (tree rows) is always empty here: this pool opens no trees (FusedScoring.open_tree)."""
        if len(tokens) > self.n_batch:
            raise ValueError(f"{len(tokens)} rows exceed the pool's batch size {self.n_batch}")
        rows: dict[int, list[int]] = {}  # rows of each sequence, sequences in order of first appearance
        for i, seq in enumerate(seqs):
            rows.setdefault(seq, []).append(i)
        self._grow(rows)
        try:
            logits = self._forward(rows, tokens, want)
        except BaseException:
            for seq in rows:
                self._trim(seq)
            raise
        for seq, r in rows.items():
            self.live[seq] += len(r)
        self.decodes += 1
        return logits

    def _forward(self, rows: dict[int, list[int]], tokens: Sequence[int], want: Sequence[bool]) -> np.ndarray:
        """The forward of a decode: rows grouped by sequence, padded; the logits of the wanted rows in row order."""
        torch, device = self._torch, self.base.device
        order = [i for r in rows.values() for i in r]
        pad = _round_up(max(len(order), 1), self.row_multiple) - len(order)
        segments, writes, positions, start = [], [], [], 0
        for seq, r in rows.items():
            past, n = self.live[seq], len(r)
            cells = self._cells[seq][: past + n]
            segments.append(_Segment(start, start + n, cells, self._causal(past, n)))
            writes.append(cells[past:])
            positions += range(past, past + n)
            start += n
        place = {row: j for j, row in enumerate(order)}
        keep = [place[i] for i, w in enumerate(want) if w]
        n_out = len(keep)
        keep += keep[:1] * (_round_up(n_out, self.row_multiple) - n_out)  # the lm_head's rows are padded too
        plan = _Plan(self._flat(self._keys), self._flat(self._values), len(order),
                     torch.cat(writes) if writes else torch.empty(0, dtype=torch.long, device=device), segments)
        ids = torch.tensor([[tokens[i] for i in order] + [0] * pad], device=device)
        with torch.inference_mode(), self._attention():
            out = self.model(input_ids=ids, position_ids=torch.tensor([positions + [0] * pad], device=device),
                             use_cache=False, logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
                             **{PLAN: plan})
        if plan.calls != self.n_layers:
            raise _Unsupported(f"{plan.calls} of its {self.n_layers} layers ran the paged attention (does it use "
                               "transformers' AttentionInterface?)")
        self.padded += pad
        return out.logits[0, :n_out].float().cpu().numpy()

    def _causal(self, past: int, n: int) -> torch.Tensor | None:
        if n == 1:
            return None
        torch, device = self._torch, self.base.device
        return torch.arange(past + n, device=device)[None, :] <= torch.arange(past, past + n, device=device)[:, None]

    @staticmethod
    def _flat(layers: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.view(-1, t.shape[2], t.shape[3]) for t in layers]

    @contextmanager
    def _attention(self):
        """Our attention for one forward; the module's own implementation before and after."""
        config = self.model.config
        original = config._attn_implementation
        config._attn_implementation = ATTN
        try:
            yield
        finally:
            config._attn_implementation = original

    def _probe(self) -> None:
        """An all-padding decode: every layer must run our attention and accept the plan, or the pool would be wrong."""
        try:
            self._forward({}, [], [])
        except _Unsupported as exc:
            raise PoolUnsupported(f"{self.base.name} cannot share a paged KV pool: {exc} (serve with --kv-pool 0)",
                                  "kv_pool") from None
        self.padded = 0

    # -- preemption: swapped out, not recomputed ---------------------------------------------------
    # A row's attention depends on the rows it was decoded with (its segment; see Exactness), and the pool does
    # not record segments, so decoding a sequence's tokens again could change its cells' bits. Its keys and
    # values are copied out instead (to the host, on a GPU), its blocks freed for others, and on resume copied
    # into fresh blocks: the same bytes at the same positions, and attention finds cells by position.

    preemptible = True

    def preempt(self, seq: int) -> Preempted:
        prompt, held = self._prompts[seq], self.live[seq]
        saved = Preempted(held, None if prompt is None else len(prompt))
        if prompt is not None:  # else its prompt is prefilled again from the start (the stepper's part)
            cells = self._cells[seq][:held]
            saved.swapped = ([k[cells].to("cpu") for k in self._flat(self._keys)],
                             [v[cells].to("cpu") for v in self._flat(self._values)])
            saved.tokens = prompt.tolist()
        self.release(seq)  # caches the prompt's shareable prefix: resume() may share it back
        self.swapped_out += held if prompt is not None else 0
        return saved

    def resume(self, seq: int, saved: Preempted) -> None:
        """The prompt's cached prefix shared back where the prefix cache still holds it (the same bits:
        rows are batch-invariant here), the rest of its cells written back from the host."""
        if saved.prompt_len is None:
            return
        keys, values = saved.swapped
        done = self.adopt_prefix(seq, saved.tokens)
        self._grow({seq: range(saved.held - done)})
        cells = self._cells[seq][done : saved.held]
        for pool, kept in zip(self._flat(self._keys) + self._flat(self._values), keys + values):
            pool[cells] = kept[done:].to(pool.device)
        self.live[seq] = saved.held
        self.remember_prompt(seq, saved.tokens)

    def close(self) -> None:
        self._keys, self._values = [], []


def row_multiple(model) -> int:
    """The smallest of ROW_MULTIPLES at which every linear layer of `model` computes each row bit-identically
    in 1, 2 or 3 blocks of rows (the row-blocking of torch's CPU GEMM depends on the CPU and the shape)."""
    import torch

    weights = {tuple(m.weight.shape): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        for multiple in ROW_MULTIPLES:
            if all(_rows_invariant(w, multiple, generator) for w in weights.values()):
                return multiple
    raise PoolUnsupported(f"torch's linear is not row-invariant in blocks of up to {ROW_MULTIPLES[-1]} rows on this "
                          "device (serve with --kv-pool 0)", "kv_pool")


def _rows_invariant(weight, multiple: int, generator) -> bool:
    import torch

    x = torch.randn(3 * multiple, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    full = torch.nn.functional.linear(x, weight)
    return all(torch.equal(torch.nn.functional.linear(x[:n], weight), full[:n]) for n in (multiple, 2 * multiple))


# -- the attention -------------------------------------------------------------------------------------


class _Unsupported(RuntimeError):
    """The model's attention is not what paged_attention implements (turned into PoolUnsupported by the probe)."""


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """Cache this decode's keys/values in their cells, then attend per sequence (query [1, heads, rows, dim])."""
    import torch

    plan: _Plan | None = kwargs.get(PLAN)
    layer = getattr(module, "layer_idx", None)
    if plan is None or layer is None:
        raise _Unsupported("its attention modules do not receive the pool's plan (kwargs) or their layer index")
    used = [name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if used:
        raise _Unsupported(f"its attention uses {', '.join(used)}")
    cache_k, cache_v = plan.keys[layer], plan.values[layer]
    new_k, new_v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [rows, n_kv_heads, head_dim]
    if new_k.shape[1:] != cache_k.shape[1:] or new_v.shape[1:] != cache_v.shape[1:]:
        raise _Unsupported(f"its keys/values {tuple(new_k.shape[1:])} do not match the config's "
                           f"{tuple(cache_k.shape[1:])}")
    plan.calls += 1
    cache_k.index_copy_(0, plan.writes, new_k[: plan.rows])
    cache_v.index_copy_(0, plan.writes, new_v[: plan.rows])
    groups = query.shape[1] // key.shape[1]
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [rows, heads, head_dim]
    for seg in plan.segments:
        q = query[:, :, seg.start : seg.stop].contiguous()
        k = _by_head(cache_k.index_select(0, seg.cells), groups)
        v = _by_head(cache_v.index_select(0, seg.cells), groups)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, scale=scaling)
        out[seg.start : seg.stop] = o[0].transpose(0, 1)
    # A padding row attends only to itself: a softmax over one key is 1, so its output is its own value.
    out[plan.rows :] = new_v[plan.rows :].repeat_interleave(groups, dim=1)
    return out.unsqueeze(0), None


def _by_head(cached: torch.Tensor, groups: int) -> torch.Tensor:
    """Gathered cells [L, n_kv_heads, dim] -> [1, heads, L, dim], each KV head repeated for its query heads (GQA)."""
    kv = cached.transpose(0, 1)
    if groups > 1:
        kv = kv[:, None].expand(-1, groups, -1, -1).reshape(-1, kv.shape[1], kv.shape[2])
    return kv.unsqueeze(0)


def _no_mask(*args, **kwargs) -> None:
    """The mask 'builder' for ATTN: paged_attention builds its masks per sequence."""
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN, paged_attention)
    AttentionMaskInterface.register(ATTN, _no_mask)


# -- model shape and memory ------------------------------------------------------------------------------


def unsupported(config) -> str | None:
    """Why paged_attention cannot stand in for this model's attention, or None."""
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention"}
    if kinds:
        return f"it has {', '.join(sorted(kinds))} layers"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return f"it attends through a sliding window of {window} tokens"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps its attention logits"
    return None


def check_memory(cells: int, per_token: int, name: str, available: int | None = None) -> None:
    """Raise InsufficientMemory (memory.py's wording) if the pool's keys and values do not fit in available memory."""
    available = available_bytes() if available is None else available
    need = cells * per_token
    if need <= available:
        return
    fit = available // per_token // 256 * 256
    advice = (f"What would fit: --kv-pool {fit} (and --ctx at most {fit})." if fit >= 256 else
              "Nothing fits: even a 256-token pool needs more; free memory or use a smaller model.")
    raise InsufficientMemory(
        f"--kv-pool {cells} needs {need / GiB:.2f} GiB (target KV pool ({cells} tokens x {per_token / 1024:.1f} KiB) "
        f"{need / MiB:,.0f} MiB for {name}) but {available / GiB:.2f} GiB is available. " + advice, "kv_pool")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
