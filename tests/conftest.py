"""Shared fixtures: real models are loaded once per session (they are pulled by `make test`)."""

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _require(name: str):
    from verispec.models import files

    try:
        return files.resolve(name)
    except Exception as exc:  # not pulled: `make test` pulls them first
        pytest.skip(f"{name} not available ({exc}); run `verispec models pull {name}`")


@pytest.fixture(scope="session", autouse=True)
def derived_models(tmp_path_factory):
    """One folder for requantized files (NAME:q8_0, NAME:q4_0) for the whole session: each derived file is made
    once, by whichever test needs it first, and every other test reuses it; the real model cache is untouched."""
    from verispec.models import quantize

    folder = tmp_path_factory.mktemp("derived")
    patch = pytest.MonkeyPatch()
    patch.setattr(quantize, "derived_dir", lambda: folder)
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def smol_source():
    return _require("smollm2-135m")


@pytest.fixture(scope="session")
def smol_llama(smol_source):
    from verispec.runners.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(smol_source, n_ctx=2048)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def smol_torch(smol_source):
    from verispec.runners.torch import TorchRunner

    from tests.toy import TEST_DEVICE, TEST_DTYPE

    return TorchRunner.from_source(smol_source, n_ctx=2048, device=TEST_DEVICE, dtype=TEST_DTYPE)


@pytest.fixture(scope="session")
def qwen_source():
    return _require("qwen2.5-coder-1.5b")


@pytest.fixture(scope="session")
def qwen_pair():
    """The default target (llama.cpp) with the 0.5B draft loaded as a drafter."""
    _require("qwen2.5-coder-1.5b")
    _require("qwen2.5-coder-0.5b")
    from verispec import load

    model = load("qwen2.5-coder-1.5b", n_ctx=2048)
    model.drafter("qwen2.5-coder-0.5b")
    yield model
    model.close()
