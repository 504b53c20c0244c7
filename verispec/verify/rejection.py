"""Where a drafted token is accepted or rejected.

Greedy: accept the longest prefix equal to the target's argmax, then the target's own token.
Sampling (Leviathan et al. 2023, Chen et al. 2023): accept x with probability min(1, p(x)/q(x));
on rejection draw from the normalised residual max(0, p - q); after full acceptance, a bonus
token from p. A drafter without probabilities is a one-hot q, which keeps the result exact.
Seeded sampling (sampling.PositionNoise): the greedy rule on p / E, whose argmax is the sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..sampling import PositionNoise, SamplingParams, logits_to_probs, sample


@dataclass
class Verdict:
    n_accepted: int  # drafted tokens accepted, in order
    next_token: int  # the target's own token after them (correction or bonus)


def residual(p: np.ndarray, q: np.ndarray | None, drafted: int, out: np.ndarray) -> np.ndarray:
    """Normalised max(0, p - q); q=None means a one-hot q on `drafted`. Falls back to p if empty."""
    if q is None:
        np.copyto(out, p)
        out[drafted] = 0.0
    else:
        np.subtract(p, q, out=out)
        np.maximum(out, 0.0, out=out)
    total = out.sum()
    if total <= 0.0:  # p == q (up to rounding): rejection had probability 0, any choice from p is exact
        np.copyto(out, p)
        total = out.sum()
    out /= total
    return out


class ChainVerifier:
    """Verifies a chain draft against the target's K+1 logit rows. Buffers are reused across steps."""

    def __init__(self, n_vocab: int, params: SamplingParams, rng: np.random.Generator, max_rows: int = 64,
                 noise: PositionNoise | None = None) -> None:
        self.params = params
        self.rng = rng
        self.noise = noise
        self._p = np.empty((max_rows, n_vocab), dtype=np.float64)
        self._scratch = np.empty((max_rows, n_vocab), dtype=np.float64)  # top-k work space, then the CDF
        self._residual = np.empty(n_vocab, dtype=np.float64)

    def verify(self, target_logits: np.ndarray, drafted: Sequence[int], draft_probs: np.ndarray | None,
               position: int = 0) -> Verdict:
        """`position`: the token position row 0 predicts (used by seeded requests only)."""
        if self.params.greedy:
            return greedy_verdict(target_logits, drafted)
        k = len(drafted)
        if k + 1 > self._p.shape[0]:
            self._p = np.empty((k + 1, self._p.shape[1]), dtype=np.float64)
            self._scratch = np.empty_like(self._p)
        p = logits_to_probs(target_logits[: k + 1], self.params, out=self._p, scratch=self._scratch)
        if self.noise is not None:
            for i, row in enumerate(p):
                self.noise.perturb(row, position + i)
            return greedy_verdict(p, drafted)
        return self.verify_probs(p, drafted, draft_probs)

    def verify_probs(self, p: np.ndarray, drafted: Sequence[int], q: np.ndarray | None) -> Verdict:
        for i, x in enumerate(drafted):
            q_x = 1.0 if q is None else q[i, x]
            if self.rng.random() * q_x < p[i, x]:
                continue
            return Verdict(i, sample(residual(p[i], None if q is None else q[i], x, self._residual), self.rng,
                                     self._scratch[0]))
        return Verdict(len(drafted), sample(p[len(drafted)], self.rng, self._scratch[0]))


def greedy_verdict(target_logits: np.ndarray, drafted: Sequence[int]) -> Verdict:
    k = len(drafted)
    choices = target_logits[: k + 1].argmax(axis=1)
    if k:
        mismatch = np.flatnonzero(choices[:k] != np.asarray(drafted))
        n = int(mismatch[0]) if mismatch.size else k
    else:
        n = 0
    return Verdict(n, int(choices[n]))
