"""Speculative sampling keeps the target's distribution: exact joint distributions on a toy vocabulary.

The target and draft are numpy 'models' over 6 tokens whose next-token distributions are known.
We draw N = 50,000 three-token continuations through the real Engine (the first token from the
prefill, the next two from a speculative step of K=2 drafts and more steps as needed) and compare
with the exact joint distribution over the 216 outcomes.

Bounds. Chi-square must not reject at p = 0.001. Outcomes expected fewer than 5 times are pooled into one cell
first: the chi-square approximation needs it, and without it one draw of an outcome expected 0.015 times
(which happens, over 216 outcomes) alone gives p ~ 1e-4. The total-variation distance TV = 1/2 sum|p_hat - p|
has E[TV] <= 1/2 sum sqrt(p(1-p)/N) (Jensen), and changing one sample moves TV by at most 1/N, so by
McDiarmid P(TV > E[TV] + t) <= exp(-2 N t^2); t = sqrt(ln(1000) / 2N) gives a false alarm rate of 0.001.

Every test here draws the same N, the good samplers and their broken variants alike, so each
broken variant that is caught shows the power of the check at the N the good ones pass with. One
exception: the device implementation's engine-level cases, good and broken, draw N_DEVICE (a torch draw
costs about 1 ms here). Its verifier's verdicts are also checked against their exact distribution directly
(test_chain_verdicts_have_the_exact_distribution, where its broken variant is caught), so this case
guards its wiring through the engine, with the bounds of its own n.

Unseeded draws go through the rejection sampler; seeded ones (seeds 0..N-1) through the per-position
noise of sampling.PositionNoise, whose draws are checked the same way.

Both implementations are checked: the numpy one (host logits, llama.cpp) with TableRunner, and the torch one
(verify/device.py, the torch runner's) with DeviceTableRunner, which hands the same logits over as tensors on
VERISPEC_TEST_DEVICE (the CPU unless set).
"""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from tests.toy import TEST_DEVICE, DeviceTableRunner, TableRunner
from verispec.drafters.draft_model import ModelDrafter
from verispec.drafters.ngram import NgramDrafter
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.sampling import SamplingParams, logits_to_probs, sample
from verispec.verify import device, rejection

N = 50_000  # one N for good and broken samplers alike
N_DEVICE = 20_000  # the device implementation's engine-level case (see the docstring)
MIN_EXPECTED = 5.0  # chi-square cells expected fewer times than this are pooled
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
    expected = p * n
    rare = support & (expected < MIN_EXPECTED)
    common = support & ~rare
    observed, wanted = list(counts[common]), list(expected[common])
    if rare.any():
        observed.append(counts[rare].sum())
        wanted.append(expected[rare].sum())
    chi2 = scipy_stats.chisquare(observed, wanted)
    tv = 0.5 * np.abs(counts / n - p).sum()
    return float(chi2.pvalue), float(tv), tv_bound(p, int(n))


PARAMS = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=0.7, top_k=3),
    "top_p": dict(temperature=0.7, top_p=0.8),
}


RUNNERS = {"host": TableRunner, "device": DeviceTableRunner}


def test_the_device_runner_hands_its_logits_over_on_the_test_device():
    assert DeviceTableRunner(VOCAB, seed=1).forward_native(PROMPT).device.type == torch.device(TEST_DEVICE).type


def make_engine(drafter_kind: str, runner: str = "host") -> Engine:
    target = RUNNERS[runner](VOCAB, seed=1, sharpness=1.5)
    if drafter_kind == "model":
        drafter = ModelDrafter(TableRunner(VOCAB, seed=2, sharpness=1.0, name="draft"), max_tokens=4)
    else:
        drafter = NgramDrafter(1, 2)
    return Engine(target, drafter, SpeculativeConfig(draft="x", draft_tokens=2))


# Temperature alone is in every case (top-k and top-p come after it). The device implementation's engine-level
# chain case is the model drafter with top-p (its trees have one too, below); its one-hot (n-gram) path is
# checked against exact verdict distributions and the host's verdicts below, which costs a fraction of the time.
@pytest.mark.parametrize("name,drafter_kind,seeded,runner",
                         [("top_k", "model", False, "host"), ("top_p", "model", False, "host"),
                          ("temperature", "ngram", False, "host"), ("top_p", "ngram", True, "host"),
                          ("top_p", "model", False, "device")])
