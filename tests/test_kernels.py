"""Batch invariance of ggml's matmul kernels on real Qwen2.5-Coder 1.5B weights: for N = 1..64 every row of an
N-row pass has the bits of that row in a one-row pass (build-support/ggml-batch-invariant.patch), for each
weight type the shipped models use, Q4_K both repacked (as llama.cpp loads it on AVX2) and in a plain buffer.

The same check fails on upstream's kernels: with GGML_CPU_BATCH_INVARIANT=0 (upstream's kernel choices) and,
when VERISPEC_UPSTREAM_GGML_LIB names the lib/ folder of an unpatched llama-cpp-python build, on that build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ggml_kernels import (CASES, ROW_COUNTS, Ggml, case_weight, differing_row_counts, llama_cpp_lib_dir,
                                matmul_passes, random_activations)

pytestmark = pytest.mark.real

# On x86 (AVX2, AVX-512): with upstream's kernel choices, the first N whose pass differs, for each case that
# does. The tiled K-quant matmul takes passes of >= 8 rows; tinyBLAS takes >= 2 rows and leaves one-row
# passes to vec_dot, which sums F16/F32 in another order (Q8_0's tinyBLAS sums per block as vec_dot does).
UPSTREAM_CHOICES_DIFFER_FROM = {"Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "F16": 2, "F32": 2}
# An unpatched build also repacks Q4_K into a gemv (1-3 rows) that rounds otherwise than the gemm (4+ rows);
# the patch's gemv fix is not behind GGML_CPU_BATCH_INVARIANT.
UPSTREAM_BUILD_DIFFERS_FROM = {**UPSTREAM_CHOICES_DIFFER_FROM, "Q4_K repacked": 4}


@pytest.fixture(scope="module")
def ggml() -> Ggml:
    pytest.importorskip("llama_cpp")
    ggml = Ggml(llama_cpp_lib_dir())
    max_rows = ggml.batch_invariant_max_rows()
    assert max_rows is not None, f"the ggml in {ggml.lib_dir} lacks build-support/ggml-batch-invariant.patch"
    if max_rows < max(ROW_COUNTS):
        pytest.skip(f"this build keeps rows batch-invariant up to {max_rows} rows only on {ggml.instruction_set()}"
                    " (0: not x86 with AVX2, or GGML_CPU_BATCH_INVARIANT=0)")
    print(f"\nggml kernels on {ggml.instruction_set()}")
    return ggml


@pytest.fixture(scope="module")
def qwen_path(qwen_source) -> Path:
    return Path(qwen_source.path)


@pytest.mark.parametrize("label", CASES)
def test_rows_of_a_pass_match_one_row_passes(ggml, qwen_path, label):
    weight = case_weight(ggml, qwen_path, label)
    single, passes = matmul_passes(ggml, weight, random_activations(weight.width), repacked=CASES[label][3])
    if CASES[label][3]:
        plain, _ = matmul_passes(ggml, weight, random_activations(weight.width), row_counts=(), repacked=False)
        assert (single != plain).any(), "the repacked Q4_K gave the plain buffer's bits: was it repacked at all?"
    assert differing_row_counts(single, passes) == [], (
        f"{label} ({weight.rows}x{weight.width}) on {ggml.instruction_set()}: rows differ from one-row passes at N ="
        f" {differing_row_counts(single, passes)}")


def _check_in_fresh_process(qwen_path: Path, *extra_args: str, **env: str) -> dict:
    worker = Path(__file__).with_name("ggml_kernels.py")
    done = subprocess.run([sys.executable, str(worker), "--model", str(qwen_path), *extra_args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _assert_differs(result: dict, expected_from: dict[str, int], where: str) -> None:
    for label, first in expected_from.items():
        assert result["differing"][label] == list(range(first, max(ROW_COUNTS) + 1)), (
            f"{label} with {where} on {result['instruction_set']}: expected rows to differ at N >= {first},"
            f" they differ at N = {result['differing'][label]}")


def test_the_check_fails_on_upstream_kernel_choices(ggml, qwen_path):
    result = _check_in_fresh_process(qwen_path, GGML_CPU_BATCH_INVARIANT="0")
    assert result["max_rows"] == 0
    _assert_differs(result, UPSTREAM_CHOICES_DIFFER_FROM, "GGML_CPU_BATCH_INVARIANT=0")


@pytest.mark.skipif(not os.environ.get("VERISPEC_UPSTREAM_GGML_LIB"),
                    reason="VERISPEC_UPSTREAM_GGML_LIB does not name an unpatched build's lib/ folder")
def test_the_check_fails_on_an_unpatched_build(qwen_path):
    result = _check_in_fresh_process(qwen_path, "--lib", os.environ["VERISPEC_UPSTREAM_GGML_LIB"])
    assert result["max_rows"] is None, "VERISPEC_UPSTREAM_GGML_LIB names a patched build"
    _assert_differs(result, UPSTREAM_BUILD_DIFFERS_FROM, "an unpatched build")
