"""Speculative sampling keeps the target's distribution: exact joint distributions on a toy vocabulary.

The target and draft are numpy 'models' over 6 tokens whose next-token distributions are known.
We draw N = 50,000 three-token continuations through the real Engine (the first token from the
prefill, the next two from a speculative step of K=2 drafts and more steps as needed) and compare
with the exact joint distribution over the 216 outcomes.

Bounds. Chi-square must not reject at p = 0.001. The total-variation distance TV = 1/2 sum|p_hat - p|
has E[TV] <= 1/2 sum sqrt(p(1-p)/N) (Jensen), and changing one sample moves TV by at most 1/N, so by
McDiarmid P(TV > E[TV] + t) <= exp(-2 N t^2); t = sqrt(ln(1000) / 2N) gives a false alarm rate of 0.001.

Every test here draws the same N, the good samplers and their broken variants alike, so each
broken variant that is caught shows the power of the check at the N the good ones pass with.

Unseeded draws go through the rejection sampler; seeded ones (seeds 0..N-1) through the per-position
noise of sampling.PositionNoise, whose draws are checked the same way.
"""

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tests.toy import TableRunner
from verispec.drafters.draft_model import ModelDrafter
from verispec.drafters.ngram import NgramDrafter
from verispec.engine import Engine, SpeculativeConfig
from verispec.sampling import SamplingParams, logits_to_probs, sample
from verispec.verify import rejection

N = 50_000  # one N for good and broken samplers alike
VOCAB = 6
PROMPT = [1, 2, 3]
LENGTH = 3


def exact_joint(target: TableRunner, params: SamplingParams) -> np.ndarray:
    joint = np.zeros((VOCAB,) * LENGTH)
    for seq in itertools.product(range(VOCAB), repeat=LENGTH):
        prob, ctx = 1.0, list(PROMPT)
        for tok in seq:
            prob *= logits_to_probs(target.logits(ctx), params)[tok]
            ctx.append(tok)
        joint[seq] = prob
    return joint.ravel()


def draw(engine: Engine, params: SamplingParams, n: int, seeded: bool = False) -> np.ndarray:
    """n continuations: unseeded through the rejection sampler (from one fixed stream of draws), or
    seeded 0..n-1 through the per-position noise (sampling.PositionNoise)."""
    counts = np.zeros(VOCAB**LENGTH)
    rng = np.random.default_rng(2026)
    for seed in range(n):
        params.seed = seed if seeded else None
        out = [t for step in engine.generate(PROMPT, params, rng=None if seeded else rng) for t in step]
        counts[np.ravel_multi_index(out, (VOCAB,) * LENGTH)] += 1
    return counts


def tv_bound(p: np.ndarray, n: int) -> float:
    return 0.5 * np.sqrt(p * (1 - p) / n).sum() + np.sqrt(np.log(1000) / (2 * n))


def check(counts: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    n = counts.sum()
    support = p > 0
    assert counts[~support].sum() == 0, "sampled an outcome the target gives probability 0"
    chi2 = scipy_stats.chisquare(counts[support], p[support] * n)
    tv = 0.5 * np.abs(counts / n - p).sum()
    return float(chi2.pvalue), float(tv), tv_bound(p, int(n))


PARAMS = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=0.7, top_k=3),
    "top_p": dict(temperature=0.7, top_p=0.8),
}


def make_engine(drafter_kind: str) -> Engine:
    target = TableRunner(VOCAB, seed=1, sharpness=1.5)
    if drafter_kind == "model":
        drafter = ModelDrafter(TableRunner(VOCAB, seed=2, sharpness=1.0, name="draft"), max_tokens=4)
    else:
        drafter = NgramDrafter(1, 2)
    return Engine(target, drafter, SpeculativeConfig(draft="x", draft_tokens=2))


@pytest.mark.parametrize("name,drafter_kind,seeded", [(name, "model", False) for name in PARAMS]
                         + [("temperature", "ngram", False), ("top_k", "model", True), ("top_p", "ngram", True)])
def test_speculative_sampling_preserves_target_distribution(name, drafter_kind, seeded):
    engine = make_engine(drafter_kind)
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, **PARAMS[name])
    p = exact_joint(engine.target, params)
    counts = draw(engine, params, N, seeded)
    pvalue, tv, bound = check(counts, p)
    assert pvalue > 0.001, f"chi-square rejects the target distribution (p={pvalue:.2e}, tv={tv:.4f})"
    assert tv < bound, f"total variation {tv:.4f} exceeds the bound {bound:.4f}"


class AlwaysAccept(rejection.ChainVerifier):
    def verify_probs(self, p, drafted, q):
        return rejection.Verdict(len(drafted), sample(p[len(drafted)], self.rng))


class ResampleFromTarget(rejection.ChainVerifier):
    """Rejects correctly but then samples from p instead of the residual max(0, p - q)."""

    def verify_probs(self, p, drafted, q):
        for i, x in enumerate(drafted):
            if self.rng.random() * q[i, x] < p[i, x]:
                continue
            return rejection.Verdict(i, sample(p[i], self.rng))
        return rejection.Verdict(len(drafted), sample(p[len(drafted)], self.rng))


