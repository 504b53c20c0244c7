"""LlamaCppRunner: the CPU fast path, on llama-cpp-python's low-level API.

One llama context per runner. Sequence 0 holds the committed tokens. A tree pass tags each node
with the sequence ids of every leaf below it (llama.cpp has no custom attention mask; a token
attends to the cells that share one of its sequence ids), which needs a unified KV cache.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence

import numpy as np

from .. import llama_lib
from ..errors import ModelFileError
from ..llama_lib import FALLBACK_EXACT_ROWS, decode, default_threads, exact_attention, exact_pass_rows, init_backend
from ..token_tree import leaf_sequences, tree_depths
from .base import Runner, Tokenizer

VERIFY_MODES = ("exact", "one-pass")
# llama_memory_clear's `data` argument, whether clearing the cells also zeroes the KV buffers: not here (the
# runner's reset and the server pool's, llamacpp_pool.py). Zeroing a 32,768-cell pool took 41 ms for the 0.5B
# draft and ~100 ms for the 1.5B target, and a server's draft pool went idle at every release while no request
# drafted: 41 ms of stall per finished request. Stale keys and values are finite (every cell was zeroed at
# allocation or written by a decode) and lie in cells the mask hides, which flash attention skips and which get
# softmax weight 0 without it: no logit changes.
ZERO_KV_BUFFERS = False

def open_context(model, *, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int):
    """A llama.cpp context as every part of verispec opens one (runner, KV pool, memory probe); NULL on failure.

    The KV cache is unified, since a tree node belongs to several sequences at once, and every pass
    is one micro-batch (n_ubatch = n_batch), so a pass's rows are never split behind our back.
    """
    import llama_cpp as L

    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = cparams.n_ubatch = n_batch
    cparams.n_seq_max = n_seq_max
    cparams.kv_unified = True
    cparams.n_threads = cparams.n_threads_batch = n_threads
    cparams.no_perf = True
    cparams.flash_attn_type = int(os.environ.get("VERISPEC_FLASH_ATTN", -1))
    cparams.pooling_type = L.LLAMA_POOLING_TYPE_NONE  # per-token embeddings (hidden states) when switched on
    return L.llama_init_from_model(model, cparams)


class LlamaCppTokenizer(Tokenizer):
    def __init__(self, model) -> None:
        import llama_cpp as L

        self._L = L
        self._vocab = L.llama_model_get_vocab(model)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        bos = L.llama_vocab_bos(self._vocab)
        self.bos_id = bos if bos >= 0 else None
        self.eos_ids = frozenset(t for t in self._special_candidates() if L.llama_vocab_is_eog(self._vocab, t))
        template = L.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8") if template else None
        self.bos_text = self._piece(self.bos_id, special=True).decode("utf-8", "replace") if self.bos_id is not None else ""
        eos = L.llama_vocab_eos(self._vocab)
        self.eos_text = self._piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else ""
        self._piece_cache: dict[int, bytes] = {}

    def _special_candidates(self) -> list[int]:
        # End-of-generation tokens are control tokens; checking only those keeps start-up fast.
        L = self._L
        return [t for t in range(self.n_vocab) if L.llama_vocab_is_control(self._vocab, t) or L.llama_vocab_eos(self._vocab) == t]

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (self._L.llama_token * capacity)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special and self._add_bos, True)
        if n < 0:
            capacity = -n
            buf = (self._L.llama_token * capacity)()
            n = self._L.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special and self._add_bos, True)
        return list(buf[:n])

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def piece(self, token: int) -> bytes:
        cached = self._piece_cache.get(token)
        if cached is None:
            cached = self._piece_cache[token] = self._piece(token)
        return cached

    def decode(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        return self.piece(token)

    def vocab_strings(self) -> list[str]:
        get = self._L.llama_vocab_get_text
        return [(get(self._vocab, t) or b"").decode("utf-8", "replace") for t in range(self.n_vocab)]


class LlamaCppRunner(Runner):
    """A GGUF model on llama.cpp's CPU kernels, with sequence-level KV operations for rollback and trees."""

    def __init__(self, source, n_ctx: int = 4096, n_threads: int | None = None, max_tree_leaves: int = 32,
                 n_batch: int = 512, verbose: bool = False, exact_chunk: int | None = None, device: str = "cpu",
                 verify: str = "exact", _shared_model=None) -> None:
        import llama_cpp as L

        if device not in ("cpu", "auto"):
            from ..errors import InvalidParameter

            raise InvalidParameter(f"the llama.cpp runner runs on the CPU here; use --backend torch for --device {device}", "device")

        if verify not in VERIFY_MODES:
            from ..errors import InvalidParameter

            raise InvalidParameter(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}", "verify")
        init_backend(verbose)
        self._L = L
        self.name = source.label
        self.source = source
        self._options = dict(n_ctx=n_ctx, n_threads=n_threads, max_tree_leaves=max_tree_leaves, n_batch=n_batch,
                             verbose=verbose, exact_chunk=exact_chunk, verify=verify)
        # "exact": scoring passes of at most exact_pass_rows() rows, bit-identical to plain decoding (see _score):
        # 64 on verispec's batch-invariant build, so a draft is scored in one pass. "one-pass": all rows in one
        # pass however many; beyond the invariant rows it is lossless in distribution but not bit-identical.
        self.verify_mode = verify
        default_chunk = exact_pass_rows() if verify == "exact" else 0
        self.exact_chunk = int(os.environ.get("VERISPEC_EXACT_CHUNK", default_chunk)) if exact_chunk is None else exact_chunk
        self.exact_attention = exact_attention()
        if not self.exact_attention and verify == "exact":
            import warnings

            warnings.warn("this llama-cpp-python build lacks verispec's split-KV switch (install with `make install`): "
                          "past 512 cells of context, greedy speculative output may differ from plain decoding",
                          stacklevel=2)
        self._owns_model = _shared_model is None
        if _shared_model is not None:
            self._model = _shared_model
        else:
            mparams = L.llama_model_default_params()
            mparams.n_gpu_layers = 0
            self._model = L.llama_model_load_from_file(str(source.path).encode(), mparams)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not load {source.path} (unsupported architecture or damaged file)")
        threads = n_threads or default_threads()
        self._ctx = open_context(self._model, n_ctx=n_ctx, n_batch=n_batch, n_seq_max=max_tree_leaves + 1,
                                 n_threads=threads)
        if not self._ctx:
            if self._owns_model:
                L.llama_model_free(self._model)
            raise ModelFileError(f"llama.cpp could not create a context of {n_ctx} tokens for {source.path}")
        self._mem = L.llama_get_memory(self._ctx)
        self.n_ctx = L.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self.n_threads = threads
        self.max_tree_leaves = max_tree_leaves
        self.tokenizer = LlamaCppTokenizer(self._model)
        self.n_vocab = self.tokenizer.n_vocab
        self.n_params = L.llama_model_n_params(self._model)
        self._batch = L.llama_batch_init(n_batch, 0, max_tree_leaves + 1)
        self._rows = np.empty((0, self.n_vocab), dtype=np.float32)
        self._tree_seqs: list[list[int]] | None = None
        self._last_tree_tokens: list[int] = []
        self.tree_redecodes = 0  # paths that had to be re-decoded (see keep_path)
        self.n_past = 0
        self.n_embd = L.llama_model_n_embd(self._model)
        self.keep_hidden = False  # store hidden states on every forward (heads drafters read them)
        self._hidden = np.empty((0, self.n_embd), dtype=np.float32)
        self._n_hidden = 0
        self._embeddings_on = False

    # -- forward passes -------------------------------------------------------------------------

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None, all_logits: bool = True) -> np.ndarray:
        if self._tree_seqs is not None:
            raise RuntimeError("keep_path() must follow a tree forward before the next forward")
        n = len(tokens)
        self.check_fits(n)
        if parents is None:
            return self._forward_chain(tokens, all_logits)
        if n > self.n_batch:
            raise ValueError(f"a tree of {n} nodes exceeds the batch size {self.n_batch}")
        return self._forward_tree(tokens, parents)

    def _forward_chain(self, tokens: Sequence[int], all_logits: bool) -> np.ndarray:
        """Prefill-style passes (one logits row) go in batches of n_batch; scoring passes in exact chunks."""
        if all_logits:
            return self._score(tokens, [[0]] * len(tokens), range(self.n_past, self.n_past + len(tokens)), commit=True)
        self._embeddings(False)  # embeddings on would output (and change the kernels of) every prompt row
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start : start + self.n_batch]
            last = start + len(part) == len(tokens)
            self._decode(part, range(self.n_past, self.n_past + len(part)), [[0]] * len(part), [0] * (len(part) - 1) + [int(last)])
            self.n_past += len(part)
        logits = self._logits(1)
        if self.keep_hidden:
            logits = logits.copy()  # the side pass below overwrites llama.cpp's logits buffer
            self._hidden_of_last(tokens[-1])
        return logits

    def _score(self, tokens: Sequence[int], seqs, positions, commit: bool, capture: bool = True) -> np.ndarray:
        """Decode with logits for every token, in chunks of at most `exact_chunk` tokens.

        Chunks of at most exact_pass_rows() tokens are bit-identical to one-token passes, which makes greedy
        speculative output equal plain greedy output exactly (llama_lib.py: 64 rows on verispec's
        batch-invariant build, so a whole draft is one pass; 3 on another build).
        """
        n = len(tokens)
        chunk = self.exact_chunk or n
        capture = capture and self.keep_hidden
        # Every row is an output here, so switching embeddings on changes no kernel: logits stay bit-identical.
        self._embeddings(capture)
        if capture:
            self._reserve_hidden(n)
        if n <= chunk:
            self._decode(tokens, positions, seqs, [1] * n)
            if capture:
                self._hidden[:n] = self._embedding_rows(n)
            if commit:
                self.n_past += n
            return self._logits(n)
        if self._rows.shape[0] < n:
            self._rows = np.empty((n, self.n_vocab), dtype=np.float32)
        positions = list(positions)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            self._decode(tokens[start:end], positions[start:end], seqs[start:end], [1] * (end - start))
            self._rows[start:end] = self._logits(end - start)
            if capture:
                self._hidden[start:end] = self._embedding_rows(end - start)
            if commit:
                self.n_past += end - start
        return self._rows[:n]

    def _forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        depths = tree_depths(parents)
        node_seqs = leaf_sequences(parents)
        n_leaves = max(max(s) for s in node_seqs)
        if n_leaves > self.max_tree_leaves:
            raise ValueError(f"the tree has {n_leaves} leaves; this runner was opened with max_tree_leaves={self.max_tree_leaves}")
        for seq in range(1, n_leaves + 1):
            self._L.llama_memory_seq_cp(self._mem, 0, seq, -1, -1)
        rows = self._score(tokens, node_seqs, (self.n_past + depths).tolist(), commit=False)
        self._tree_seqs = node_seqs
        self._last_tree_tokens = list(tokens)
        return rows

    def _decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[Sequence[int]], flags: Sequence[int]) -> None:
        b = self._batch
        b.n_tokens = len(tokens)
        for i, (tok, pos, seq_ids, flag) in enumerate(zip(tokens, positions, seqs, flags)):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = len(seq_ids)
            for j, s in enumerate(seq_ids):
                b.seq_id[i][j] = s
            b.logits[i] = flag
        status = decode(self._ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} (KV cache full or invalid batch)")

    def _logits(self, n_rows: int) -> np.ndarray:
        ptr = self._L.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab))

    # -- hidden states ------------------------------------------------------------------------------

    def hidden_states(self) -> np.ndarray:
        """Last-layer hidden states (after the output norm) of the previous forward's returned rows."""
        if not self.keep_hidden:
            raise RuntimeError("set keep_hidden = True before the forward whose hidden states you need")
        return self._hidden[: self._n_hidden]

    def _embeddings(self, on: bool) -> None:
        if on != self._embeddings_on:
            self._L.llama_set_embeddings(self._ctx, on)
            self._embeddings_on = on

    def _reserve_hidden(self, n: int) -> None:
        if self._hidden.shape[0] < n:
            self._hidden = np.empty((max(n, 16), self.n_embd), dtype=np.float32)
        self._n_hidden = n

    def _embedding_rows(self, n_rows: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._L.llama_get_embeddings(self._ctx), shape=(n_rows, self.n_embd))

    def _hidden_of_last(self, token: int) -> None:
        """The last committed token's hidden state, from a side pass on sequence 1.

        A prefill with embeddings on would output every prompt row and change the last row's
        logits (another matmul kernel), so the prefill runs plainly and the last token is decoded
        once more, alone, on a copy of the prefix; sequence 0's cache is left as plain decoding left it.
        """
        pos = self.n_past - 1
        self._L.llama_memory_seq_cp(self._mem, 0, 1, -1, pos)
        self._embeddings(True)
        self._decode([token], [pos], [[1]], [1])
        self._reserve_hidden(1)
        self._hidden[:1] = self._embedding_rows(1)
        self._L.llama_memory_seq_rm(self._mem, 1, -1, -1)

    # -- KV cache ---------------------------------------------------------------------------------

    def rollback(self, n_past: int) -> None:
        self._drop_tree()
        if n_past < self.n_past:
            self._L.llama_memory_seq_rm(self._mem, 0, n_past, -1)
            self.n_past = n_past

    def keep_path(self, path: Sequence[int]) -> None:
        """Keep one root-to-node path of the last tree.

        llama.cpp reuses freed cells lowest-first, and its attention is not exact when a later
        position sits in a lower cell than an earlier one of the same sequence (measured: logit
        differences of ~0.5). So the kept cells must precede every hole the tree leaves: that holds
        when the path is nodes 0..m-1 (tree builders put the most likely path first). Any other
        path is dropped and re-decoded as a chain, which costs one pass over len(path) tokens.
        """
        if self._tree_seqs is None:
            raise RuntimeError("keep_path() needs a tree forward first")
        path = list(path)
        if path == list(range(len(path))):
            if path:
                # Any leaf sequence through the last kept node holds the whole path; give its cells seq 0.
                leaf_seq = self._tree_seqs[path[-1]][0]
                self._L.llama_memory_seq_cp(self._mem, leaf_seq, 0, self.n_past, self.n_past + len(path))
            self._drop_tree()
            self.n_past += len(path)
            return
        tokens = [self._last_tree_tokens[i] for i in path]
        self._drop_tree()
        self.tree_redecodes += 1
        # Re-decode in exact chunks too: cache rows from a 4+ token batch would differ from plain decoding.
        # The tree pass's hidden states stay: the caller indexes them by tree node.
        self._score(tokens, [[0]] * len(tokens), range(self.n_past, self.n_past + len(tokens)), commit=True, capture=False)

    def _drop_tree(self) -> None:
        if self._tree_seqs is None:
            return
        n_leaves = max(max(s) for s in self._tree_seqs)
        for seq in range(1, n_leaves + 1):
            self._L.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._tree_seqs = None

    @property
    def cost_curve(self) -> str:
        """The verify mode's prior T(n)/T(1); exact passes of 3 rows (a build without the patch) have their own."""
        if self.verify_mode == "exact" and 0 < self.exact_chunk <= FALLBACK_EXACT_ROWS:
            return "exact-chunks"
        return self.verify_mode

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self)

    def reset(self) -> None:
        self._tree_seqs = None
        self._L.llama_memory_clear(self._mem, ZERO_KV_BUFFERS)
        self.n_past = 0

    def sibling(self, **overrides) -> "LlamaCppRunner":
        """Another context (its own KV cache) on the same loaded weights, e.g. one per server slot.

        The weights are freed with this (owning) runner: close siblings first.
        """
        return LlamaCppRunner(self.source, **{**self._options, **overrides}, _shared_model=self._model)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._L.llama_batch_free(self._batch)
            self._L.llama_free(self._ctx)
            if self._owns_model:
                self._L.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# -- memory accounting (used by the server's start-up check) ------------------------------------------


