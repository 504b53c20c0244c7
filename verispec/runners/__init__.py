"""Runners: run a model's forward pass and own its KV cache. The engine talks to nothing else."""

from .base import Runner, Tokenizer, tree_depths

__all__ = ["Runner", "Tokenizer", "tree_depths", "open_runner"]


def open_runner(source, backend: str = "auto", **kwargs) -> Runner:
    """Open a ModelSource on a backend: 'llamacpp' for GGUF (the CPU fast path), 'torch' for HF dirs or GGUF."""
    if backend == "auto":
        backend = "llamacpp" if source.kind == "gguf" else "torch"
    if backend == "llamacpp":
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
