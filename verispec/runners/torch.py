"""TorchRunner: Hugging Face transformers models (a model directory, or a GGUF file dequantized).

The KV cache is preallocated to the context (runners/torch_cache.py): rollback is a length change, and after a
tree pass (a 4D additive mask, explicit tree positions) keep_path() copies only the kept nodes' cells down.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidParameter, ModelFileError
from ..token_tree import ancestor_mask, tree_depths
from .base import Runner, Tokenizer

# --dtype names -> torch dtype attribute; "auto" is bf16 on CUDA (its tensor cores, half the memory traffic of
# fp32) and fp32 on CPU (bf16 matmuls without AMX run through slow conversion paths, and fp32 is the reference).
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
DTYPE_HELP = "torch backend: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32"
# Row counts a fixed-shape pass is padded to (fixed_shapes=True): one captured CUDA graph per count, so a verify
# pass over K+1 rows replays the graph of the next count up. 64 is the most rows an engine step scores.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def dtype_name(dtype) -> str:
    """The short --dtype name of a torch dtype (torch.bfloat16 -> 'bf16')."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(dtype).removeprefix("torch."), str(dtype))


def resolve_device(name: str) -> str:
    """The device a --device value means here ("auto": CUDA if torch sees one); a one-line error for a device
    this machine does not have, before any weights load."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = str(name).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise InvalidParameter(f"device must be auto, cpu, cuda or cuda:N, got {name!r}", "device")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= int(index or 0):
            raise InvalidParameter(f"--device {name}: torch sees {count} CUDA device(s) on this machine"
                                   + ("" if count else " (no GPU, or a CPU-only torch build); use --device cpu"),
                                   "device")
    return name


def resolve_dtype(name: str, device: str):
    """The torch dtype a --dtype value means on `device` (a clear error for an unknown name)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise InvalidParameter(f"dtype must be auto, bf16, fp16 or fp32, got {name!r}", "dtype")
    return getattr(torch, DTYPES[name])


class HFTokenizer(Tokenizer):
    def __init__(self, tokenizer, eos_ids: set[int], chat_template: str | None = None) -> None:
        self._tok = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_ids = frozenset(eos_ids)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.bos_text = tokenizer.bos_token or ""
        self.eos_text = tokenizer.eos_token or ""

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._tok(text, add_special_tokens=add_special)["input_ids"])

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tok.decode(list(tokens), skip_special_tokens=True)

    def vocab_strings(self) -> list[str]:
        return [str(t) for t in self._tok.convert_ids_to_tokens(list(range(len(self._tok))))]


