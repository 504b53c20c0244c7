"""Turn what the user typed (a registered name, a GGUF path, a Hugging Face directory) into a checked file."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFileError, ModelNotFound
from . import registry
from .source import ModelSource, check_gguf


def resolve(name_or_path: str, pull_if_missing: bool = False) -> ModelSource:
    """A registered name must be pulled (or pull_if_missing); a path must exist and be a model.

    NAME:FORMAT (e.g. qwen2.5-coder-1.5b:q4_0), with a registered name or a GGUF path before the colon, is
    that model requantized to FORMAT (see quantize.py), made on first use and cached.
    """
    base, sep, fmt = name_or_path.rpartition(":")
    if sep and name_or_path not in registry.REGISTRY and not Path(name_or_path).expanduser().exists() and (
            base in registry.REGISTRY or Path(base).expanduser().is_file()):
        from . import quantize

        if fmt.lower() not in quantize.FORMATS:
            raise ModelNotFound(f"unknown format {fmt!r} in {name_or_path!r}: a model name may end in "
                                f"{', '.join(':' + f for f in quantize.FORMATS)} (a copy requantized by llama.cpp)")
        return quantize.requantize(resolve(base, pull_if_missing), fmt)
    if name_or_path in registry.REGISTRY:
        spec = registry.get_spec(name_or_path)
        state = registry.status(spec)
        if state in ("missing", "corrupt") and pull_if_missing:
            registry.pull(spec)
            state = registry.status(spec)
        if state == "missing":
            raise ModelNotFound(f"model {spec.name} is not downloaded yet: run `verispec models pull {spec.name}`")
        if state == "corrupt":
            raise ModelFileError(
                f"model {spec.name} at {registry.model_path(spec)} has the wrong size (truncated or corrupted): "
                f"run `verispec models pull {spec.name} --force`"
            )
        if state == "unverified" and not registry.verify(spec):
            raise ModelFileError(f"model {spec.name} fails its sha256 check: run `verispec models pull {spec.name} --force`")
        return ModelSource(spec.name, registry.model_path(spec), "gguf", spec)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if "/" not in name_or_path and not name_or_path.endswith(".gguf"):
            registry.get_spec(name_or_path)  # raises the "unknown model" message listing known names
        raise ModelNotFound(f"model path {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFileError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        return ModelSource(path.name, path, "hf")
    check_gguf(path)
    return ModelSource(path.name, path, "gguf")
