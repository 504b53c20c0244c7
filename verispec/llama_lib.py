"""The llama.cpp library, once per process: backend start-up, what this build can do, threads, one pass at a time.

Below every part that calls llama.cpp (the runner, the KV pools, requantizing in models/quantize.py), so none
of them reaches into another for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import warnings
from pathlib import Path

_backend_ready = False
_KEEP_LOG_CALLBACK = None

# One llama.cpp pass at a time in this process. ggml's worker threads spin at each of a pass's ~600
# barriers; two passes at once on 2 cores would each wait on a thread the other has descheduled
# (10-30x slower). With GGML_OPENMP=OFF (build-support/llama-cpp.sh) the workers exist only during a
# pass, so between passes nothing spins and other work in the process (HTTP, torch) has the cores.
_COMPUTE_LOCK = threading.Lock()

# The attention split verispec asks its ggml build for (see init_backend); "0" is exact too, without the split.
SPLIT_KV_EXACT = "visible"


def quiet_log_callback():
    """The callback that silences llama.cpp's log (None when verbose): restored after a log is captured."""
    return _KEEP_LOG_CALLBACK


def init_backend(verbose: bool) -> None:
    """Initialise ggml once; silence llama.cpp's stderr chatter unless verbose."""
    global _backend_ready, _KEEP_LOG_CALLBACK
    import llama_cpp as L

    if _backend_ready:
        return
    if not verbose:
        _KEEP_LOG_CALLBACK = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_KEEP_LOG_CALLBACK, ctypes.c_void_p())
    # Read by ggml at every attention op (build-support/ggml-fa-split-kv-env.patch). Upstream, a one-row pass over
    # a KV view of >= 512 cells takes flash attention's split-KV path: the view is cut into one range per
    # thread, whose bounds move with the view's size, and the partial sums are merged. A 2-3-row pass sums
    # per row instead, so greedy speculative output drifted from plain decoding on long prompts (margins up
    # to 0.18). "visible" (the patch) splits every pass of <= 64 rows (GGML_FA_VISIBLE_MAX_ROWS) by blocks of 256 cells the row can see
    # and merges them in order: a row's sum then depends only on what it sees, alone, in a verify chunk, or
    # beside other sequences' rows, and long contexts keep the split's speed. VERISPEC_SPLIT_KV overrides
    # it: 1 is upstream's split (to show the difference), 0 never splits (the per-row path).
    os.environ["GGML_CPU_FA_SPLIT_KV"] = os.environ.get("VERISPEC_SPLIT_KV", SPLIT_KV_EXACT)
    L.llama_backend_init()
    _backend_ready = True


@functools.cache
def build_info() -> dict:
    """What the loaded llama.cpp build does, read from its library (llama.h does not say).

    split_kv_switch: the build has build-support/ggml-fa-split-kv-env.patch, so one-row passes can be kept
    off flash attention's split-KV path (see init_backend); visible_blocks: the patch's version that splits
    passes of <= 64 rows by visible cells instead. openmp: ggml was built with OpenMP, whose
    thread pools sleep or spin between passes by OMP_WAIT_POLICY (see docs/threading.md).
    """
    import llama_cpp as L

    init_backend(False)
    lib = Path(L.__file__).parent / "lib"
    cpu = sorted(lib.glob("libggml-cpu.so*")) or sorted(lib.glob("libggml*.so*")) or sorted(lib.glob("libllama.so*"))
    data = b"".join(f.read_bytes() for f in cpu[:1])
    return {
        "split_kv_switch": b"GGML_CPU_FA_SPLIT_KV" in data,
        "visible_blocks": b"GGML_CPU_FA_SPLIT_KV" in data and b"visible\x00" in data,
        "openmp": b"GOMP_parallel" in data or b"omp_get_thread_num" in data,
        "system_info": L.llama_print_system_info().decode("utf-8", "replace").strip(),
    }


def exact_attention() -> bool:
    """Whether one-row passes sum attention as multi-row passes do, at any context length (see init_backend).

    A build with the switch but without the visible-block split takes "visible" as 0 (no split): exact too."""
    return build_info()["split_kv_switch"] and os.environ.get("GGML_CPU_FA_SPLIT_KV") in ("0", SPLIT_KV_EXACT)


# Rows per exact pass on a build that is not batch-invariant: ggml's CPU matmul takes another kernel for 4+ rows
# (the repacked Q4_K gemm, tiled K-quant matmul at 8+), whose rounding differs from one-row passes by up to ~0.9
# in logits (Qwen2.5 Q4_K_M); passes of <= 3 rows are bit-identical to one-row passes (tests/test_long_context.py).
FALLBACK_EXACT_ROWS = 3


