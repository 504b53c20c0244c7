"""Runner contract on real kernels: one pass over N tokens equals N single passes; rollback; trees.

Tolerances (measured on this project's 2-core AVX2 machine):
- llama.cpp, scoring in chunks of <= 3 tokens (the default): bit-identical to single-token passes.
  With one pass over 4+ tokens (exact_chunk=0) logits differ by up to ~0.6 on Qwen2.5 Q4_K_M.
- transformers fp32 (sdpa): differences up to ~1e-5; we allow 1e-3.
- llama.cpp vs transformers on the same SmolLM2 GGUF: the same argmax; log-probs of the top 10
  tokens within 0.5 nats (measured up to 0.38: llama.cpp quantises activations to 8 bits).
"""

import numpy as np
import pytest

from tests.toy import tiny_runner
from verispec.token_tree import tree_depths

TORCH_TOL = 1e-3
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog because"


def _runners(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["smol_llama", "smol_torch", "tiny", "tiny-fixed-shapes"])
def runner(request):
    if request.param.startswith("tiny"):
        return tiny_runner(0, fixed_shapes=request.param.endswith("shapes"), scale=20)
    return request.getfixturevalue(request.param)


def tol(runner) -> float:
    return 0.0 if type(runner).__name__ == "LlamaCppRunner" else TORCH_TOL


def test_one_pass_equals_single_token_passes(runner):
    tokens = runner.tokenizer.encode(PROMPT_TEXT)[:12]
    runner.reset()
    batch = runner.forward(tokens).copy()
    runner.reset()
    singles = np.stack([runner.forward([t])[0].copy() for t in tokens])
    assert np.abs(batch - singles).max() <= tol(runner)
    assert runner.n_past == len(tokens)


def test_rollback_then_refeed_equals_never_going_past(runner):
    tokens = runner.tokenizer.encode(PROMPT_TEXT)[:10]
    runner.reset()
    reference = runner.forward(tokens).copy()
    runner.rollback(4)
    assert runner.n_past == 4
    runner.forward([7, 8, 9])  # go somewhere else, then come back
    runner.rollback(4)
    again = runner.forward(tokens[4:]).copy()
    assert np.abs(again - reference[4:]).max() <= tol(runner)


def random_tree(rng: np.random.Generator, n: int, vocab: int) -> tuple[list[int], list[int]]:
    parents = [-1] + [int(rng.integers(-1, i)) if rng.random() < 0.15 else int(rng.integers(max(0, i - 3), i)) for i in range(1, n)]
    tokens = [int(t) for t in rng.integers(100, vocab - 1, size=n)]
    return tokens, parents


def path_to(node: int, parents: list[int]) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("seed", range(6))
def test_tree_logits_equal_each_path_decoded_alone(runner, seed):
    rng = np.random.default_rng(seed)
    n = [1, 2, 7, 16, 33, 64][seed]
    prefix = runner.tokenizer.encode(PROMPT_TEXT)[:6]
    tokens, parents = random_tree(rng, n, min(runner.n_vocab, 5000))
    if type(runner).__name__ == "LlamaCppRunner":
        leaves = n - len({p for p in parents if p >= 0})
        if leaves > runner.max_tree_leaves:
            pytest.skip("more leaves than sequences")
    runner.reset()
    runner.forward(prefix)
    tree_rows = runner.forward(tokens, parents).copy()
    runner.keep_path([])
    checks = rng.choice(n, size=min(n, 6), replace=False)
    for node in checks:
        runner.rollback(len(prefix))
        alone = runner.forward([tokens[i] for i in path_to(int(node), parents)])[-1]
        assert np.abs(tree_rows[node] - alone).max() <= tol(runner) + 1e-5, f"node {node}"


@pytest.mark.parametrize("seed", range(4))
def test_cache_holds_exactly_the_kept_path(runner, seed):
    rng = np.random.default_rng(100 + seed)
    prefix = runner.tokenizer.encode(PROMPT_TEXT)[:6]
    tokens, parents = random_tree(rng, 12, min(runner.n_vocab, 5000))
    node = int(rng.integers(0, 12))
    path = path_to(node, parents)
    runner.reset()
    runner.forward(prefix)
    runner.forward(tokens, parents)
    runner.keep_path(path)
    assert runner.n_past == len(prefix) + len(path)
    after_tree = runner.forward([42]).copy()[0]
    runner.reset()
    plain = runner.forward(prefix + [tokens[i] for i in path] + [42])[-1]
    assert np.abs(after_tree - plain).max() <= tol(runner) + 1e-5


