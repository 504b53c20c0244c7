"""ggml's C API through ctypes, to test its matmul kernels on real weights: does each row of an N-row pass get
the bits it gets in a one-row pass (batch invariance, build-support/ggml-batch-invariant.patch)?

Every pass runs as llama.cpp runs it: weights in a CPU buffer (or the CPU device's repacking extra buffer, where
Q4_K is interleaved for the 8x8 gemm/gemv kernels), the graph computed by the CPU backend on 2 threads.

Run as a script it prints the check's result as JSON, so a test can run it in a fresh process: with
GGML_CPU_BATCH_INVARIANT=0 (read once per process) or against another build's libraries (--lib), whose
libggml-base would otherwise clash with the one llama_cpp already loaded.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# enum ggml_type (ggml.h)
GGML_TYPES = {"F32": 0, "F16": 1, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type (ggml-backend.h)
_REPACK_BUFFER = b"CPU_REPACK"  # the name of the CPU device's repacking extra buffer type (ggml-cpu/repack.cpp)
INSTRUCTION_SETS = ("avx2", "avx512", "avx512_vnni", "avx512_bf16")
ROW_COUNTS = tuple(range(1, 65))
THREADS = 2

P = ctypes.c_void_p


class _InitParams(ctypes.Structure):  # struct ggml_init_params, passed by value to ggml_init
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", P), ("no_alloc", ctypes.c_bool)]


class _GgufInitParams(ctypes.Structure):  # struct gguf_init_params (gguf.h)
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", P)]


_SIGNATURES = {  # name: (restype, argtypes)
    "ggml_init": (P, [_InitParams]),
    "ggml_free": (None, [P]),
    "ggml_tensor_overhead": (ctypes.c_size_t, []),
    "ggml_graph_overhead": (ctypes.c_size_t, []),
    "ggml_new_tensor_2d": (P, [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
    "ggml_view_2d": (P, [P, P, ctypes.c_int64, ctypes.c_int64, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_mul_mat": (P, [P, P, P]),
    "ggml_new_graph": (P, [P]),
    "ggml_build_forward_expand": (None, [P, P]),
    "ggml_get_data": (P, [P]),
    "ggml_nbytes": (ctypes.c_size_t, [P]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
    "ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, P, P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, P]),
    "ggml_backend_dev_by_type": (P, [ctypes.c_int]),
    "ggml_backend_dev_backend_reg": (P, [P]),
    "ggml_backend_reg_get_proc_address": (P, [P, ctypes.c_char_p]),
    "ggml_backend_buft_name": (ctypes.c_char_p, [P]),
    "ggml_backend_cpu_buffer_type": (P, []),
    "ggml_backend_alloc_ctx_tensors_from_buft": (P, [P, P]),
    "ggml_backend_buffer_free": (None, [P]),
    "ggml_backend_tensor_set": (None, [P, P, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_cpu_init": (P, []),
    "ggml_backend_cpu_set_n_threads": (None, [P, ctypes.c_int]),
    "ggml_backend_graph_compute": (ctypes.c_int, [P, P]),
    "ggml_backend_free": (None, [P]),
    "gguf_init_from_file": (P, [ctypes.c_char_p, _GgufInitParams]),
    "gguf_free": (None, [P]),
    "gguf_find_tensor": (ctypes.c_int64, [P, ctypes.c_char_p]),
    "gguf_get_data_offset": (ctypes.c_size_t, [P]),
    "gguf_get_tensor_offset": (ctypes.c_size_t, [P, ctypes.c_int64]),
    "gguf_get_tensor_type": (ctypes.c_int, [P, ctypes.c_int64]),
    "gguf_get_tensor_ne": (ctypes.POINTER(ctypes.c_int64), [P, ctypes.c_int64]),
    **{f"ggml_cpu_has_{name}": (ctypes.c_int, []) for name in INSTRUCTION_SETS},
}
_EXTRA_BUFTS_FN = ctypes.CFUNCTYPE(ctypes.POINTER(P), P)  # ggml_backend_dev_get_extra_bufts_t


def llama_cpp_lib_dir() -> Path:
    """The installed llama-cpp-python's libraries, found without importing llama_cpp (which would load them)."""
    return Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"