class TorchRunner(Runner):
    """A transformers causal LM with a preallocated KV cache (DynamicCache for sliding-window models)."""

    logits_on_device = True  # the engine verifies forward_native()'s tensors with verify/device.py

    def __init__(self, model, tokenizer: Tokenizer | None, name: str, n_ctx: int = 4096, device: str = "cpu",
                 fixed_shapes: bool = False, cuda_graphs: bool = False) -> None:
        """fixed_shapes: passes of up to 64 rows are padded to ROW_BUCKETS and attend over the whole preallocated
        cache under an explicit mask, so every pass of a bucket has the same shapes and addresses. cuda_graphs:
        those passes also run through torch.compile(mode="reduce-overhead"), which captures one CUDA graph per
        bucket (implies fixed_shapes; meant for a GPU, where per-kernel launch cost dominates small passes)."""
        import torch

        self._torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.n_vocab = int(model.config.vocab_size)
        limit = getattr(model.config, "max_position_embeddings", None) or n_ctx
        self.n_ctx = min(n_ctx, int(limit))
        self.n_params = sum(p.numel() for p in model.parameters())
        self.dtype = next(model.parameters()).dtype
        self._hidden: np.ndarray | None = None
        self.keep_hidden = False  # store hidden states on every forward (heads drafters read them)
        self._pending = 0  # tree nodes in the cache not yet committed
        self.cache = None
        self._preallocated = False
        self.fixed_shapes = fixed_shapes or cuda_graphs
        self._step_model = torch.compile(self.model, mode="reduce-overhead", dynamic=False) if cuda_graphs else self.model
        self.reset()

    @classmethod
    def from_source(cls, source, device: str = "auto", n_ctx: int = 4096, n_threads: int | None = None,
                    dtype: str = "auto", cuda_graphs: bool = False, **_ignored) -> "TorchRunner":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if n_threads or os.environ.get("VERISPEC_THREADS"):
            torch.set_num_threads(int(n_threads or os.environ["VERISPEC_THREADS"]))
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        if cuda_graphs and not str(device).startswith("cuda"):
            raise InvalidParameter("cuda_graphs needs a CUDA device", "cuda_graphs")
        if str(device).startswith("cuda"):
            check_weights_fit(source, torch_dtype, device)
        if source.kind == "gguf":
            directory, extra = str(source.path.parent), {"gguf_file": source.path.name}
        else:
            directory, extra = str(source.path), {}
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **extra).to(device)
            hf_tok = AutoTokenizer.from_pretrained(directory, **extra)
        except Exception as exc:  # transformers raises many kinds on a bad model; the user needs one line
            raise ModelFileError(f"transformers could not load {source.path}: {exc}") from None
        template = None
        if source.kind == "gguf" and not getattr(hf_tok, "chat_template", None):
            from ..models.chat import gguf_chat_template

            template = gguf_chat_template(source.path)
        return cls(model, HFTokenizer(hf_tok, _eos_ids(model, hf_tok), template), source.label, n_ctx, device,
                   cuda_graphs=cuda_graphs)

    @property
    def cost_curve(self) -> str:
        return f"torch-{self.device.type}-{dtype_name(self.dtype)}"

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token takes in this model's cache (the weights' dtype)."""
        layers, kv_heads, head_dim = kv_shape(self.model.config)
        return layers * kv_heads * head_dim * 2 * self.dtype.itemsize

    def reset(self) -> None:
        """Empty the cache. The preallocated one is kept (its buffers are the context's size) and only truncated."""
        from transformers import DynamicCache

        from . import torch_cache  # imported with torch, not with the CLI

        if self.cache is None or not self._preallocated:
            self.cache = torch_cache.preallocated_cache(self.model.config, self.n_ctx)
            self._preallocated = self.cache is not None
            if self.cache is None:
                self.cache = DynamicCache(config=self.model.config)
        else:
            torch_cache.rollback(self.cache, 0)
        self.n_past = 0
        self._pending = 0

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None, all_logits: bool = True,
                hidden: bool = False) -> np.ndarray:
        return self.forward_native(tokens, parents, all_logits, hidden).float().cpu().numpy()

    def forward_native(self, tokens: Sequence[int], parents: Sequence[int] | None = None, all_logits: bool = True,
                       hidden: bool = False):
        """The pass's logits as a tensor on the model's device and in its dtype: the engine verifies them there
        (verify/device.py) and only the accepted ids cross to the host."""
        torch = self._torch
        if self._pending:
            raise RuntimeError("keep_path() must follow a tree forward before the next forward")
        n = len(tokens)
        self.check_fits(n)
        hidden = hidden or self.keep_hidden
        if self._fixed_shape_fits(n, hidden):
            return self._fixed_shape_pass(tokens, parents, all_logits)
        if parents is None:
            # A chain is causal over the cache and itself: no mask, so the model builds its own causal one
            # (and SDPA may take its flash kernel on a GPU, which an explicit float mask rules out).
            depths, mask = np.arange(n), None
        else:
            depths = tree_depths(parents)
            mask = self._tree_mask(ancestor_mask(parents))
        positions = torch.from_numpy(self.n_past + depths).unsqueeze(0).to(self.device)
        if isinstance(tokens, torch.Tensor):  # ids already on the device (a draft's argmax): no host round trip
            ids = tokens.view(1, -1).to(self.device, torch.long)
        else:
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=mask,
                past_key_values=self.cache,
                use_cache=True,
                output_hidden_states=hidden,
                logits_to_keep=0 if all_logits else 1,
            )
        if hidden:
            # hidden_states[-1] is after the final norm: logits = lm_head(hidden). Rows match the returned logits.
            last = out.hidden_states[-1][0]
            self._hidden = (last if all_logits else last[-1:]).float().cpu().numpy()
        if parents is None:
            self.n_past += n
        else:
            self._pending = n
        return out.logits[0]

    def _fixed_shape_fits(self, n: int, hidden: bool) -> bool:
        return (self.fixed_shapes and self._preallocated and not hidden and n <= ROW_BUCKETS[-1]
                and self.n_past + _bucket(n) <= self.n_ctx)

    def _fixed_shape_pass(self, tokens, parents: Sequence[int] | None, all_logits: bool):
        """One pass padded to a ROW_BUCKETS count, attending over the whole cache under an explicit mask.

        Padding rows continue the chain's positions and see the prefix and themselves only; their keys and values
        land in cells past the real rows, which no later mask shows and the next pass overwrites."""
        from . import torch_cache

        torch, n = self._torch, len(tokens)
        rows = _bucket(n)
        visible = np.eye(rows, dtype=bool)
        depths = np.arange(rows)
        if parents is None:
            visible[:n, :n] = np.tri(n, dtype=bool)
        else:
            visible[:n, :n] = ancestor_mask(parents)
            depths[:n] = tree_depths(parents)
        ids = torch.zeros((1, rows), dtype=torch.long, device=self.device)
        ids[0, :n] = tokens.view(-1) if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens))
        seen = torch.zeros((rows, self.n_ctx), dtype=torch.bool, device=self.device)
        seen[:, : self.n_past] = True
        seen[:, self.n_past : self.n_past + rows] = torch.from_numpy(visible).to(self.device)
        mask = torch.zeros((1, 1, rows, self.n_ctx), dtype=self.dtype, device=self.device)
        mask.masked_fill_(~seen, torch.finfo(self.dtype).min)
        positions = torch.from_numpy(self.n_past + depths).unsqueeze(0).to(self.device)
        cells = torch.arange(self.n_past, self.n_past + rows, device=self.device)
        # The first pass allocates the cache's buffers, which a captured graph must not do: it runs eagerly.
        model = self._step_model if self.cache.layers[0].is_initialized else self.model
        torch_cache.set_write_cells(self.cache, cells)
        try:
            with torch.inference_mode():
                out = model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=0)
        finally:
            torch_cache.set_write_cells(self.cache, None)
        torch_cache.commit(self.cache, self.n_past + n)
        if parents is None:
            self.n_past += n
        else:
            self._pending = n
        logits = out.logits[0]
        return logits[:n] if all_logits else logits[n - 1 : n]

    def _tree_mask(self, visible: np.ndarray):
        """Additive 4D mask: every cached cell, plus each node's ancestors and itself among the new rows."""
        torch, n = self._torch, len(visible)
        mask = torch.zeros((1, 1, n, self.n_past + n), dtype=self.dtype)
        mask[0, 0, :, self.n_past :].masked_fill_(torch.from_numpy(~visible), torch.finfo(self.dtype).min)
        return mask.to(self.device)

    def hidden_states(self) -> np.ndarray:
        if self._hidden is None:
            raise RuntimeError("call forward(..., hidden=True) first")
        return self._hidden

    def rollback(self, n_past: int) -> None:
        from . import torch_cache

        self._pending = 0
        torch_cache.rollback(self.cache, n_past)
        self.n_past = min(self.n_past, n_past)

    def keep_path(self, path: Sequence[int]) -> None:
        if not self._pending:
            raise RuntimeError("keep_path() needs a tree forward first")
        from . import torch_cache

        cells = self._torch.tensor([self.n_past + i for i in path], dtype=self._torch.long, device=self.device)
        torch_cache.keep_path(self.cache, self.n_past, cells)
        self.n_past += len(path)
        self._pending = 0


def parameter_count(source) -> int | None:
    """Parameters in a model's files, read from their headers (GGUF tensors, safetensors shapes); None if unknown."""
    if source.kind == "gguf":
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(str(source.path)).tensors)
    shards = sorted(source.path.glob("*.safetensors"))
    if not shards:
        return None
    from safetensors import safe_open

    total = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            total += sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
    return total


def check_weights_fit(source, dtype, device: str, available: int | None = None) -> None:
    """Refuse, with the sizes, a model whose weights alone exceed the GPU's free memory, before loading any.
    (The server's start-up check adds the caches on top: serve/memory.py.)"""
    import torch

    params = parameter_count(source)
    if params is None:
        return
    need = params * dtype.itemsize
    available = int(torch.cuda.mem_get_info(torch.device(device))[0]) if available is None else available
    if need > available:
        raise InvalidParameter(
            f"{source.label} needs {need / 2**30:.2f} GiB for its {params / 1e9:.2f}B parameters in {dtype_name(dtype)} "
            f"but {device} has {available / 2**30:.2f} GiB free: try --dtype bf16, a smaller model, or --device cpu",
            "device")


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a transformers decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def _bucket(n: int) -> int:
    return next(rows for rows in ROW_BUCKETS if rows >= n)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
