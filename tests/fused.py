"""Running request coroutines together on a pool from a test, through the stepper (verispec/stepper.py)."""

from verispec.stepper import Stepper


def run_together(pool, runs: dict, prefill_chunk: int | None = None) -> dict[int, list[int]]:
    """Step coroutines (sequence -> a generator of Forwards and token lists, such as Engine.steps) together
    until all finish; return each one's emitted tokens. A coroutine's error is raised here."""
    stepper = Stepper(pool, prefill_chunk)
    for seq, run in runs.items():
        stepper.add(seq, run)
    out = {seq: [] for seq in runs}
    while stepper.members:
        for member in stepper.step():
            out[member.seq] += member.out
            member.out = []
            if member.error is not None:
                raise member.error
            if member.finished:
                stepper.remove(member.seq)
    return out


def collecting(run, into: list):
    """Pass a step coroutine's Forwards through, keeping the tokens it emits in `into` (several requests
    one after another on one sequence)."""
    reply = None
    while True:
        try:
            event = run.send(reply)
        except StopIteration:
            return
        if not isinstance(event, list):  # a target pass (Forward) or a draft model's (DraftPass)
            reply = yield event
        else:
            into.extend(event)
            reply = None