def _meta_int(L, model, key: str) -> int | None:
    buf = ctypes.create_string_buffer(64)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, 64)
    try:
        return int(buf.value.decode()) if n > 0 else None
    except ValueError:
        return None


def kv_bytes_per_token(runner: LlamaCppRunner) -> int:
    """Bytes of KV cache one token takes (f16 K and V), from the model's layer and head counts.

    Head sizes come from the GGUF keys `<arch>.attention.key_length` / `value_length` when present,
    else n_embd / n_head.
    """
    L, model = runner._L, runner._model
    buf = ctypes.create_string_buffer(64)
    L.llama_model_meta_val_str(model, b"general.architecture", buf, 64)
    arch = buf.value.decode()
    n_head, n_head_kv = L.llama_model_n_head(model), L.llama_model_n_head_kv(model)
    head = L.llama_model_n_embd(model) // max(1, n_head)
    k_len = _meta_int(L, model, f"{arch}.attention.key_length") or head
    v_len = _meta_int(L, model, f"{arch}.attention.value_length") or head
    return L.llama_model_n_layer(model) * n_head_kv * (k_len + v_len) * 2


def context_buffers(runner: LlamaCppRunner, n_ctx: int, n_seq_max: int = 1, n_batch: int | None = None) -> dict[str, float]:
    """MiB that llama.cpp allocates for a context of this shape, by buffer ("KV", "compute", "output"),
    read from its own log lines while a probe context is created and freed."""
    import re

    L = runner._L
    lines: list[str] = []
    capture = L.llama_log_callback(lambda level, text, user: lines.append(text.decode("utf-8", "replace")))
    L.llama_log_set(capture, ctypes.c_void_p())
    try:
        ctx = open_context(runner._model, n_ctx=n_ctx, n_batch=n_batch or runner.n_batch, n_seq_max=n_seq_max,
                           n_threads=runner.n_threads)
        if ctx:
            L.llama_free(ctx)
    finally:
        restore = llama_lib.quiet_log_callback() or L.llama_log_callback(lambda level, text, user: sys.stderr.write(text.decode("utf-8", "replace")))
        L.llama_log_set(restore, ctypes.c_void_p())
        global _PROBE_LOG_CALLBACK
        _PROBE_LOG_CALLBACK = restore  # keep the ctypes callback alive
    sizes: dict[str, float] = {}
    for kind, mib in re.findall(r"\b(KV|compute|output) buffer size =\s*([\d.]+) MiB", "".join(lines)):
        sizes[kind] = sizes.get(kind, 0.0) + float(mib)
    return sizes


_PROBE_LOG_CALLBACK = None