def test_tree_depths():
    assert tree_depths([-1, 0, 0, 1, -1]).tolist() == [0, 1, 1, 2, 0]
    with pytest.raises(ValueError):
        tree_depths([1, -1])


def test_both_runners_agree_on_smollm2(smol_llama, smol_torch):
    for text in ["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 4, 5,", "Once upon a time, there was a"]:
        ids = smol_llama.tokenizer.encode(text)
        assert ids == smol_torch.tokenizer.encode(text)
        smol_llama.reset()
        smol_torch.reset()
        a = smol_llama.forward(ids)[-1].astype(np.float64)
        b = smol_torch.forward(ids)[-1].astype(np.float64)
        assert a.argmax() == b.argmax()
        la, lb = a - np.logaddexp.reduce(a), b - np.logaddexp.reduce(b)
        top = np.argsort(-la)[:10]
        assert np.abs(la[top] - lb[top]).max() < 0.5


def test_unexact_llama_batches_are_noisy_but_close(smol_source):
    """Documents why exact chunks exist: one pass over many tokens is not batch-invariant."""
    from verispec.runners.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(smol_source, n_ctx=512, exact_chunk=0)
    tokens = runner.tokenizer.encode(PROMPT_TEXT)[:12]
    batch = runner.forward(tokens).copy()
    runner.reset()
    singles = np.stack([runner.forward([t])[0].copy() for t in tokens])
    runner.close()
    assert np.abs(batch - singles).max() < 2.0
    assert (batch.argmax(1) == singles.argmax(1)).mean() > 0.8


def test_torch_cache_is_preallocated_and_rolls_back_by_position():
    """The torch runner's KV lives in buffers sized to the context: appending, rolling back and keeping a tree
    path never reallocate them, and a rolled-back cache scores exactly as one that never held the dropped cells."""
    from verispec.runners.torch_cache import PreallocatedLayer

    runner = tiny_runner(3, scale=10)
    prompt = runner.tokenizer.encode("abcdefgh")
    runner.forward(prompt)
    layer = runner.cache.layers[0]
    assert isinstance(layer, PreallocatedLayer) and layer._keys.shape[2] == runner.n_ctx
    buffer = layer._keys.data_ptr()
    runner.forward([40, 41, 42, 43])
    runner.rollback(len(prompt) + 1)
    assert layer.get_seq_length() == len(prompt) + 1
    rolled = runner.forward([50]).copy()[0]
    runner.forward([60, 61, 62], parents=[-1, 0, 0])
    runner.keep_path([0, 2])
    assert layer._keys.data_ptr() == buffer and runner.n_past == len(prompt) + 4
    runner.reset()
    assert layer.get_seq_length() == 0 and runner.cache.layers[0] is layer
    fresh = runner.forward(prompt + [40, 50])[-1]
    assert np.abs(rolled - fresh).max() <= 1e-4


def test_fixed_shape_passes_are_padded_and_score_as_plain_passes():
    """A fixed-shape runner (CUDA graphs' pass shapes, uncompiled) pads a 3-row pass to the 4-row bucket: the pad
    row's keys land in the cell after the real rows and the cache does not count it. Its logits and a pinned
    speculative run match the plain runner's."""
    from verispec.drafters.ngram import NgramDrafter
    from verispec.engine import Engine, SpeculativeConfig, Stats
    from verispec.sampling import SamplingParams

    plain, fixed = tiny_runner(4, scale=10), tiny_runner(4, fixed_shapes=True, scale=10)
    prompt = plain.tokenizer.encode("abcabcabc")
    for runner in (plain, fixed):
        runner.forward(prompt)
    a, b = plain.forward([40, 41, 42]).copy(), fixed.forward([40, 41, 42])
    assert np.abs(a - b).max() <= 1e-4
    layer = fixed.cache.layers[0]
    assert layer.get_seq_length() == len(prompt) + 3 and float(layer._keys[0, :, len(prompt) + 3].abs().sum()) > 0
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outputs = []
    for runner in (plain, fixed):
        stats = Stats()
        engine = Engine(runner, NgramDrafter(), SpeculativeConfig(draft="ngram", draft_tokens=3))
        outputs.append([t for step in engine.generate(prompt, params, stats) for t in step])
        assert stats.drafted > 0
    assert outputs[0] == outputs[1]
