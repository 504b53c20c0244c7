"""Derived formats: a Q4_0 or Q8_0 copy of a GGUF model, made with llama.cpp's own `llama_model_quantize`.

ggml's CPU kernels for these block formats batch more cheaply than the K-quants the registered models ship
in, which matters for verification (one pass over K tokens). The copy is cached next to the models, in
VERISPEC_HOME/models/derived/<stem>.<format>.gguf, with a small JSON note of the source it was made from;
a copy whose source changed since is made again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InvalidParameter, ModelFileError
from . import registry
from .source import ModelSource, check_gguf

# Format suffix -> name of the llama_ftype constant in llama_cpp.
FORMATS = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def derived_dir() -> Path:
    return registry.home() / "models" / "derived"


def check_format(ftype: str) -> str:
    """The canonical (lower-case) format name, or an InvalidParameter listing the accepted ones."""
    name = str(ftype).strip().lower()
    if name not in FORMATS:
        raise InvalidParameter(f"unknown derived format {ftype!r}: accepted formats are {', '.join(FORMATS)}", "format")
    return name


def derived_path(source: ModelSource, ftype: str) -> Path:
    return derived_dir() / f"{source.path.stem}.{check_format(ftype)}.gguf"


def _source_note(source: ModelSource, ftype: str) -> dict:
    st = source.path.stat()
    return {"source": str(source.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": ftype}


def requantize(source: ModelSource, ftype: str) -> ModelSource:
    """A `ftype` (q4_0 | q8_0) copy of a GGUF model: reused from the cache if made from the same file, else made now."""
    ftype = check_format(ftype)
    if source.kind != "gguf":
        raise ModelFileError(f"{source.label}: only GGUF files can be requantized, not a {source.kind} model ({source.path})")
    out = derived_path(source, ftype)
    note_path = out.with_name(out.name + ".source.json")
    note = _source_note(source, ftype)
    label = f"{source.label}:{ftype}"
    if out.exists() and note_path.exists():
        try:
            if json.loads(note_path.read_text()) == note:
                return ModelSource(label, out, "gguf")
        except (OSError, ValueError):
            pass  # an unreadable note: make the file again
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    try:
        _quantize(source.path, partial, ftype)
        check_gguf(partial)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    note_path.write_text(json.dumps(note))
    return ModelSource(label, out, "gguf")


def _quantize(src: Path, dst: Path, ftype: str) -> None:
    import ctypes

    import llama_cpp as L

    from ..llama_lib import default_threads, init_backend

    init_backend(False)  # silences llama.cpp's log
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, FORMATS[ftype])
    params.allow_requantize = True
    params.nthread = default_threads()
    status = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0 or not dst.exists():
        raise ModelFileError(f"llama.cpp could not requantize {src} to {ftype} (status {status}): "
                             "unsupported architecture, damaged file or no disk space")
