"""Drafters, the adaptive draft length and the cost model both K choosers ask."""

import pytest

from verispec.cost_model import best_k, expected_rate, expected_tokens, prior_curve, prior_ratio
from verispec.draft_length import DraftLengthChooser
from verispec.drafters.ngram import NgramDrafter


def test_ngram_continues_the_latest_match():
    d = NgramDrafter(2, 3)
    ctx = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert d.propose(ctx, 2).tokens == [7, 8]  # the most recent earlier "1 2 3" is followed by 7 8
    assert d.propose(ctx + [7], 3).tokens == [8, 1, 2]
    assert d.propose([5, 6, 7], 4).tokens == []  # no match


def test_ngram_index_grows_incrementally_and_resets_on_a_new_context():
    d = NgramDrafter(1, 2)
    ctx = [10, 11, 12, 10]
    assert d.propose(ctx, 2).tokens == [11, 12]
    ctx += [11, 12]
    assert d.propose(ctx, 2).tokens == [10, 11]
    assert d.propose([5, 6, 5], 3).tokens == [6, 5]  # a different context: index rebuilt


# A small case worked by hand: T(n) = seconds of a verify pass over n tokens, 0.1 s per drafted token.
# Expected tokens per pass at acceptance a with K drafts: 1 + a + ... + a^K.
#   a = 0.5: K=0 1/1.0 = 1;  K=1 1.5/(1.2+0.1) = 15/13;  K=2 1.75/(1.5+0.2) = 35/34;  K=3 1.875/(2.2+0.3) = 3/4
#   a = 0.8: K=0 1/1.0 = 1;  K=1 1.8/1.3 = 18/13;  K=2 2.44/1.7 = 122/85;  K=3 2.952/2.5 = 1.1808
HAND_VERIFY = {1: 1.0, 2: 1.2, 3: 1.5, 4: 2.2}
HAND_RATES = {0.5: [1.0, 15 / 13, 35 / 34, 0.75], 0.8: [1.0, 18 / 13, 122 / 85, 1.1808]}


@pytest.mark.parametrize("acceptance", sorted(HAND_RATES))
def test_expected_rate_matches_the_hand_computed_tokens_per_second(acceptance):
    for k, rate in enumerate(HAND_RATES[acceptance]):
        assert expected_rate(acceptance, k, HAND_VERIFY[k + 1], 0.1) == pytest.approx(rate)


def test_chosen_k_is_the_hand_computed_argmax_of_expected_throughput():
    assert best_k(0.5, HAND_VERIFY, 0.1, 3) == 1
    assert best_k(0.8, HAND_VERIFY, 0.1, 3) == 2
    assert best_k(0.8, HAND_VERIFY, 0.1, 1) == 1  # capped at k_max
    assert best_k(0.5, HAND_VERIFY, 0.1, 3, min_gain=1.15) == 1  # 15/13 = 1.154 beats K=0 by 15%
    assert best_k(0.5, HAND_VERIFY, 0.1, 3, min_gain=1.16) == 0  # ... but not by 16%
    for acceptance, want in ((0.5, 1), (0.8, 2)):  # the chooser on the same measurements
        chooser = DraftLengthChooser(k_max=3, acceptance=acceptance, min_gain=1.0, probe_every=None,
                                     verify_seconds=dict(HAND_VERIFY), draft_seconds_per_token=0.1)
        assert chooser.choose() == want


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_k_goes_to_zero_when_drafting_does_not_pay():
    # verify cost grows linearly (the Q4_K_M kernels on 2 cores) and acceptance is modest
    verify = {n: 0.05 * n for n in range(1, 10)}
    assert best_k(0.6, verify, 0.0, 8, min_gain=1.03) == 0
    assert best_k(0.95, {n: 0.05 * (1 + 0.3 * (n - 1)) for n in range(1, 10)}, 0.0, 8) > 2


def test_chooser_learns_acceptance_and_probes_when_off():
    chooser = DraftLengthChooser(k_max=8, probe_every=4)
    for _ in range(30):
        chooser.record_verify(1, 0.05)
        for n in range(2, 10):
            chooser.record_verify(n, 0.05 * n)
        chooser.record_acceptance(4, 0)
    assert chooser.acceptance < 0.1
    ks = [chooser.choose() for _ in range(8)]
    assert ks.count(0) == 6 and ks.count(1) == 2  # off, but re-measuring every 4th step
    chooser.probe_every = None
    assert [chooser.choose() for _ in range(8)] == [0] * 8


def test_fixed_k_is_respected():
    assert DraftLengthChooser(k_max=5, fixed=5).choose() == 5


def test_prior_curve_interpolates():
    assert prior_ratio(1) == 1.0
    assert prior_ratio(2, "exact-chunks") < prior_ratio(3, "exact-chunks") < prior_ratio(4, "exact-chunks")
    assert prior_ratio(64) > prior_ratio(32)
    assert prior_ratio(6, "exact-chunks") == pytest.approx((prior_ratio(4, "exact-chunks") + prior_ratio(8, "exact-chunks")) / 2)


