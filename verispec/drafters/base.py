"""The drafter interface: propose up to k next tokens for a context, with their draft distributions if any."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np

from ..runners.passes import DraftPass
from ..sampling import LogitsProcessor, PositionNoise, SamplingParams


def run_passes(steps: Generator[DraftPass, np.ndarray, object]):
    """Drive a drafting coroutine alone: each of its passes runs at once. Returns what it returns."""
    try:
        event = next(steps)
        while True:
            event = steps.send(event.run())
    except StopIteration as done:
        return done.value


@dataclass
class Draft:
    tokens: list[int]
    probs: np.ndarray | None = None  # (len(tokens), V) draft distributions q; None = deterministic (one-hot)
    source: str = ""
    sources: list[str] | None = None  # per token, when several drafters contributed (a cascade)

    def source_of(self, i: int) -> str:
        return self.sources[i] if self.sources else self.source


@dataclass
class Candidates:
    """Next-token candidates for one tree node, most likely first."""

    tokens: list[int]
    probs: np.ndarray  # draft probability of each candidate (for ranking)
    source: str


class Drafter(ABC):
    name: str
    # True when drafting costs time comparable to a target pass, so the draft length must pay for it.
    costly: bool = False

    def begin(self, prompt: Sequence[int], params: SamplingParams, rng: np.random.Generator,
              noise: PositionNoise | None = None, processor: LogitsProcessor | None = None) -> None:
        """A new request starts; `prompt` is its full token context so far.

        `noise` is a seeded request's per-position randomness: a drafter that samples should draw
        with it (PositionNoise.choose) to be accepted as often as it can. `processor` edits the
        request's logits (bias, penalties): a drafter that reads logits should draft from its edits
        too, or its drafts are accepted less often (never wrongly: any q is exact).
        """

    def prefill(self, prompt: Sequence[int]) -> None:
        """Get ready to propose after `prompt` (a draft model runs it through its cache).

        Apart from begin() so that the engine can skip it for a request that will not draft: a
        draft model's prefill costs about a fifth of the target's, a loss when nothing is drafted.
        """

    @abstractmethod
    def propose(self, context: Sequence[int], k: int) -> Draft:
        """Up to k tokens that may follow `context` (prompt + accepted output). May return fewer."""

    def propose_steps(self, context: Sequence[int], k: int) -> Generator[DraftPass, np.ndarray, Draft]:
        """propose() as a coroutine that yields the model passes it needs (DraftPass), so that a server can run
        those of many requests together. Default: a drafter with no such passes proposes at once."""
        return self.propose(context, k)
        yield  # a generator, that never yields

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        """Candidate continuations for a token tree, most likely first. Default: the chain alone."""
        draft = self.propose(context, k)
        return [draft.tokens] if draft.tokens else []

    def branch_steps(self, context: Sequence[int], k: int, width: int) -> Generator[DraftPass, np.ndarray,
                                                                                      tuple[list[list[int]], list[str]]]:
        """propose_branches() plus the drafter that proposed each branch (a cascade has several), as a coroutine
        that yields its model passes (see propose_steps). Default: at once."""
        branches = self.propose_branches(context, k, width)
        return branches, [self.name] * len(branches)
        yield  # a generator, that never yields

    def expand(self, context: Sequence[int], width: int) -> Candidates:
        """Up to `width` candidate next tokens after `context`, most likely first, with draft probabilities.

        Trees grow by calling this on tree nodes (context + the node's path). The probabilities only
        rank candidates: the tree verifier treats every candidate as a one-hot proposal, so any
        ranking is lossless. Default: the first token of propose(), with probability 1.
        """
        tokens = self.propose(context, 1).tokens[:1]
        return Candidates(tokens, np.ones(len(tokens)), self.name)

    def expand_steps(self, context: Sequence[int], width: int) -> Generator[DraftPass, np.ndarray, Candidates]:
        """expand() as a coroutine that yields its model passes (see propose_steps): a server grows the trees of
        all its requests together, one draft decode per round. Default: at once."""
        return self.expand(context, width)
        yield  # a generator, that never yields

    def accepted(self, row: int) -> None:
        """Called after every target pass with the row (in that pass's output) of the last kept token.

        The target's state at that row predicts the next token; drafters that read the target's
        hidden states (Medusa/EAGLE heads) take it from there. Most drafters ignore it.
        """

    def finish(self, context: Sequence[int]) -> None:
        """The request ended (done, stopped or cancelled) with `context`: its prompt and every token it kept.
        A drafter that learns across requests (suffix) keeps it; most ignore it."""

    def close(self) -> None:
        pass