@functools.cache
def batch_invariant_rows() -> int:
    """The most rows one pass may hold with every row's bits those of a one-row pass, as the build says.

    verispec's build (build-support/ggml-batch-invariant.patch) exports ggml_cpu_batch_invariant_max_rows: 64
    where the patch covers the instruction set (x86 with AVX2 or AVX-512). 0 for a build without the patch, an
    instruction set it does not cover, GGML_CPU_BATCH_INVARIANT=0, or attention that is not split by visible
    blocks (VERISPEC_SPLIT_KV other than "visible": flash attention's rows are then not independent)."""
    import llama_cpp as L

    init_backend(False)
    if os.environ.get("GGML_CPU_FA_SPLIT_KV") != SPLIT_KV_EXACT:
        return 0
    found = sorted((Path(L.__file__).parent / "lib").glob("libggml-cpu.so*"))
    try:
        max_rows = ctypes.CDLL(str(found[0])).ggml_cpu_batch_invariant_max_rows
    except (IndexError, OSError, AttributeError):
        return 0
    max_rows.restype = ctypes.c_int
    return int(max_rows())


@functools.cache
def exact_pass_rows() -> int:
    """Rows per pass that keep every row bit-identical to a one-row pass: the whole batch-invariant range of
    verispec's build, else FALLBACK_EXACT_ROWS (verification then costs about one pass per 3 rows), said once."""
    rows = batch_invariant_rows()
    if rows >= FALLBACK_EXACT_ROWS:
        return rows
    warnings.warn("this llama-cpp-python build is not batch-invariant (build it with `make install`, or the "
                  "instruction set is not covered): exact verification scores drafts in passes of "
                  f"{FALLBACK_EXACT_ROWS} rows, which costs about one pass per {FALLBACK_EXACT_ROWS} tokens", stacklevel=2)
    return FALLBACK_EXACT_ROWS


_GGUF_TYPE_STRING = 8  # enum gguf_type in ggml's gguf.h


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    """ggml's own library, for its GGUF reader (llama-cpp-python binds llama.h only)."""
    import llama_cpp as L

    found = sorted((Path(L.__file__).parent / "lib").glob("libggml-base.so*"))
    if not found:
        raise RuntimeError(f"llama-cpp-python's libggml-base was not found in {Path(L.__file__).parent / 'lib'} "
                           "(verispec reads GGUF headers with it; `make install` builds a llama-cpp-python that has it)")
    lib = ctypes.CDLL(str(found[0]))
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    for name in ("gguf_get_data_offset", "gguf_get_tensor_offset", "gguf_get_tensor_size"):
        getattr(lib, name).restype = ctypes.c_size_t
    lib.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_tensor_offset.argtypes = lib.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_get_kv_type.argtypes = lib.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_kv_type.restype = ctypes.c_int
    lib.gguf_get_val_str.restype = ctypes.c_char_p
    return lib


@contextlib.contextmanager
def _gguf_header(path: Path):
    """ggml's reading of a GGUF file's header (no tensor data is read); None when ggml cannot read it (it says
    why on stderr, and the caller raises its own error)."""
    lib = _ggml_base()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    try:
        yield ctx or None
    finally:
        if ctx:
            lib.gguf_free(ctx)


def gguf_tensor_data_end(path: Path) -> int | None:
    """Where a GGUF file's last tensor data ends, as its header says; None: an unreadable header.

    gguf-py's GGUFReader gives the same but first parses every metadata array in Python (the tokenizer's 151k
    tokens and merges): 7 s for a Qwen2.5 file here, against 50 ms through ggml's own reader."""
    lib = _ggml_base()
    with _gguf_header(path) as ctx:
        if ctx is None:
            return None
        ends = (lib.gguf_get_tensor_offset(ctx, i) + lib.gguf_get_tensor_size(ctx, i)
                for i in range(lib.gguf_get_n_tensors(ctx)))
        return lib.gguf_get_data_offset(ctx) + max(ends, default=0)


def gguf_string(path: Path, key: str) -> str | None:
    """A string value of a GGUF file's metadata (e.g. tokenizer.chat_template); None when absent or unreadable."""
    lib = _ggml_base()
    with _gguf_header(path) as ctx:
        if ctx is None:
            return None
        key_id = lib.gguf_find_key(ctx, key.encode())
        if key_id < 0 or lib.gguf_get_kv_type(ctx, key_id) != _GGUF_TYPE_STRING:
            return None
        return lib.gguf_get_val_str(ctx, key_id).decode("utf-8")


def decode(ctx, batch) -> int:
    """llama_decode, one pass at a time in the process (see _COMPUTE_LOCK); returns llama.cpp's status."""
    import llama_cpp as L

    with _COMPUTE_LOCK:
        return L.llama_decode(ctx, batch)


def default_threads() -> int:
    return int(os.environ.get("VERISPEC_THREADS", 0)) or max(1, len(os.sched_getaffinity(0)))
