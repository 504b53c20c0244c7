"""Lossless at every length: on llama.cpp with 2 threads, past ggml's 512-cell attention threshold.

Upstream, a one-row pass over a KV view of >= 512 cells takes flash attention's split-KV path, which
sums across threads in another order than the 2-3-row passes of an exact verify step; greedy
speculative output then drifted from plain decoding on long prompts. verispec's build splits every
pass of <= 3 rows by blocks of visible cells instead (llama_lib.py, init_backend). These tests check
the rows themselves, show that they differ under upstream's split (so the check has power) and that
the visible-block split is on, and check greedy equality of every lossless drafter and mode on
prompts of 1,000+ tokens.
"""

import inspect
import os
import textwrap

import numpy as np
import pytest

from verispec.engine import SpeculativeConfig, Stats
from verispec.llama_lib import SPLIT_KV_EXACT, build_info, exact_attention
from verispec.llama_lib import exact_pass_rows
from verispec.runners.llamacpp import LlamaCppRunner
from verispec.sampling import SamplingParams

pytestmark = pytest.mark.real


def long_document(tokenizer, n_tokens: int) -> str:
    """Real, stable text of about n_tokens tokens: the source of Python's textwrap module."""
    source = inspect.getsource(textwrap)
    while len(tokenizer.encode(source)) < n_tokens:
        source += "\n" + source
    tokens = tokenizer.encode(source, add_special=False)[:n_tokens]
    return tokenizer.decode(tokens)


def rows_alone_and_in_passes(runner: LlamaCppRunner, context: list[int], k: int, chunk: int,
                             more_k: tuple[int, ...] = ()) -> float:
    """Largest |logit difference| between K tokens scored one by one and the same tokens in passes of `chunk`,
    after the context less its last max(K) tokens (prefilled once for every K in (k, *more_k))."""
    ks = (k, *more_k)
    prefix, probes = context[: -max(ks)], context[-max(ks):]
    runner.reset()
    runner.forward(prefix, all_logits=False)
    base, worst = runner.n_past, 0.0
    saved = runner.exact_chunk
    try:
        for n in ks:
            alone = np.stack([runner.forward([t])[0].copy() for t in probes[:n]])
            runner.rollback(base)
            runner.exact_chunk = chunk
            together = runner.forward(probes[:n]).copy()
            runner.exact_chunk = saved
            runner.rollback(base)
            worst = max(worst, float(np.abs(together - alone).max()))
    finally:
        runner.exact_chunk = saved
        runner.reset()
    return worst


@pytest.fixture(scope="module")
def qwen_target(qwen_pair):
    return qwen_pair.target


def test_the_build_keeps_one_row_passes_off_the_split_kv_path(qwen_target):
    assert exact_attention(), "llama-cpp-python was not built by `make install` (build-support/llama-cpp.sh)"
    assert qwen_target.exact_chunk == exact_pass_rows() and qwen_target.verify_mode == "exact"


@pytest.mark.parametrize("context_tokens", [200, 1200])
def test_exact_chunks_are_bit_identical_to_one_row_passes(qwen_target, context_tokens):
    context = qwen_target.tokenizer.encode(long_document(qwen_target.tokenizer, context_tokens))
    assert len(context) >= context_tokens - 5
    assert rows_alone_and_in_passes(qwen_target, context, 2, exact_pass_rows(), more_k=(3, 8)) == 0.0, context_tokens


# Pass sizes across the batch-invariant range: the repacked Q4_K's groups of 4 and their remainders, the tiled
# K-quant matmul's 8+ upstream, flash attention's 64-row tile, and the range's end.
INVARIANT_PASS_SIZES = (2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 24, 31, 32, 33, 48, 63, 64)


@pytest.fixture(scope="module")
def qwen_long(request):
    from tests.conftest import _require

    runner = LlamaCppRunner(_require("qwen2.5-coder-1.5b"), n_ctx=4096 + 256)
    yield runner
    runner.close()