class Ggml:
    """The three ggml libraries of one build, their functions bound with types."""

    def __init__(self, lib_dir: Path):
        self.lib_dir = Path(lib_dir)
        self._libs = [ctypes.CDLL(str(self.lib_dir / name), mode=ctypes.RTLD_GLOBAL)
                      for name in ("libggml-base.so", "libggml-cpu.so", "libggml.so")]
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = self._symbol(name)
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name, function)

    def _symbol(self, name: str):
        for lib in self._libs:
            if hasattr(lib, name):
                return getattr(lib, name)
        raise AttributeError(f"{name} is in none of the ggml libraries in {self.lib_dir}")

    def batch_invariant_max_rows(self) -> int | None:
        """What the build claims (None: an upstream build, without the claim)."""
        if not hasattr(self._libs[1], "ggml_cpu_batch_invariant_max_rows"):
            return None
        return self._libs[1].ggml_cpu_batch_invariant_max_rows()

    def instruction_set(self) -> str:
        return " ".join(name for name in INSTRUCTION_SETS if getattr(self, f"ggml_cpu_has_{name}")()) or "no AVX2"

    def repack_buffer_type(self) -> int:
        """The CPU device's extra buffer type that repacks weights (llama.cpp puts weights there when it can)."""
        device = self.ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
        registry = self.ggml_backend_dev_backend_reg(device)
        address = self.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_dev_get_extra_bufts")
        extra = _EXTRA_BUFTS_FN(address)(device)
        names = []
        for i in range(64):
            if not extra[i]:
                break
            names.append(self.ggml_backend_buft_name(extra[i]))
            if names[-1] == _REPACK_BUFFER:
                return extra[i]
        raise RuntimeError(f"no {_REPACK_BUFFER.decode()} among the CPU's extra buffer types {names}")

    def quantize(self, values: np.ndarray, type_name: str) -> bytes:
        rows, width = values.shape
        values = np.ascontiguousarray(values, dtype=np.float32)
        out = ctypes.create_string_buffer(rows * self.ggml_row_size(GGML_TYPES[type_name], width))
        self.ggml_quantize_chunk(GGML_TYPES[type_name], values.ctypes.data, out, 0, rows, width, None)
        return out.raw


@dataclass(frozen=True)
class Weight:
    type_name: str
    width: int  # ne0: the values in a row (the reduction length)
    rows: int  # ne1: output features
    data: bytes


def read_weight(ggml: Ggml, path: Path, name: str, rows: int) -> Weight:
    """The first rows of one tensor of a GGUF file, as stored. ggml's own GGUF reader: gguf-py's GGUFReader first
    parses the tokenizer's 151k-entry arrays in Python (7-18 s for a Qwen2.5 file here)."""
    gguf = ggml.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    if not gguf:
        raise RuntimeError(f"ggml cannot read {path}")
    try:
        tensor = ggml.gguf_find_tensor(gguf, name.encode())
        if tensor < 0:
            raise KeyError(f"no tensor {name} in {path}")
        ne = ggml.gguf_get_tensor_ne(gguf, tensor)  # points into the context: copied before gguf_free below
        type_id, shape = ggml.gguf_get_tensor_type(gguf, tensor), (int(ne[0]), int(ne[1]))
        offset = ggml.gguf_get_data_offset(gguf) + ggml.gguf_get_tensor_offset(gguf, tensor)
    finally:
        ggml.gguf_free(gguf)
    type_name = {v: k for k, v in GGML_TYPES.items()}[type_id]
    width, rows = shape[0], min(rows, shape[1])
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read(rows * ggml.ggml_row_size(type_id, width))
    return Weight(type_name, width, rows, data)


