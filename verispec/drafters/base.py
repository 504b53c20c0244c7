"""The drafter interface: propose up to k next tokens for a context, with their draft distributions if any."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..sampling import SamplingParams


@dataclass
class Draft:
    tokens: list[int]
    probs: np.ndarray | None = None  # (len(tokens), V) draft distributions q; None = deterministic (one-hot)
    source: str = ""


class Drafter(ABC):
    name: str
    # True when drafting costs time comparable to a target pass, so the draft length must pay for it.
    costly: bool = False

    def begin(self, prompt: Sequence[int], params: SamplingParams, rng: np.random.Generator) -> None:
        """A new request starts; `prompt` is its full token context so far."""

    @abstractmethod
    def propose(self, context: Sequence[int], k: int) -> Draft:
        """Up to k tokens that may follow `context` (prompt + accepted output). May return fewer."""

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        """Candidate continuations for a token tree, most likely first. Default: the chain alone."""
        draft = self.propose(context, k)
        return [draft.tokens] if draft.tokens else []

    def accepted(self, row: int) -> None:
        """Called after every target pass with the row (in that pass's output) of the last kept token.

        The target's state at that row predicts the next token; drafters that read the target's
        hidden states (Medusa/EAGLE heads) take it from there. Most drafters ignore it.
        """

    def close(self) -> None:
        pass