@pytest.mark.parametrize("context_tokens", [100, 1500, 4000])
def test_every_row_of_passes_of_up_to_64_rows_is_its_one_row_pass(qwen_long, context_tokens):
    """The batch-invariant build (build-support/ggml-batch-invariant.patch): on the Qwen target, whose Q4_K and
    Q6_K kernels change with the rows of a pass upstream, every row of a pass of 2-64 rows has the bits of the
    same token decoded alone, at short and long contexts; so exact verification scores a draft in one pass."""
    assert exact_pass_rows() == 64, "llama-cpp-python was not built with the batch-invariant patch (`make install`)"
    k_max = max(INVARIANT_PASS_SIZES)
    context = qwen_long.tokenizer.encode(long_document(qwen_long.tokenizer, context_tokens + k_max))
    assert rows_alone_and_in_passes(qwen_long, context[: context_tokens + k_max], INVARIANT_PASS_SIZES[0], k_max,
                                    more_k=INVARIANT_PASS_SIZES[1:]) == 0.0, context_tokens


def with_split(value: str, fn):
    """fn() with ggml's attention split set to `value` (read by ggml at every attention op)."""
    os.environ["GGML_CPU_FA_SPLIT_KV"] = value
    try:
        return fn()
    finally:
        os.environ["GGML_CPU_FA_SPLIT_KV"] = SPLIT_KV_EXACT


def test_under_upstreams_split_one_row_passes_differ_past_512_cells(qwen_target):
    """The check above has power: with upstream's split-KV path, the same rows differ."""
    context = qwen_target.tokenizer.encode(long_document(qwen_target.tokenizer, 1200))
    assert with_split("1", lambda: rows_alone_and_in_passes(qwen_target, context, 3, exact_pass_rows())) > 1e-3


def test_one_row_passes_split_by_visible_cells_and_under_256_cells_sum_as_before(qwen_target):
    """The visible-block split is on: past 256 visible cells a one-row pass sums otherwise than the per-row
    path (GGML_CPU_FA_SPLIT_KV=0), and under one block of 256 cells exactly as it does."""
    assert build_info()["visible_blocks"], "llama-cpp-python was not built from the current patch (`make install`)"

    def one_row_logits(context: list[int]) -> np.ndarray:
        qwen_target.reset()
        qwen_target.forward(context[:-1], all_logits=False)
        row = qwen_target.forward(context[-1:])[0].copy()
        qwen_target.reset()
        return row

    document = qwen_target.tokenizer.encode(long_document(qwen_target.tokenizer, 300))
    for n_cells, differs in ((200, False), (300, True)):
        split = one_row_logits(document[:n_cells])
        per_row = with_split("0", lambda: one_row_logits(document[:n_cells]))
        assert (np.abs(split - per_row).max() > 0) == differs, n_cells


def _prefill_in(pool, prompt: list[int], passes) -> np.ndarray:
    """The prompt's last logits and three greedy decode rows after prefilling it in these passes (sizes)."""
    done = 0
    for size in passes:
        out = pool.prefill_pass(0, prompt[done : done + size], last=done + size == len(prompt))
        done += size
    assert done == len(prompt)
    rows = [out[0]]
    for _ in range(3):
        rows.append(pool.decode([0], [int(rows[-1].argmax())], [True])[0].copy())
    pool.drop(0, 0)
    return np.stack(rows)


def test_prompt_rows_are_the_same_in_every_pass_layout_the_pool_allows(qwen_target):
    """The KV pool's prompt passes (runners/llamacpp_pool.py): on the batch-invariant build any layout of passes of
    up to 64 rows, at any start, gives a prompt the same bits whatever the stepper's budget. One pass of all 131
    rows takes upstream's kernels (past the invariant range) and differs, so the check has power."""
    from verispec.runners.llamacpp_pool import KvPool

    prompt = qwen_target.tokenizer.encode(long_document(qwen_target.tokenizer, 131))
    pool = KvPool(qwen_target, 512, 1)
    try:
        assert pool.reserve(0, 256)

        def layout(budgets) -> list[int]:
            passes, done = [], 0
            while done < len(prompt):
                passes.append(pool.prompt_pass(done, len(prompt), next(budgets)))
                done += passes[-1]
            return passes

        alone = layout(iter(lambda: 512, None))
        assert alone == [64, 64, len(prompt) - 128]
        reference = _prefill_in(pool, prompt, alone)
        rng = np.random.default_rng(0)
        for budgets in (iter(lambda: 1, None), iter(lambda: int(rng.integers(1, 70)), None)):
            passes = layout(budgets)
            assert max(passes) <= 64, passes
            assert np.array_equal(_prefill_in(pool, prompt, passes), reference), passes
        assert not np.array_equal(_prefill_in(pool, prompt, [len(prompt)]), reference)
    finally:
        pool.close()