def test_the_chooser_measures_the_cost_of_not_drafting_before_it_settles_on_drafting():
    # Only 2- and 3-row passes measured, perfect acceptance: the prior curve would make K = 1 or 2 look good.
    chooser = DraftLengthChooser(k_max=2, acceptance=0.99, min_gain=1.0, probe_every=None)
    chooser.record_verify(2, 1.88)
    chooser.record_verify(3, 2.6)
    assert chooser.choose() == 0  # T(1) unmeasured: run a plain step to measure it
    # Measured: a one-row pass costs 1.0, so K = 2 (3 tokens for 2.6) beats K = 0 (1 token for 1.0).
    chooser.record_verify(1, 1.0)
    assert chooser.choose() == 2
    # Had the one-row pass cost 0.5, drafting would not pay (3 / 2.6 < 1 / 0.5): K = 0 stays.
    slow = DraftLengthChooser(k_max=2, acceptance=0.99, min_gain=1.0, probe_every=None)
    for n, t in ((1, 0.5), (2, 1.88), (3, 2.6)):
        slow.record_verify(n, t)
    assert slow.choose() == 0


def test_while_drafting_the_chooser_measures_plain_steps_again():
    """T(1) is what drafting is judged against and drafting steps never measure it: every refresh_every-th
    drafting step is a plain one, and a T(1) that has since fallen (a carried, stale one) turns drafting off."""
    chooser = DraftLengthChooser(k_max=2, acceptance=0.99, min_gain=1.03, probe_every=None, refresh_every=4)
    chooser.record_verify(1, 1.3)  # measured while the machine ran slow
    chooser.record_verify(3, 2.0)
    chooser.draft_seconds_per_token = 0.5
    ks = [chooser.choose() for _ in range(8)]
    assert ks == [2, 2, 2, 0, 2, 2, 2, 0]
    for _ in range(4):  # the plain steps measure T(1) as it is now: drafting no longer pays
        chooser.record_verify(1, 0.8)
    assert [chooser.choose() for _ in range(4)] == [0] * 4
    never = DraftLengthChooser(k_max=2, acceptance=0.99, min_gain=1.03, probe_every=None, refresh_every=None,
                               verify_seconds={1: 1.3, 3: 2.0}, draft_seconds_per_token=0.5)
    assert [never.choose() for _ in range(8)] == [2] * 8  # without the refresh, the stale T(1) stays


def test_the_prior_cost_curve_follows_the_verify_mode():
    # On the batch-invariant build exact verification is one pass, priced as one: the flattest llama.cpp curve.
    # Exact chunks of <= 3 rows (a build without the patch) grow linearly: 4 rows cost more than 3 there.
    assert prior_curve("exact") == prior_curve("one-pass")
    assert prior_ratio(4, "one-pass") < prior_ratio(3, "one-pass")
    assert prior_ratio(4, "exact-chunks") > prior_ratio(3, "exact-chunks")
    assert prior_ratio(16, "exact") < prior_ratio(16, "exact-chunks") / 2


def test_each_runner_names_its_own_prior_curve():
    """The torch runner's passes grow far more slowly with their rows than llama.cpp's (bf16 on AMX: 16 rows
    cost 1.13 one-row passes), so the chooser must extrapolate with the torch curve, not llama.cpp's."""
    from tests.toy import tiny_runner

    runner = tiny_runner(0)
    assert runner.cost_curve == "torch-cpu-fp32"
    assert prior_ratio(16, "torch-cpu-bf16") < 1.3 < prior_ratio(16, "torch-cpu-fp32") < prior_ratio(16, "one-pass")
    assert prior_ratio(16, "torch-cuda-bf16") == prior_ratio(16, "torch-cpu-bf16")  # no GPU curve measured yet
    assert prior_ratio(16, "torch-cpu-fp16") == prior_ratio(16, "torch-cpu-fp32")
    chooser = DraftLengthChooser(k_max=12, cost_curve=runner.cost_curve)
    chooser.record_verify(1, 0.25)
    assert chooser.verify_table()[13] == pytest.approx(0.25 * prior_ratio(13, "torch-cpu-fp32"))


def test_the_goodput_planner_extrapolates_with_its_runners_curve():
    """One measured size: every other size is that one scaled by the runner's prior, not llama.cpp's exact one."""
    from verispec.serve.goodput import GoodputPolicy

    policy = GoodputPolicy(3, cost_curve="torch-cpu-bf16")
    policy.pass_seconds[1] = 0.2
    assert policy.t(16) / policy.t(1) == pytest.approx(prior_ratio(16, "torch-cpu-bf16"))
    assert policy.t(16) / policy.t(1) < prior_ratio(16, "exact") / 3
    assert GoodputPolicy(3).t(16) == pytest.approx(prior_ratio(16, "exact"))  # nothing measured: the unitless prior


@pytest.mark.parametrize("curve", ["exact", "one-pass", "torch-cpu-fp32", "torch-cpu-bf16"])
def test_the_chooser_and_the_goodput_planner_price_a_pass_alike(curve):
    from verispec.serve.goodput import GoodputPolicy

    measured = {2: 0.3, 5: 0.55, 9: 0.8}
    chooser = DraftLengthChooser(k_max=15, cost_curve=curve, verify_seconds=dict(measured))
    policy = GoodputPolicy(3, cost_curve=curve)
    policy.pass_seconds = dict(measured)
    table = chooser.verify_table()
    assert sorted(table) == list(range(1, 17))
    assert table == pytest.approx({n: policy.t(n) for n in table})
