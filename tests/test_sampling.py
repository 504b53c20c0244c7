"""The one sampling module: logits -> probabilities, and the residual used on rejection."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from verispec.errors import InvalidParameter
from verispec.sampling import PositionNoise, SamplingParams, logits_to_probs, sample
from verispec.verify.rejection import ChainVerifier, residual

distributions = arrays(np.float64, st.integers(2, 40), elements=st.floats(0, 1)).filter(lambda a: a.sum() > 1e-6).map(lambda a: a / a.sum())


def _pair(draw_vec):
    return draw_vec


@given(st.data())
def test_residual_is_a_distribution(data):
    p = data.draw(distributions)
    q = data.draw(arrays(np.float64, p.shape, elements=st.floats(0, 1)).filter(lambda a: a.sum() > 1e-6).map(lambda a: a / a.sum()))
    x = data.draw(st.integers(0, p.shape[0] - 1))
    for q_row in (q, None):
        r = residual(p, q_row, x, np.empty_like(p))
        assert np.all(np.isfinite(r))
        assert np.all(r >= 0)
        assert r.sum() == pytest.approx(1.0)


@given(distributions, st.integers(0, 2**32 - 1))
def test_acceptance_is_one_when_p_equals_q(p, seed):
    verifier = ChainVerifier(p.shape[0], SamplingParams(temperature=1.0), np.random.default_rng(seed))
    drafted = [int(np.argmax(p))] * 3
    rows = np.tile(p, (4, 1))
    verdict = verifier.verify_probs(rows, drafted, rows[:3])
    assert verdict.n_accepted == 3


@given(st.data())
def test_no_nan_with_zeros_in_p_or_q(data):
    n = data.draw(st.integers(2, 30))
    p = np.zeros(n)
    q = np.zeros(n)
    p[data.draw(st.integers(0, n - 1))] = 1.0
    q[data.draw(st.integers(0, n - 1))] = 1.0
    x = int(np.argmax(q))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    verdict = ChainVerifier(n, SamplingParams(temperature=1.0), rng).verify_probs(np.stack([p, p]), [x], q[None])
    assert 0 <= verdict.next_token < n
    assert p[verdict.next_token] > 0  # whatever happens, the token has target probability


@settings(max_examples=50)
@given(arrays(np.float32, st.integers(2, 300), elements=st.floats(-30, 30, width=32)),
       st.floats(0.05, 3.0), st.integers(0, 50), st.floats(0.01, 1.0))
@example(np.array([-6.679339e-31, 0.0], dtype=np.float32), 1.0, 0, 0.5)  # a tie after the softmax
def test_processed_probs_are_distributions(logits, temperature, top_k, top_p):
    probs = logits_to_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert np.all(probs >= 0) and probs.sum() == pytest.approx(1.0)
    kept = probs > 0
    if top_k:
        # more than k survive only through exact ties at the threshold
        assert kept.sum() <= top_k or len(np.unique(probs[kept])) < kept.sum()
    # the most likely token survives: the kept set holds a token of top probability (logits closer
    # than float32 resolution, e.g. 0 and -7e-31, are tied after the softmax and either may stay)
    full = logits_to_probs(logits, SamplingParams(temperature=temperature))
    assert full[kept].max() == full.max()


def test_top_p_keeps_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.75))
    assert np.allclose(probs, [0.5 / 0.8, 0.3 / 0.8, 0, 0])


def test_top_p_on_a_large_vocabulary_matches_full_sort():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50_000).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    fast = logits_to_probs(logits, params)
    # reference: full sort
    w = np.exp((logits - logits.max()) / 0.8)
    w /= w.sum()
    order = np.argsort(-w)
    keep = order[: np.searchsorted(np.cumsum(w[order]), 0.9) + 1]
    ref = np.zeros_like(w)
    ref[keep] = w[keep] / w[keep].sum()
    assert np.allclose(fast, ref)


def test_greedy_probs_are_one_hot():
    probs = logits_to_probs(np.array([0.1, 3.0, 2.0]), SamplingParams())
    assert probs.tolist() == [0.0, 1.0, 0.0]


def test_sample_never_picks_zero_probability():
    rng = np.random.default_rng(1)
    p = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    assert {sample(p, rng) for _ in range(500)} == {1, 3}


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": 0}, {"max_tokens": -3}, {"top_k": -1},
    {"temperature": float("nan")}, {"seed": -1},
])
def test_bad_sampling_parameters_are_rejected(kwargs):
    with pytest.raises(InvalidParameter) as err:
        SamplingParams(**kwargs)
    assert err.value.param in kwargs


@given(distributions, st.integers(0, 2**32 - 1), st.integers(0, 10**6))
def test_seeded_choice_has_target_probability_and_repeats(p, seed, position):
    noise = PositionNoise(seed, p.shape[0], slots=2)
    token = noise.choose(p, position)
    assert p[token] > 0
    noise.at(position + 2)  # evicts `position` from its slot: the noise is drawn again, the same
    assert PositionNoise(seed, p.shape[0] + 5).choose(np.append(p, np.zeros(5)), position) == token
    assert noise.choose(p, position) == token
    assert int(np.argmax(noise.perturb(p.copy(), position))) == token


def test_seeded_choices_over_positions_follow_p():
    """argmax(p / E) with fresh exponential noise per position is a sample from p (chi-square, p = 0.001)."""
    from scipy import stats as scipy_stats

    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    noise = PositionNoise(3, p.shape[0], slots=1)
    n = 20_000
    counts = np.bincount([noise.choose(p, position) for position in range(n)], minlength=p.shape[0])
    assert counts[-1] == 0
    assert scipy_stats.chisquare(counts[:-1], p[:-1] * n).pvalue > 0.001


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 300)), elements=st.floats(-30, 30, width=32)),
       st.floats(0.05, 3.0), st.integers(0, 50), st.floats(0.01, 1.0))
@example(np.array([[-6.679339e-31, 0.0]], dtype=np.float32), 1.0, 0, 0.5)  # a tie after the softmax
# top_p = m / n over n tied tokens: a float cumsum lands just below or just above m / n, and numpy's and torch's
# sums of the normalised 1 / n landed on different sides (the host kept 2 tokens, the device 3, and 8 vs 7)
@example(np.zeros((1, 11), dtype=np.float32), 1.0, 0, 2 / 11)
@example(np.zeros((1, 15), dtype=np.float32), 0.7, 0, 7 / 15)
@example(np.array([[0.0] * 5 + [-1.0] * 6], dtype=np.float32), 1.0, 0, 5 / (5 + 6 * np.exp(-1.0)))
def test_device_probs_are_the_host_probs(logits, temperature, top_k, top_p):
    """verify/device.py's logits_to_probs makes the same top-k and top-p cuts as sampling.py's, and the same
    probabilities to float64 rounding: the torch runner's requests are processed by the same rules as llama.cpp's."""
    import torch

    from verispec.verify import device

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    host = logits_to_probs(logits, params)
    on_device = device.logits_to_probs(torch.from_numpy(logits), params).numpy()
    assert np.array_equal(host > 0, on_device > 0)
    assert np.allclose(host, on_device, rtol=1e-9, atol=1e-12)


def _nucleus_on_host_and_device(weights: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The kept tokens of one row of weights (top token 1.0), by sampling.py's cut and by verify/device.py's."""
    import torch

    from verispec import sampling
    from verispec.verify import device

    host = weights.copy()
    sampling._keep_nucleus(host, top_p, np.empty_like(host))
    on_device = device._keep_nucleus(torch.from_numpy(weights[None, :].copy()), top_p)[0].numpy()
    return host > 0, on_device > 0