def test_speculative_sampling_preserves_target_distribution(name, drafter_kind, seeded, runner):
    engine = make_engine(drafter_kind, runner)
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, **PARAMS[name])
    p = exact_joint(engine.target, params)
    counts = draw(engine, params, N_DEVICE if runner == "device" else N, seeded)
    pvalue, tv, bound = check(counts, p)
    assert pvalue > 0.001, f"chi-square rejects the target distribution (p={pvalue:.2e}, tv={tv:.4f})"
    assert tv < bound, f"total variation {tv:.4f} exceeds the bound {bound:.4f}"


@pytest.mark.parametrize("name,drafter_kind", [("top_k", "model"), ("top_p", "ngram"), ("temperature", "model")])
def test_seeded_requests_write_the_same_tokens_on_both_implementations(name, drafter_kind):
    """Seeded sampling is a function of (seed, position) and the logits: the device implementation, which uploads
    the same per-position noise, writes exactly the host's tokens. (Its distribution is then the host's, which the
    tests above check; top-k cuts are compared directly in test_sampling.py.)"""
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, **PARAMS[name])
    host, on_device = make_engine(drafter_kind, "host"), make_engine(drafter_kind, "device")
    drafted = 0
    for seed in range(300):
        params.seed = seed
        stats = Stats()
        out = [t for step in on_device.generate(PROMPT, params, stats) for t in step]
        assert out == [t for step in host.generate(PROMPT, params) for t in step], seed
        drafted += stats.drafted
    assert drafted > 0


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


class ResampleFromTargetOnDevice(device.DeviceChainVerifier):
    """The device twin of ResampleFromTarget: the right acceptance test, then a draw from p, not the residual."""

    def verify_probs(self, p, drafted, q):
        assert p.device.type == torch.device(TEST_DEVICE).type  # the verifier runs where the runner's logits are
        for i, x in enumerate(drafted):
            if self.rng.random() * float(q[i, x]) >= float(p[i, x]):
                return rejection.Verdict(i, self._draw(p[i]))
        return rejection.Verdict(len(drafted), self._draw(p[len(drafted)]))

    def _draw(self, row: torch.Tensor) -> int:
        if self._generator is None:
            self._generator = device._generator(self.rng, row.device)
        return int(torch.multinomial(row, 1, generator=self._generator))


@pytest.mark.parametrize("broken,runner", [(AlwaysAccept, "host"), (ResampleFromTarget, "host"),
                                           (ResampleFromTargetOnDevice, "device")])
def test_a_broken_sampler_is_caught(monkeypatch, broken, runner):
    target = "verispec.verify.rejection.ChainVerifier" if runner == "host" else "verispec.verify.device.DeviceChainVerifier"
    monkeypatch.setattr(target, broken)
    engine = make_engine("model", runner)
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, temperature=0.7)
    p = exact_joint(engine.target, params)
    counts = draw(engine, params, N_DEVICE if runner == "device" else N)
    pvalue, tv, bound = check(counts, p)
    assert pvalue < 0.001 and tv > bound


def make_tree_engine(runner: str = "host") -> Engine:
    target = RUNNERS[runner](VOCAB, seed=1, sharpness=1.5)
    drafter = ModelDrafter(TableRunner(VOCAB, seed=2, sharpness=1.0, name="draft"), max_tokens=4)
    return Engine(target, drafter, SpeculativeConfig(draft="x", draft_tokens=2, tree_width=3))


@pytest.mark.parametrize("seeded,runner", [(False, "host"), (True, "host"), (False, "device")])
def test_tree_sampling_preserves_target_distribution(seeded, runner):
    engine = make_tree_engine(runner)
    params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, **PARAMS["top_p"])
    p = exact_joint(engine.target, params)
    pvalue, tv, bound = check(draw(engine, params, N_DEVICE if runner == "device" else N, seeded), p)
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


def draw_bonus(verifier_class: type) -> np.ndarray:
    params = SamplingParams(temperature=1.0)
    verifier = verifier_class(BONUS_ROWS.shape[1], params, np.random.default_rng(2026), max_rows=3)
    logits, drafted, q = np.log(BONUS_ROWS), [0, 1], np.full((2, BONUS_ROWS.shape[1]), 0.2)
    if issubclass(verifier_class, device.DeviceChainVerifier):
        logits = torch.from_numpy(logits)
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


@pytest.mark.parametrize("verifier", [rejection.ChainVerifier, device.DeviceChainVerifier])
def test_the_bonus_token_is_drawn_from_the_row_after_the_last_draft(verifier):
    pvalue, tv, bound = check(draw_bonus(verifier), BONUS_ROWS[2])
    assert pvalue > 0.001, f"chi-square rejects row K as the bonus distribution (p={pvalue:.2e}, tv={tv:.4f})"
    assert tv < bound