def test_one_pass_verification_is_not_bit_identical_past_the_invariant_rows(qwen_target):
    """Why `--verify one-pass` is opt-in: past 64 rows a pass takes upstream's kernels (the tiled K-quant matmul,
    tiled flash attention), whose sums differ from one-row passes; within 64 rows it is exact's own pass."""
    context = qwen_target.tokenizer.encode(long_document(qwen_target.tokenizer, 300))
    assert rows_alone_and_in_passes(qwen_target, context, 80, 0) > 1e-3
    assert rows_alone_and_in_passes(qwen_target, context, 64, 0) == 0.0


def _generate(model, tokens: list[int], spec: SpeculativeConfig, n: int) -> tuple[list[int], Stats]:
    stats = Stats()
    out = [t for step in model.engine(spec).generate(tokens, SamplingParams(max_tokens=n, ignore_eos=True), stats)
           for t in step]
    return out, stats


def _long_prompt(model, n_tokens: int) -> list[int]:
    doc = long_document(model.tokenizer, n_tokens)
    return model.prompt_tokens(f"Here is a Python module:\n\n{doc}\n\nRewrite its first function with type hints.",
                               chat=True)


# Every lossless drafter and mode, pinned so that each drafts (K or the tree budget fixed).
SMOL_CONFIGS = {
    "ngram K=4": SpeculativeConfig(draft="ngram", draft_tokens=4),
    "draft model K=3": SpeculativeConfig(draft="smollm2-135m:q8_0", draft_tokens=3),
    "ngram tree w=3": SpeculativeConfig(draft="ngram", draft_tokens=4, tree_width=3),
    "static tree": SpeculativeConfig(draft="ngram", tree="static:3,2,1", tree_budget=6),
    "dynamic tree b=6": SpeculativeConfig(draft="smollm2-135m:q8_0", tree="dynamic", tree_budget=6),
    "cascade K=4": SpeculativeConfig(draft="cascade:ngram,smollm2-135m:q8_0", draft_tokens=4),
    "cascade prefix K=3": SpeculativeConfig(draft="cascade:ngram,smollm2-135m:q8_0", draft_tokens=3, acceptance="prefix"),
}


@pytest.fixture(scope="module")
def smol_long(smol_source):
    from verispec import load

    model = load("smollm2-135m", n_ctx=4096)
    yield model, _long_prompt(model, 1100)
    model.close()


@pytest.mark.parametrize("name", list(SMOL_CONFIGS))
def test_greedy_speculation_equals_plain_on_a_1100_token_prompt(smol_long, name):
    model, prompt = smol_long
    assert len(prompt) > 1000  # with 128 new tokens, every pass attends over 1,000-1,250 cells
    plain, _ = _plain(model, prompt)
    out, stats = _generate(model, prompt, SMOL_CONFIGS[name], 128)
    assert stats.drafted > 0 and stats.accepted > 0, name
    assert out == plain, f"{name}: first difference at {next(i for i, (a, b) in enumerate(zip(out, plain)) if a != b)}"


_PLAIN_CACHE: dict[tuple[int, int], tuple[list[int], Stats]] = {}


def _plain(model, prompt: list[int]) -> tuple[list[int], Stats]:
    key = (id(model), len(prompt))
    if key not in _PLAIN_CACHE:
        _PLAIN_CACHE[key] = _generate(model, prompt, SpeculativeConfig(), 128)
    return _PLAIN_CACHE[key]


def test_greedy_speculation_equals_plain_on_the_qwen_pair_past_1000_tokens(qwen_pair):
    prompt = _long_prompt(qwen_pair, 1100)
    plain, _ = _generate(qwen_pair, prompt, SpeculativeConfig(), 48)
    for spec in (SpeculativeConfig(draft="ngram", draft_tokens=4),
                 SpeculativeConfig(draft="qwen2.5-coder-0.5b", draft_tokens=3)):
        out, stats = _generate(qwen_pair, prompt, spec, 48)
        assert stats.drafted > 0 and stats.accepted > 0, spec
        assert out == plain, spec