@pytest.mark.parametrize(("top_p", "n_kept"), [
    (0.5, 1),  # the units before the second token are exactly top_p * total: it is left out
    (np.nextafter(0.5, 1.0), 2),
    (0.75, 2),  # the same at the third
    (np.nextafter(0.75, 1.0), 4),  # the third is taken, and the fourth, tied with it, too
    (0.999, 4),
])
def test_the_nucleus_cut_at_an_exact_boundary(top_p, n_kept):
    weights = np.array([0.25, 1.0, 0.25, 0.5])  # whole units, totalling 2.0: top_p * total is exact
    host, on_device = _nucleus_on_host_and_device(weights, top_p)
    assert host.sum() == n_kept and np.array_equal(host, on_device)
    assert host[1] and (n_kept < 2 or host[3])


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(2, 200), elements=st.floats(0, 1)), st.data())
def test_host_and_device_cut_the_nucleus_alike_at_its_boundaries(weights, data):
    """top_p at (and one float either side of) the units before a token, the place where summation order decided."""
    from verispec.sampling import NUCLEUS_UNITS_PER_TOP_TOKEN

    weights[np.argmax(weights)] = 1.0
    units = np.sort(np.floor(weights * NUCLEUS_UNITS_PER_TOP_TOKEN))[::-1]
    boundary = units[: data.draw(st.integers(1, weights.shape[0] - 1))].sum() / units.sum()
    for top_p in (np.nextafter(boundary, 0.0), boundary, np.nextafter(boundary, 1.0)):
        if 0.0 < top_p < 1.0:
            host, on_device = _nucleus_on_host_and_device(weights, float(top_p))
            assert np.array_equal(host, on_device)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999999])
def test_the_candidates_and_the_full_sort_cut_the_nucleus_alike(top_p):
    """On a large vocabulary both look among the top candidates first; ties straddle the candidates' edge here."""
    weights = np.repeat(np.linspace(1.0, 1e-3, 1000), 5)  # 5,000 tokens in tied fives
    np.random.default_rng(2).shuffle(weights)
    host, on_device = _nucleus_on_host_and_device(weights, top_p)
    assert np.array_equal(host, on_device)
    kept_weights = weights[host]
    assert kept_weights.sum() >= top_p * weights.sum() > (kept_weights.sum() - 5 * kept_weights.min())
    assert (weights >= kept_weights.min()).sum() == host.sum()  # every tie of the last kept token is kept


@given(distributions, st.integers(0, 2**32 - 1))
def test_device_acceptance_is_one_when_p_equals_q(p, seed):
    import torch

    from verispec.verify.device import DeviceChainVerifier

    verifier = DeviceChainVerifier(p.shape[0], SamplingParams(temperature=1.0), np.random.default_rng(seed))
    rows = torch.from_numpy(np.tile(p, (4, 1)))
    verdict = verifier.verify_probs(rows, [int(np.argmax(p))] * 3, rows[:3])
    assert verdict.n_accepted == 3 and p[verdict.next_token] > 0


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999999])  # the last needs more than the top 2,048 candidates
def test_device_top_p_on_a_large_vocabulary_matches_the_host(top_p):
    import torch

    from verispec.verify import device

    logits = np.random.default_rng(1).normal(size=(3, 50_000)).astype(np.float32) * 2
    params = SamplingParams(temperature=0.8, top_p=top_p)
    host, on_device = logits_to_probs(logits, params), device.logits_to_probs(torch.from_numpy(logits), params).numpy()
    assert np.array_equal(host > 0, on_device > 0) and np.allclose(host, on_device, rtol=1e-9, atol=1e-15)