@pytest.mark.parametrize("broken", [AlwaysAccept, ResampleFromTarget])
def test_a_broken_sampler_is_caught(monkeypatch, broken):
    monkeypatch.setattr("verispec.engine.ChainVerifier", broken)
    engine = make_engine("model")
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, temperature=0.7)
    p = exact_joint(engine.target, params)
    counts = draw(engine, params, N)
    pvalue, tv, bound = check(counts, p)
    assert pvalue < 0.001 and tv > bound


def make_tree_engine() -> Engine:
    target = TableRunner(VOCAB, seed=1, sharpness=1.5)
    drafter = ModelDrafter(TableRunner(VOCAB, seed=2, sharpness=1.0, name="draft"), max_tokens=4)
    return Engine(target, drafter, SpeculativeConfig(draft="x", draft_tokens=2, tree_width=3))


@pytest.mark.parametrize("seeded", [False, True])
def test_tree_sampling_preserves_target_distribution(seeded):
    engine = make_tree_engine()
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, **PARAMS["top_p"])
    p = exact_joint(engine.target, params)
    pvalue, tv, bound = check(draw(engine, params, N, seeded), p)
    assert pvalue > 0.001, f"chi-square rejects the target distribution (p={pvalue:.2e}, tv={tv:.4f})"
    assert tv < bound


def test_tree_sampling_without_residual_correction_is_caught(monkeypatch):
    from verispec.verify.tree import TreeVerifier

    def no_residual(self, p, children, tokens):
        for child in children:  # tries each sibling against the original p: siblings are over-accepted
            if self.rng.random() < p[tokens[child]]:
                return child
        return None

    monkeypatch.setattr(TreeVerifier, "_accept_child", no_residual)
    engine = make_tree_engine()
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, temperature=0.7)
    pvalue, tv, bound = check(draw(engine, params, N), exact_joint(engine.target, params))
    assert pvalue < 0.001 and tv > bound


def test_seeded_noise_shared_across_positions_is_caught(monkeypatch):
    """Noise keyed by the seed alone: every position draws with the same E, so tokens are correlated."""
    from verispec.sampling import PositionNoise

    at = PositionNoise.at
    monkeypatch.setattr(PositionNoise, "at", lambda self, position: at(self, 0))
    engine = make_engine("model")
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, temperature=0.7)
    pvalue, tv, bound = check(draw(engine, params, N, seeded=True), exact_joint(engine.target, params))
    assert pvalue < 0.001 and tv > bound


# The bonus token after a fully accepted chain: drawn from the target's row K, the one after the last
# draft. Each draft x passes for certain (q(x) = 0.2 < p(x), so min(1, p/q) = 1), so all BONUS_N
# steps end in a bonus; its counts are checked with check() at the same false-failure rate (0.001).
BONUS_ROWS = np.array([
    [0.6, 0.1, 0.1, 0.1, 0.1],  # row 0 checks draft 0
    [0.1, 0.6, 0.1, 0.1, 0.1],  # row 1 checks draft 1
    [0.05, 0.05, 0.1, 0.3, 0.5],  # row 2 = K: the bonus
])
BONUS_N = 5_000


def draw_bonus(verifier_class: type[rejection.ChainVerifier]) -> np.ndarray:
    params = SamplingParams(temperature=1.0)
    verifier = verifier_class(BONUS_ROWS.shape[1], params, np.random.default_rng(2026), max_rows=3)
    logits, drafted, q = np.log(BONUS_ROWS), [0, 1], np.full((2, BONUS_ROWS.shape[1]), 0.2)
    counts = np.zeros(BONUS_ROWS.shape[1])
    for _ in range(BONUS_N):
        verdict = verifier.verify(logits, drafted, q)
        assert verdict.n_accepted == len(drafted)
        counts[verdict.next_token] += 1
    return counts


def bonus_from_row(row: int) -> type[rejection.ChainVerifier]:
    class BonusFromWrongRow(rejection.ChainVerifier):
        def verify_probs(self, p, drafted, q):
            verdict = super().verify_probs(p, drafted, q)
            if verdict.n_accepted == len(drafted):
                return rejection.Verdict(verdict.n_accepted, sample(p[row], self.rng))
            return verdict

    return BonusFromWrongRow


def test_the_bonus_token_is_drawn_from_the_row_after_the_last_draft():
    pvalue, tv, bound = check(draw_bonus(rejection.ChainVerifier), BONUS_ROWS[2])
    assert pvalue > 0.001, f"chi-square rejects row K as the bonus distribution (p={pvalue:.2e}, tv={tv:.4f})"
    assert tv < bound


@pytest.mark.parametrize("wrong_row", [1, 0])  # K-1 (the last draft's own row), and the first row
def test_a_bonus_from_the_wrong_row_is_caught(wrong_row):
    pvalue, tv, bound = check(draw_bonus(bonus_from_row(wrong_row)), BONUS_ROWS[2])
    assert pvalue < 0.001 and tv > bound
