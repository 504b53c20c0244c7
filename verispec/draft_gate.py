"""Whether a request's drafter may draft at its next step, and how far: one request's draft gate.

Two things decide it. The scheduler's cap on K, which its goodput planner sets between steps (`plan`). And,
for a costly drafter (a draft model), the phase of its prompt prefill, which the engine moves:
- a drafter whose prefill was skipped (a cap of 0 at the start, or its chooser would not draft) stays off for
  the request: its first proposal would first catch up on the whole context, stalling every request the
  scheduler runs with it;
- a scheduler's request defers the prefill: its first decode step is plain, and at its second the cap planned
  meanwhile decides (prefill on the context and draft, or off), once the scheduler has admitted whoever
  arrived with it.
docs/server.md ("Draft lengths under load") gives the measurements behind both.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class PrefillPhase(Enum):
    READY = "ready"  # drafts as the cap allows: prefilled, or a drafter that needs no prefill
    OFF = "off"  # a costly drafter whose prefill was skipped: it never drafts for the request
    PLAIN_FIRST = "plain first"  # the prefill is deferred: the first decode step is plain
    DUE = "due"  # the deferred prefill runs at this step if the cap and the chooser let the request draft


@dataclass
class DraftGate:
    cap: int | None = None  # the most tokens the next step may draft (None: no limit; 0: no drafting)
    gated: bool = False  # a scheduler plans the cap
    phase: PrefillPhase = PrefillPhase.READY

    def plan(self, cap: int | None) -> None:
        """The scheduler's cap for the request's next steps; from now on the scheduler plans it."""
        self.gated, self.cap = True, cap

    def start(self, costly: bool, would_draft: bool) -> bool:
        """A request starts: whether its drafter prefills the prompt now."""
        prefill = would_draft and self.cap != 0
        if not costly:
            self.phase = PrefillPhase.READY
            return prefill
        if not prefill:
            self.phase = PrefillPhase.OFF
        elif self.gated:
            self.phase = PrefillPhase.PLAIN_FIRST
        else:
            self.phase = PrefillPhase.READY
        return self.phase is PrefillPhase.READY

    def step_cap(self) -> int | None:
        """The cap of the step about to run (a plain first step makes the deferred prefill due next)."""
        if self.phase is PrefillPhase.PLAIN_FIRST:
            self.phase = PrefillPhase.DUE
            return 0
        return 0 if self.phase is PrefillPhase.OFF else self.cap

    def prefilled(self) -> None:
        self.phase = PrefillPhase.READY

    def switch_off(self) -> None:
        self.phase = PrefillPhase.OFF

    @property
    def prefill_due(self) -> bool:
        return self.phase is PrefillPhase.DUE

    @property
    def prefill_pending(self) -> bool:
        """The deferred prefill has not run yet (the planner plans such a request no drafts)."""
        return self.phase in (PrefillPhase.PLAIN_FIRST, PrefillPhase.DUE)

    @property
    def stays_off(self) -> bool:
        return self.phase is PrefillPhase.OFF

    @property
    def may_draft(self) -> bool:
        """Neither the cap nor the drafter's phase rules drafting out."""
        return self.cap != 0 and not self.stays_off
