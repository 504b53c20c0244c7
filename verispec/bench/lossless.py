"""Is a method's greedy output the same as plain decoding's? And if not, is the divergence a numerical tie?

A divergence is a tie when, at the first diverging token, the plain run's top-1 minus top-2 logit
margin is below the tolerance: the numerical noise the bench measured between the runner's pass
shapes (verify_cost.pass_shape_noise), where another batch shape may legitimately flip the argmax.
In the llama.cpp runner's exact verify mode that noise is 0 (rows are bit-identical to one-row
passes), so every divergence there is unexplained, i.e. a bug. No constant tolerance is assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Divergence:
    turn: int  # which conversation turn diverged first
    index: int  # the first differing token within that turn
    ar_margin: float | None  # the plain run's top-2 margin there (None if not recorded)
    tie: bool

    def to_dict(self) -> dict:
        return asdict(self)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token; a length difference counts at the shorter length."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(ar_turns: Sequence[Sequence[int]], ar_margins: Sequence[Sequence[float]],
            other_turns: Sequence[Sequence[int]], tolerance: float) -> Divergence | None:
    """First divergence of `other` from plain decoding over a conversation, or None when identical.

    `ar_margins[t][i]` is the plain run's margin at token i of turn t (the engine records one per
    emitted token, including a final EOS, so a run that stops early still has its margin).
    """
    for turn, (ar, other) in enumerate(zip(ar_turns, other_turns)):
        i = first_divergence(ar, other)
        if i is None:
            continue
        margins = ar_margins[turn] if turn < len(ar_margins) else []
        margin = float(margins[i]) if i < len(margins) else None
        return Divergence(turn, i, margin, margin is not None and margin < tolerance)
    if len(ar_turns) != len(other_turns):
        return Divergence(min(len(ar_turns), len(other_turns)), 0, None, False)
    return None


def count(divergences: Sequence[Divergence | None]) -> tuple[int, int]:
    """(mismatches, unexplained_mismatches) over a method's prompts."""
    found = [d for d in divergences if d is not None]
    return len(found), sum(not d.tie for d in found)
