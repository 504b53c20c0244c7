"""Runners: run a model's forward pass and own its KV cache. The engine talks to nothing else."""

from .base import Runner, Tokenizer

__all__ = ["Runner", "Tokenizer", "open_runner"]


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
