"""A request's draft gate (verispec/draft_gate.py): the scheduler's cap and a costly drafter's prefill phase."""

from verispec.draft_gate import DraftGate


def test_a_gated_costly_drafter_runs_one_plain_step_before_its_deferred_prefill():
    gate = DraftGate()
    gate.plan(None)
    assert gate.start(costly=True, would_draft=True) is False and gate.prefill_pending
    assert not gate.prefill_due and gate.step_cap() == 0  # the plain first step
    assert gate.prefill_due and gate.prefill_pending
    gate.plan(2)
    gate.prefilled()
    assert gate.step_cap() == 2 and not gate.prefill_pending and gate.may_draft


def test_a_costly_drafter_whose_prefill_a_cap_of_zero_skipped_stays_off_whatever_the_cap_later():
    gate = DraftGate()
    gate.plan(0)
    assert gate.start(costly=True, would_draft=True) is False and gate.stays_off
    gate.plan(None)
    assert gate.step_cap() == 0 and not gate.may_draft and not gate.prefill_pending


def test_a_costly_drafter_that_would_not_draft_is_off_gated_or_not():
    for gated in (False, True):
        gate = DraftGate(gated=gated)
        assert gate.start(costly=True, would_draft=False) is False and gate.stays_off


def test_an_ungated_or_cheap_drafter_prefills_at_once_and_follows_the_cap():
    for costly in (True, False):
        gate = DraftGate()
        assert gate.start(costly, would_draft=True) and gate.step_cap() is None
        gate.plan(3)
        assert gate.step_cap() == 3
    cheap = DraftGate()
    cheap.plan(0)
    assert not cheap.start(costly=False, would_draft=True) and not cheap.stays_off  # capped, never off
    assert cheap.step_cap() == 0 and not cheap.may_draft
    cheap.plan(None)
    assert cheap.step_cap() is None and cheap.may_draft