@pytest.mark.parametrize("wrong_row", [1, 0])  # K-1 (the last draft's own row), and the first row
def test_a_bonus_from_the_wrong_row_is_caught(wrong_row):
    pvalue, tv, bound = check(draw_bonus(bonus_from_row(wrong_row)), BONUS_ROWS[2])
    assert pvalue < 0.001 and tv > bound


# The verdict (drafted tokens kept, next token) of a 2-token chain, for fixed drafts x, has an exact distribution:
# row i keeps x_i with probability min(1, p_i(x_i) / q_i(x_i)) (q = None: a one-hot draft, probability p_i(x_i));
# the first rejection draws from the residual max(0, p_i - q_i) (one-hot: p_i without x_i); a full acceptance
# draws the bonus from row 2. The q below is chosen so that each residual is far from its p: a sampler that
# redraws from p after a rejection (the classic bug) is caught at the same N the correct ones pass with.
CHAIN_ROWS = np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.4, 0.2, 0.2, 0.1], [0.05, 0.05, 0.1, 0.3, 0.5]])
CHAIN_DRAFT = [1, 2]
CHAIN_Q = np.array([[0.2, 0.5, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.1, 0.1]])


def chain_verdicts(q: np.ndarray | None) -> np.ndarray:
    p, vocab = CHAIN_ROWS, CHAIN_ROWS.shape[1]
    exact, reach = np.zeros((3, vocab)), 1.0
    for i, x in enumerate(CHAIN_DRAFT):
        keep = p[i, x] if q is None else min(1.0, p[i, x] / q[i, x])
        left = np.where(np.arange(vocab) == x, 0.0, p[i]) if q is None else np.maximum(p[i] - q[i], 0.0)
        exact[i] = reach * (1 - keep) * left / left.sum()
        reach *= keep
    exact[2] = reach * p[2]
    return exact.ravel()


@pytest.mark.parametrize("verifier,q,broken", [
    (rejection.ChainVerifier, None, False), (device.DeviceChainVerifier, None, False),
    (rejection.ChainVerifier, CHAIN_Q, False), (device.DeviceChainVerifier, CHAIN_Q, False),
    (ResampleFromTarget, CHAIN_Q, True), (ResampleFromTargetOnDevice, CHAIN_Q, True)],
    ids=["host-one-hot", "device-one-hot", "host", "device", "broken-host", "broken-device"])
def test_chain_verdicts_have_the_exact_distribution(verifier, q, broken):
    v = verifier(CHAIN_ROWS.shape[1], SamplingParams(temperature=1.0), np.random.default_rng(7), max_rows=3)
    logits = np.log(CHAIN_ROWS)
    if issubclass(verifier, device.DeviceChainVerifier):
        logits = torch.from_numpy(logits)
    counts = np.zeros((3, CHAIN_ROWS.shape[1]))
    for _ in range(BONUS_N):
        verdict = v.verify(logits, CHAIN_DRAFT, q)
        counts[verdict.n_accepted, verdict.next_token] += 1
    exact = chain_verdicts(q)
    if broken:  # caught: it drew verdicts of probability 0 (a token the residual excludes), or fails the tests
        impossible = counts.ravel()[exact == 0].sum()
        assert impossible > 0 or check(counts.ravel(), exact)[0] < 0.001, impossible
        return
    pvalue, tv, bound = check(counts.ravel(), exact)
    assert pvalue > 0.001 and tv < bound, (pvalue, tv, bound)


@pytest.mark.parametrize("params", [dict(temperature=0.7, top_p=0.8), dict(temperature=1.0, top_k=3), dict()])
def test_device_trees_give_the_host_verdicts(params):
    """DeviceTreeVerifier walks greedy trees on the device and sampled ones with the host's rules: from the same
    rng, on the same logits, every verdict is the host's (so the tree distribution tests above cover it)."""
    from verispec.token_tree import build_tree
    from verispec.verify.tree import TreeVerifier

    rng = np.random.default_rng(3)
    sampling = SamplingParams(**params)
    for seed in range(200):
        branches = [list(rng.integers(0, VOCAB, size=rng.integers(1, 4))) for _ in range(3)]
        tree = build_tree(int(rng.integers(0, VOCAB)), branches)
        logits = rng.normal(size=(len(tree), VOCAB)) * 1.5
        host = TreeVerifier(VOCAB, sampling, np.random.default_rng(seed)).verify(tree, logits, 10)
        on_device = device.DeviceTreeVerifier(VOCAB, sampling, np.random.default_rng(seed)).verify(
            tree, torch.from_numpy(logits), 10)
        assert (on_device.path, on_device.next_token) == (host.path, host.next_token), seed
