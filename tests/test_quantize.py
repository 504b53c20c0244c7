"""Derived formats: a registered model requantized by llama.cpp (models/quantize.py), cached, and named NAME:FORMAT."""

import numpy as np
import pytest

from verispec.errors import InvalidParameter, ModelNotFound
from verispec.models import files, quantize

PROMPT = "The quick brown fox jumps over the lazy dog. Then the dog wakes up and runs after the fox into the forest, where"


def test_unknown_format_suffix_is_refused_with_the_accepted_ones():
    with pytest.raises(ModelNotFound, match=r"unknown format 'q5_k'.*:q4_0, :q8_0"):
        files.resolve("smollm2-135m:q5_k")
    with pytest.raises(InvalidParameter, match="accepted formats are q4_0, q8_0"):
        quantize.check_format("f16")
    with pytest.raises(ModelNotFound, match="unknown model"):
        files.resolve("no-such-model:q4_0")


@pytest.mark.real
def test_requantize_smollm2_to_q8_0(smol_source, smol_llama, derived_models):
    """The session's one q8_0 file (made here or by an earlier test: conftest.derived_models)."""
    from verispec.runners.llamacpp import LlamaCppRunner

    assert quantize.derived_dir() == derived_models
    derived = quantize.requantize(smol_source, "q8_0")
    assert derived.label == "smollm2-135m:q8_0" and derived.kind == "gguf"
    assert derived.path == derived_models / "SmolLM2-135M-Instruct.Q4_1.q8_0.gguf"
    files.check_gguf(derived.path)
    assert not list(derived.path.parent.glob("*.partial"))

    runner = LlamaCppRunner(derived, n_ctx=512)
    try:
        tokens = runner.tokenizer.encode(PROMPT)
        assert tokens == smol_llama.tokenizer.encode(PROMPT)
        smol_llama.reset()
        try:
            ours = np.argmax(runner.forward(tokens), axis=1)
            theirs = np.argmax(smol_llama.forward(tokens), axis=1)
        finally:
            smol_llama.reset()
    finally:
        runner.close()
    assert np.mean(ours == theirs) >= 0.8, (ours, theirs)

    mtime = derived.path.stat().st_mtime_ns
    again = quantize.requantize(smol_source, "q8_0")
    assert again == derived and derived.path.stat().st_mtime_ns == mtime  # reused, not made again


@pytest.mark.real
def test_resolve_a_derived_name(smol_source, derived_models):
    # The registered file lives in the real home; the derived copy goes to the session's folder.
    source = files.resolve("smollm2-135m:q4_0")
    assert source.label == "smollm2-135m:q4_0" and source.path == derived_models / "SmolLM2-135M-Instruct.Q4_1.q4_0.gguf"
    assert 0 < source.file_bytes < smol_source.file_bytes  # Q4_0 is smaller than the shipped Q4_1
