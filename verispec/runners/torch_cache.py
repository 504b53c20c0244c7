"""The torch runner's KV cache: preallocated to the context length, rolled back by position.

transformers' DynamicCache concatenates every step (a copy of the whole cache per layer per pass) and crops
by slicing; StaticCache preallocates but always attends over all `max_cache_len` cells, which on a CPU reads
the whole empty cache every token. This cache preallocates once and hands attention views of the cells in use:
- appending writes into the buffer, no reallocation;
- rollback is a length change (free);
- keep_path copies only the kept tree nodes' entries down to the first free cells.
The mask sizes it reports are a DynamicLayer's (cells in use + new rows), so the model's own causal mask and a
runner's explicit tree mask keep their shapes.

Fixed-shape passes (what a CUDA graph replays) set `write_cells` first: the rows' keys and values are then copied
to those cells by index, and attention sees the whole buffer under the runner's explicit mask, so neither the
cache's length nor any Python int enters the pass. The runner commits the length afterwards (`commit`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One attention layer's keys and values in fixed buffers of `capacity` cells.

    Not marked `is_compileable` (StaticLayer's flag): transformers would then build an explicit mask for every
    one-row pass. The fixed-shape passes compile without it (they bring their own mask)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.write_cells: torch.Tensor | None = None  # set for a fixed-shape pass: where its rows go

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys = key_states.new_zeros((batch, heads, self.capacity, key_states.shape[-1]))
        self._values = value_states.new_zeros((batch, heads, self.capacity, value_states.shape[-1]))
        if not torch.compiler.is_compiling():
            # Fixed addresses: a captured graph writes into these very buffers on every replay.
            torch._dynamo.mark_static_address(self._keys)
            torch._dynamo.mark_static_address(self._values)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.write_cells is not None:
            self._keys.index_copy_(2, self.write_cells, key_states)
            self._values.index_copy_(2, self.write_cells, value_states)
            return self._keys, self._values
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} cells needed, {self.capacity} allocated")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` cells (DynamicLayer's convention: a negative count)."""
        self.truncate(self.length + min(0, tokens_to_remove))

    def commit(self, n_cells: int) -> None:
        """After a fixed-shape pass: the first `n_cells` cells are in use (its padding rows' cells are not)."""
        self.length = n_cells
        self._refresh_views()

    def truncate(self, n_cells: int) -> None:
        """Keep the first `n_cells` cells: a rollback is a length change."""
        self.length = max(0, min(self.length, n_cells))
        self._refresh_views()

    def keep(self, start: int, cells: torch.Tensor) -> None:
        """Move cells `cells` (indices >= start, in order) to start.., and drop everything after them."""
        if self.is_initialized and len(cells):
            # index_select copies first, so source and destination ranges may overlap. The buffers were made in
            # the forward's inference mode, and only there may they be written in place.
            with torch.inference_mode():
                self._move(start, cells)
        self.length = start + len(cells)
        self._refresh_views()

    def _move(self, start: int, cells: torch.Tensor) -> None:
        self._keys[:, :, start:start + len(cells)] = self._keys.index_select(2, cells)
        self._values[:, :, start:start + len(cells)] = self._values.index_select(2, cells)

    def reset(self) -> None:
        self.length = 0
        self._refresh_views()

    def _refresh_views(self) -> None:
        if self.is_initialized:
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]


def preallocated_cache(config, capacity: int) -> Cache | None:
    """A Cache of PreallocatedLayers for a model whose layers all attend fully; None for any other model
    (sliding-window or linear-attention layers keep transformers' own DynamicCache)."""
    text = config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    if any(kind != "full_attention" for kind in layer_types):
        return None
    return Cache(layers=[PreallocatedLayer(capacity) for _ in layer_types])


def set_write_cells(cache: Cache, cells: torch.Tensor | None) -> None:
    """Route the next pass's keys and values to `cells` (a fixed-shape pass), or back to appending (None)."""
    for layer in cache.layers:
        layer.write_cells = cells


def commit(cache: Cache, n_cells: int) -> None:
    for layer in cache.layers:
        layer.commit(n_cells)


def rollback(cache: Cache, n_past: int) -> None:
    """Drop every cell >= n_past, in either kind of cache."""
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.truncate(n_past)
        elif (excess := layer.get_seq_length() - n_past) > 0:
            layer.crop(-excess)


def keep_path(cache: Cache, start: int, cells: torch.Tensor) -> None:
    """Keep cells [0, start) and then `cells` (absolute indices, ascending) in order; drop the rest."""
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.keep(start, cells)
        else:
            keep = torch.cat([torch.arange(start, device=cells.device), cells])
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)
