"""Runners: run a model's forward pass and own its KV cache. The engine talks to nothing else."""

from .base import Runner, Tokenizer

__all__ = ["Runner", "Tokenizer", "open_pool", "open_runner"]


def open_runner(source, backend: str = "auto", **kwargs) -> Runner:
    """Open a ModelSource on a backend: 'llamacpp' for GGUF (the CPU fast path), 'torch' for HF dirs or GGUF."""
    if backend == "auto":
        backend = "llamacpp" if source.kind == "gguf" else "torch"
    if backend == "torch":
        # The torch runner scores every verify pass in one pass; its noise against one-row passes is measured
        # by the bench (verify_cost.pass_shape_noise), so it takes --verify without acting on it.
        _check_verify(kwargs.pop("verify", "exact"))
    if backend == "llamacpp":
        _check_no_dtype(kwargs.pop("dtype", "auto"))
        if source.kind != "gguf":
            from ..errors import ModelFileError

            raise ModelFileError(f"the llama.cpp runner needs a GGUF file; {source.path} is a Hugging Face directory (use --backend torch)")
        from .llamacpp import LlamaCppRunner

        return LlamaCppRunner(source, **kwargs)
    if backend == "torch":
        from .torch import TorchRunner

        return TorchRunner.from_source(source, **kwargs)
    from ..errors import InvalidParameter

    raise InvalidParameter(f"unknown backend {backend!r}: use llamacpp, torch or auto", "backend")


def open_pool(target: Runner, n_cells: int, n_seqs: int, prefix_entries: int = 0, trees: bool = False):
    """A KV pool on the target's weights: n_seqs sequences sharing n_cells cells (runners/pool.py), with up to
    `prefix_entries` cached prompt prefixes, and token trees with `trees`. llama.cpp: one context, a sequence per
    request (llamacpp_pool.py); torch: paged KV blocks, prefixes shared by block, chains only (torch_pool.py).
    PoolUnsupported where there is none: the server then gives each slot a context of its own (context_pool.py)."""
    from .llamacpp import LlamaCppRunner
    from .pool import PoolUnsupported
    from .torch import TorchRunner

    if isinstance(target, LlamaCppRunner):
        from .llamacpp_pool import KvPool

        return KvPool(target, n_cells, n_seqs, prefix_entries=prefix_entries,
                      tree_leaves=target.max_tree_leaves if trees else 0)
    if isinstance(target, TorchRunner):
        from .torch_pool import PagedPool

        if trees:
            raise PoolUnsupported("the paged torch pool runs chains only, not token trees", "tree")
        return PagedPool(target, n_cells, n_seqs, prefix_entries=prefix_entries)
    raise PoolUnsupported(f"the shared KV pool cannot hold a {type(target).__name__} target (serve with --kv-pool 0)",
                          "kv_pool")


def _check_verify(mode: str) -> None:
    from .llamacpp import VERIFY_MODES

    if mode not in VERIFY_MODES:
        from ..errors import InvalidParameter

        raise InvalidParameter(f"verify must be one of {', '.join(VERIFY_MODES)}, got {mode!r}", "verify")


def _check_no_dtype(dtype: str) -> None:
    """llama.cpp computes in the GGUF file's own formats: --dtype is the torch runner's."""
    if dtype != "auto":
        from ..errors import InvalidParameter

        raise InvalidParameter(f"--dtype {dtype} applies to the torch backend; llama.cpp runs the GGUF file's own "
                               "quantization (requantize the file for another format)", "dtype")
