"""A request's own logit edits (logit_bias, presence and frequency penalties, min-p) and its logprobs, each
lossless with speculation: greedy output with drafting equals greedy output without it, sampled output keeps the
edited distribution exactly (same bounds as tests/test_distribution.py), and reported logprobs are the target's."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_distribution import check
from tests.toy import DeviceTableRunner, TableRunner
from verispec import engine as engine_module
from verispec.drafters.draft_model import ModelDrafter
from verispec.drafters.ngram import NgramDrafter
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.errors import InvalidParameter
from verispec.sampling import LogitsProcessor, SamplingParams, chain_paths, logits_to_probs

EDITS = {
    "logit_bias": dict(logit_bias={5: 3.0, 7: -100.0, 11: 1.5}),
    "presence": dict(presence_penalty=2.0),
    "frequency": dict(frequency_penalty=1.5),
    "negative_frequency": dict(frequency_penalty=-0.8),
    "min_p": dict(min_p=0.3),
    "all": dict(logit_bias={5: 2.0}, presence_penalty=0.5, frequency_penalty=0.7, min_p=0.1),
}
RUNNERS = {"host": TableRunner, "device": DeviceTableRunner}
VOCAB = 40
PROMPT = [1, 2, 3, 4]


def run(engine: Engine, params: SamplingParams, prompt=PROMPT) -> tuple[list[int], Stats]:
    stats = Stats()
    return [t for step in engine.generate(prompt, params, stats) for t in step], stats


def drafters() -> list[tuple]:
    """n-gram lookup, a draft model (a copy of the target, a little flatter), and token trees from it."""
    draft = lambda: ModelDrafter(TableRunner(VOCAB, seed=5, sharpness=1.5, name="draft"), max_tokens=8)  # noqa: E731
    return [(NgramDrafter(1, 2), SpeculativeConfig(draft="ngram", draft_tokens=3)),
            (draft(), SpeculativeConfig(draft="d", draft_tokens=4)),
            (draft(), SpeculativeConfig(draft="d", draft_tokens=3, tree_width=3)),
            (draft(), SpeculativeConfig(draft="d", tree="dynamic", tree_budget=6))]


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("edit", list(EDITS))
def test_greedy_with_drafting_equals_greedy_without(edit, runner):
    target = RUNNERS[runner](VOCAB, seed=5, sharpness=2.0)
    params = SamplingParams(max_tokens=40, ignore_eos=True, **EDITS[edit])
    plain, _ = run(Engine(target), params)
    if edit != "min_p":  # min-p never cuts the top token: greedy output is unchanged, as it must be
        assert plain != run(Engine(target), SamplingParams(max_tokens=40, ignore_eos=True))[0]
    accepted = 0
    for drafter, config in drafters():
        out, stats = run(Engine(target, drafter, config), params)
        assert out == plain, f"{config} diverges"
        accepted += stats.accepted
    assert accepted > 0


@pytest.mark.parametrize("edit", ["all", "frequency"])
def test_seeded_sampling_with_edits_does_not_depend_on_drafting(edit):
    target = TableRunner(VOCAB, seed=5, sharpness=2.0)
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.9, seed=7, **EDITS[edit])
    plain, _ = run(Engine(target), params)
    for drafter, config in drafters():
        assert run(Engine(target, drafter, config), params)[0] == plain, config


@pytest.mark.parametrize("edit", ["presence", "frequency", "all"])
def test_a_draft_model_drafts_from_the_same_edited_logits(edit):
    """A draft model identical to the target, greedy: every drafted token is accepted only if the drafter edits
    each position as the target does, its own earlier drafts counted."""
    target = TableRunner(VOCAB, seed=5, sharpness=2.0)
    params = SamplingParams(max_tokens=40, ignore_eos=True, **EDITS[edit])
    twin = ModelDrafter(TableRunner(VOCAB, seed=5, sharpness=2.0, name="twin"), max_tokens=8)
    _, stats = run(Engine(target, twin, SpeculativeConfig(draft="twin", draft_tokens=6)), params)
    assert stats.drafted > 0 and stats.accepted == stats.drafted


def naive_rows(logits: np.ndarray, generated: list[int], paths: list[list[int]], params: SamplingParams) -> np.ndarray:
    """The edits written out over the whole vocabulary, one row at a time."""
    out = logits.astype(np.float64).copy()
    for i, path in enumerate(paths):
        counts = np.bincount(generated + path, minlength=logits.shape[1]).astype(np.float64)
        out[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        for token, bias in params.logit_bias.items():
            out[i, token] += bias
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 19), max_size=30), st.lists(st.lists(st.integers(0, 19), max_size=5), min_size=1, max_size=6),
       st.dictionaries(st.integers(0, 19), st.floats(-100, 100), max_size=4), st.floats(-2, 2), st.floats(-2, 2))
def test_edits_equal_the_naive_counts(generated, paths, bias, presence, frequency):
    params = SamplingParams(logit_bias=bias, presence_penalty=presence, frequency_penalty=frequency)
    processor = LogitsProcessor(params, 20, n_context=3)
    for start in range(0, len(generated), 7):  # accepted a few tokens per step
        processor.accept(generated[start : start + 7])
    logits = np.random.default_rng(0).normal(size=(len(paths), 20))
    np.testing.assert_allclose(processor.apply(logits, paths), naive_rows(logits, generated, paths, params), atol=1e-9)
    assert processor.n_context == 3 + len(generated)


def test_a_bias_outside_the_vocabulary_and_out_of_range_values_are_refused():
    with pytest.raises(InvalidParameter, match="logit_bias"):
        LogitsProcessor(SamplingParams(logit_bias={40: 1.0}), 40, 1)
    for bad in (dict(logit_bias={1: 101.0}), dict(presence_penalty=2.5), dict(frequency_penalty=-3.0), dict(min_p=1.5),
                dict(logprobs=21)):
        with pytest.raises(InvalidParameter):
            SamplingParams(**bad)


# -- exact distributions ----------------------------------------------------------------------------------
# As tests/test_distribution.py: 6 tokens, three-token continuations, their exact joint distribution under the
# edits (written out here from the counts, not through LogitsProcessor), chi-square and total-variation bounds at
# a false-failure rate of 0.001 each. N is smaller: every case, the broken one included, draws the same N.

N = 20_000
SMALL = 6
SHORT = [1, 2, 3]
LENGTH = 3
SAMPLED = {
    "penalties_bias": dict(temperature=0.8, presence_penalty=0.7, frequency_penalty=1.2, logit_bias={0: 1.0}),
    "penalties_min_p": dict(temperature=1.0, frequency_penalty=1.5, min_p=0.15),
}


def exact_joint(target: TableRunner, params: SamplingParams) -> np.ndarray:
    plain = SamplingParams(temperature=params.temperature, min_p=params.min_p)
    joint = np.zeros((SMALL,) * LENGTH)
    for seq in itertools.product(range(SMALL), repeat=LENGTH):
        prob, ctx = 1.0, list(SHORT)
        for i, tok in enumerate(seq):
            row = naive_rows(target.logits(ctx)[None], list(seq[:i]), [[]], params)[0]
            prob *= logits_to_probs(row, plain)[tok]
            ctx.append(tok)
        joint[seq] = prob
    return joint.ravel()


def draw(engine: Engine, params: SamplingParams, n: int) -> np.ndarray:
    counts = np.zeros(SMALL**LENGTH)
    rng = np.random.default_rng(2026)
    for _ in range(n):
        out = [t for step in engine.generate(SHORT, params, rng=rng) for t in step]
        counts[np.ravel_multi_index(out, (SMALL,) * LENGTH)] += 1
    return counts


def small_engine(drafter_kind: str, runner: str = "host") -> Engine:
    target = RUNNERS[runner](SMALL, seed=1, sharpness=1.5)
    if drafter_kind == "model":
        drafter = ModelDrafter(TableRunner(SMALL, seed=2, sharpness=1.0, name="draft"), max_tokens=4)
    else:
        drafter = NgramDrafter(1, 2)
    return Engine(target, drafter, SpeculativeConfig(draft="x", draft_tokens=2))


@pytest.mark.parametrize("name,drafter_kind,runner", [("penalties_bias", "model", "host"),
                                                      ("penalties_min_p", "ngram", "device")])
def test_speculative_sampling_keeps_the_edited_distribution(name, drafter_kind, runner):
    engine = small_engine(drafter_kind, runner)
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, **SAMPLED[name])
    pvalue, tv, bound = check(draw(engine, params, N), exact_joint(engine.target, params))
    assert pvalue > 0.001, f"chi-square rejects the edited distribution (p={pvalue:.2e}, tv={tv:.4f})"
    assert tv < bound


def test_penalties_that_miss_the_drafts_earlier_in_the_pass_are_caught(monkeypatch):
    """A verifier whose rows all see the counts before the pass (a drafted token not counted for the rows after
    it) samples from the wrong distribution."""
    monkeypatch.setattr(engine_module, "chain_paths", lambda drafted: [[]] * (len(drafted) + 1))
    engine = small_engine("model")
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, **SAMPLED["penalties_bias"])
    pvalue, tv, bound = check(draw(engine, params, N), exact_joint(engine.target, params))
    assert pvalue < 0.001 and tv > bound


# -- logprobs -------------------------------------------------------------------------------------------------


def reference_logprobs(target: TableRunner, out: list[int], params: SamplingParams) -> list[float]:
    """log softmax of the target's own rows at each written position (edited, over the temperature)."""
    found = []
    for i, token in enumerate(out):
        row = naive_rows(target.logits(PROMPT + out[:i])[None], out[:i], [[]], params)[0] / params.logprob_temperature
        row -= row.max()
        found.append(float(row[token] - np.log(np.exp(row).sum())))
    return found


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.7, seed=3, top_p=0.9), dict(frequency_penalty=1.0)])
def test_logprobs_are_the_targets_own_with_and_without_drafting(runner, sampling):
    target = RUNNERS[runner](VOCAB, seed=5, sharpness=2.0)
    params = SamplingParams(max_tokens=30, ignore_eos=True, logprobs=5, **sampling)
    plain, plain_stats = run(Engine(target), params)
    expected = reference_logprobs(target, plain, params)
    assert [e.token for e in plain_stats.logprobs] == plain
    np.testing.assert_allclose([e.logprob for e in plain_stats.logprobs], expected, rtol=0, atol=1e-9)
    for entry in plain_stats.logprobs:
        assert len(entry.top) == 5 and [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
        assert entry.logprob <= entry.top[0][1] + 1e-12
    accepted = 0
    for drafter, config in drafters():
        out, stats = run(Engine(target, drafter, config), params)
        assert out == plain
        assert [(e.token, e.top) for e in stats.logprobs] == [(e.token, e.top) for e in plain_stats.logprobs]
        np.testing.assert_allclose([e.logprob for e in stats.logprobs], expected, rtol=0, atol=1e-9)
        accepted += stats.accepted
    assert accepted > 0


def test_logprobs_stop_with_the_output_at_eos():
    target = TableRunner(VOCAB, seed=5, sharpness=2.0)
    params = SamplingParams(max_tokens=30, ignore_eos=True, logprobs=0)
    plain, _ = run(Engine(target), params)
    target.tokenizer.eos_ids = frozenset({plain[9]})
    engine = Engine(target, NgramDrafter(1, 2), SpeculativeConfig(draft="ngram", draft_tokens=4))
    out, stats = run(engine, SamplingParams(max_tokens=30, logprobs=0))
    assert out == plain[: plain.index(plain[9])]
    assert [e.token for e in stats.logprobs] == out and all(e.top == [] for e in stats.logprobs)


def test_chain_paths_are_the_drafted_prefixes():
    assert chain_paths([7, 8, 9]) == [[], [7], [7, 8], [7, 8, 9]]