def requantized(ggml: Ggml, weight: Weight, type_name: str) -> Weight:
    """The weight's values (dequantized by gguf-py) stored as another type, by ggml's quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = np.frombuffer(weight.data, dtype=np.uint8).reshape(weight.rows, -1)
    values = dequantize(raw, GGMLQuantizationType[weight.type_name]).reshape(weight.rows, weight.width)
    return Weight(type_name, weight.width, weight.rows, ggml.quantize(values, type_name))


def _read_rows(ggml: Ggml, tensor: int, rows: int) -> np.ndarray:
    data = ctypes.string_at(ggml.ggml_get_data(tensor), ggml.ggml_nbytes(tensor))
    return np.frombuffer(data, dtype=np.float32).reshape(rows, -1).copy()


def matmul_passes(ggml: Ggml, weight: Weight, activations: np.ndarray, row_counts=ROW_COUNTS,
                  repacked: bool = False) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One-row passes over each activation row, and for each N a pass over the first N rows, in one graph.

    Returns (single, passes): single[i] is row i's output alone, passes[N][i] its output in the N-row pass."""
    n_act = activations.shape[0]
    weight_ctx = ggml.ggml_init(_InitParams(ggml.ggml_tensor_overhead(), None, True))
    graph_ctx = ggml.ggml_init(_InitParams(ggml.ggml_tensor_overhead() * (2 + 2 * (n_act + len(row_counts)))
                                           + ggml.ggml_graph_overhead(), None, True))
    backend = ggml.ggml_backend_cpu_init()
    buffers = []
    try:
        w = ggml.ggml_new_tensor_2d(weight_ctx, GGML_TYPES[weight.type_name], weight.width, weight.rows)
        buft = ggml.repack_buffer_type() if repacked else ggml.ggml_backend_cpu_buffer_type()
        buffers.append(ggml.ggml_backend_alloc_ctx_tensors_from_buft(weight_ctx, buft))
        ggml.ggml_backend_tensor_set(w, weight.data, 0, len(weight.data))  # the repacking buffer repacks here

        x = ggml.ggml_new_tensor_2d(graph_ctx, GGML_TYPES["F32"], weight.width, n_act)
        row_bytes = weight.width * 4

        def product(first: int, count: int) -> int:
            return ggml.ggml_mul_mat(graph_ctx, w, ggml.ggml_view_2d(graph_ctx, x, weight.width, count, row_bytes,
                                                                     first * row_bytes))

        single = [product(i, 1) for i in range(n_act)]
        passes = {n: product(0, n) for n in row_counts}
        buffers.append(ggml.ggml_backend_alloc_ctx_tensors_from_buft(graph_ctx, ggml.ggml_backend_cpu_buffer_type()))
        x_data = np.ascontiguousarray(activations, dtype=np.float32)
        ggml.ggml_backend_tensor_set(x, x_data.ctypes.data, 0, x_data.nbytes)
        graph = ggml.ggml_new_graph(graph_ctx)
        for node in [*single, *passes.values()]:
            ggml.ggml_build_forward_expand(graph, node)
        ggml.ggml_backend_cpu_set_n_threads(backend, THREADS)
        status = ggml.ggml_backend_graph_compute(backend, graph)
        if status != 0:
            raise RuntimeError(f"ggml_backend_graph_compute failed: status {status}")
        return (np.concatenate([_read_rows(ggml, t, 1) for t in single]),
                {n: _read_rows(ggml, t, n) for n, t in passes.items()})
    finally:
        for buffer in buffers:
            if buffer:
                ggml.ggml_backend_buffer_free(buffer)
        ggml.ggml_backend_free(backend)
        ggml.ggml_free(graph_ctx)
        ggml.ggml_free(weight_ctx)


def differing_row_counts(single: np.ndarray, passes: dict[int, np.ndarray]) -> list[int]:
    """The N whose pass gives some row other bits than that row's one-row pass."""
    return [n for n, out in passes.items() if not np.array_equal(out.view(np.uint32), single[:n].view(np.uint32))]


# label: (tensor of the Qwen2.5-Coder 1.5B Q4_K_M file, its first rows, the type it is tested as, repacked)
CASES = {
    "Q4_K repacked": ("blk.0.ffn_gate.weight", 256, "Q4_K", True),
    "Q4_K": ("blk.0.ffn_gate.weight", 256, "Q4_K", False),
    "Q5_K": ("blk.0.ffn_up.weight", 256, "Q5_K", False),
    "Q6_K": ("blk.0.ffn_down.weight", 256, "Q6_K", False),  # 8960 wide
    "Q8_0": ("blk.0.ffn_up.weight", 256, "Q8_0", False),
    "F16": ("blk.0.ffn_up.weight", 256, "F16", False),
    "F32": ("blk.0.ffn_up.weight", 256, "F32", False),
}


def case_weight(ggml: Ggml, model: Path, label: str) -> Weight:
    tensor, rows, type_name, _ = CASES[label]
    weight = read_weight(ggml, model, tensor, rows)
    return weight if weight.type_name == type_name else requantized(ggml, weight, type_name)


def random_activations(width: int, rows: int = max(ROW_COUNTS), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32)


def check(ggml: Ggml, model: Path, labels=tuple(CASES)) -> dict[str, list[int]]:
    """For each case, the row counts N whose pass differs from one-row passes (empty: batch-invariant)."""
    result = {}
    for label in labels:
        weight = case_weight(ggml, model, label)
        single, passes = matmul_passes(ggml, weight, random_activations(weight.width), repacked=CASES[label][3])
        result[label] = differing_row_counts(single, passes)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--lib", type=Path, default=None, help="a directory with libggml*.so (default: llama_cpp's)")
    args = parser.parse_args()
    ggml = Ggml(args.lib or llama_cpp_lib_dir())
    json.dump({"instruction_set": ggml.instruction_set(), "max_rows": ggml.batch_invariant_max_rows(),
               "differing": check(ggml, args.model)}, sys.stdout)


if __name__ == "__main__":
    main()
