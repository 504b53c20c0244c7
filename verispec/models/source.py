"""What a model is once found: a ModelSource (a checked GGUF file or a Hugging Face directory), and the GGUF check.

Below both ways of getting one (files.py resolves what the user typed; quantize.py derives a requantized copy),
so neither has to import the other to name the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError
from . import registry

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """A model the runners can open: a GGUF file, or a Hugging Face model directory."""

    label: str
    path: Path
    kind: str  # "gguf" | "hf"
    spec: registry.ModelSpec | None = None

    @property
    def file_bytes(self) -> int:
        if self.kind == "gguf":
            return self.path.stat().st_size
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors")) or sum(
            f.stat().st_size for f in self.path.glob("*.bin")
        )


def check_gguf(path: Path) -> None:
    """Reject non-GGUF and truncated files with a message, before llama.cpp prints its own noise."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    from ..llama_lib import gguf_tensor_data_end

    end = gguf_tensor_data_end(path)
    if end is None:
        raise ModelFileError(f"{path} is not a readable GGUF file (truncated or corrupted header)")
    size = path.stat().st_size
    if end > size:
        raise ModelFileError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}")
