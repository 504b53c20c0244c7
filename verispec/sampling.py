"""Logits -> probabilities, applied identically to draft and target.

Losslessness of speculative sampling depends on p (target) and q (draft) being processed by the
same function, so this module is the only place that turns logits into a distribution.

The order, for every row: the request's own edits (LogitsProcessor: logit_bias, presence and frequency
penalties), then temperature, then the cuts (min-p, top-k, which commute: each keeps the entries above a
threshold), the renormalisation, and top-p last. Greedy is the argmax of the edited logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidParameter

# The nucleus is searched inside the top candidates first (argpartition, O(V)); a full sort of a
# 150k vocabulary costs ~10 ms and is needed only when these candidates hold less than top_p.
NUCLEUS_CANDIDATES = 2048
# Nucleus masses are counted in whole units of 2^-34 of the top token's weight, held in float64: a
# vocabulary of up to 2^19 tokens sums to less than 2^53 units, where float64 adds integers exactly.
NUCLEUS_UNITS_PER_TOP_TOKEN = 2.0**34
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@dataclass
class SamplingParams:
    """How to pick each next token. temperature == 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_p: float = 0.0  # keep tokens with at least min_p x the top token's probability (0 = off)
    presence_penalty: float = 0.0  # subtracted from a token's logit once it has been generated
    frequency_penalty: float = 0.0  # subtracted once per time a token has been generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None = off)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise InvalidParameter(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParameter(f"temperature must be >= 0, got {self.temperature!r}", "temperature")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameter(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", "top_k")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidParameter(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidParameter(f"seed must be a non-negative integer, got {self.seed!r}", "seed")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameter(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidParameter(f"{name} must be in [-2, 2], got {getattr(self, name)!r}", name)
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0 or not -100.0 <= bias <= 100.0:
                raise InvalidParameter(f"logit_bias maps token ids >= 0 to values in [-100, 100], got {token!r}: {bias!r}",
                                       "logit_bias")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameter(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs!r}", "top_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def edits_logits(self) -> bool:
        """Whether the request's logits are edited before sampling (LogitsProcessor)."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def logprob_temperature(self) -> float:
        """The temperature reported log-probabilities are taken at: the request's, or 1 for a greedy one."""
        return self.temperature if self.temperature > 0.0 else 1.0


def logits_to_probs(logits: np.ndarray, params: SamplingParams, out: np.ndarray | None = None,
                    scratch: np.ndarray | None = None) -> np.ndarray:
    """Turn logit rows (n, V) or one row (V,) into the sampling distribution, in float64.

    Greedy (temperature 0) gives a one-hot on the argmax, so the rejection sampler needs no
    special case. `out` (and `scratch`, as large, used by top-k and top-p) let the caller reuse
    buffers across steps.
    """
    rows = np.atleast_2d(logits)
    if out is None:
        out = np.empty(rows.shape, dtype=np.float64)
    else:
        out = out[: rows.shape[0]]
    if params.greedy:
        out.fill(0.0)
        out[np.arange(rows.shape[0]), rows.argmax(axis=1)] = 1.0
        return out if logits.ndim == 2 else out[0]
    np.multiply(rows, 1.0 / params.temperature, out=out)
    out -= out.max(axis=1, keepdims=True)
    np.exp(out, out=out)  # each row's top entry is now 1
    if params.min_p > 0.0:
        out[out < params.min_p] = 0.0
    if params.top_k and params.top_k < rows.shape[1]:
        _keep_top_k(out, params.top_k, scratch)
    if params.top_p < 1.0:
        work = np.empty(rows.shape[1]) if scratch is None else scratch.reshape(-1)[: rows.shape[1]]
        for row in out:
            _keep_nucleus(row, params.top_p, work)
    out /= out.sum(axis=1, keepdims=True)
    return out if logits.ndim == 2 else out[0]


def _keep_top_k(weights: np.ndarray, k: int, scratch: np.ndarray | None = None) -> None:
    """Zero every entry below each row's k-th largest (ties at the threshold are kept)."""
    if scratch is None:
        kth = np.partition(weights, -k, axis=1)[:, -k][:, None]
    else:
        work = scratch.reshape(-1, weights.shape[1])[: weights.shape[0]]
        np.copyto(work, weights)
        work.partition(-k, axis=1)
        kth = work[:, -k][:, None]
    weights[weights < kth] = 0.0


def nucleus_inside(sorted_units, total_units, top_p: float):
    """The nucleus rule, for numpy (here) and torch (verify/device.py) alike.

    Weights (top token 1.0) are counted in whole units: floor(weight * NUCLEUS_UNITS_PER_TOP_TOKEN). A token is
    kept when the tokens of more units than it hold less than top_p of the row's units: sorted descending,
    tokens are taken while the units before each are < top_p * total, and every token tied with the last one
    taken is kept too. Units are integers below 2^53, so every sum is exact whatever its order (numpy's pairwise
    sum, torch's cascade, a GPU scan), and ties need no order: given the same weights, the host and the device
    keep the same tokens. This returns the mask of the sorted units taken (a prefix), along the last axis.
    """
    before = sorted_units.cumsum(-1) - sorted_units
    return before < total_units * top_p


def _keep_nucleus(row: np.ndarray, top_p: float, work: np.ndarray) -> None:
    """Zero the weights (top token 1.0) outside the nucleus (nucleus_inside's rule); `work` is a row's scratch."""
    units = np.floor(np.multiply(row, NUCLEUS_UNITS_PER_TOP_TOKEN, out=work), out=work)
    total = units.sum()
    if units.shape[0] > NUCLEUS_CANDIDATES:
        units.partition(-NUCLEUS_CANDIDATES)
        sorted_units = np.sort(units[-NUCLEUS_CANDIDATES:])[::-1]
        n_inside = int(nucleus_inside(sorted_units, total, top_p).sum())
        if n_inside < NUCLEUS_CANDIDATES:
            return _keep_from(row, sorted_units[n_inside - 1])
    units.sort()
    sorted_units = units[::-1]
    _keep_from(row, sorted_units[int(nucleus_inside(sorted_units, total, top_p).sum()) - 1])


def _keep_from(row: np.ndarray, least_units: float) -> None:
    # floor(w * 2^34) < n  <=>  w < n / 2^34 for an integer n, both sides exact
    row[row < least_units / NUCLEUS_UNITS_PER_TOP_TOKEN] = 0.0


def sample(probs: np.ndarray, rng: np.random.Generator, cdf_buffer: np.ndarray | None = None) -> int:
    """Draw one token from a distribution row by inverse CDF; `cdf_buffer` (V floats) avoids allocating."""
    cdf = np.cumsum(probs, out=cdf_buffer[: probs.shape[0]] if cdf_buffer is not None else None)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.shape[0] - 1))


class PositionNoise:
    """The randomness of a seeded request, keyed by token position so that drafting cannot change it.

    Token j is drawn as argmax(p_j / E_j), where E_j holds one standard exponential per vocabulary
    entry drawn from (seed, j) alone. That is an exact sample from p_j (the exponential race, the
    same as Gumbel-max), and a function of the prefix and the seed only. So a seeded request writes,
    token for token, what plain decoding with the same seed writes, whatever the draft lengths (which
    follow measured timings), the drafter, or the batch; the rejection sampler's draws would depend
    on all of these. Verification is then the greedy rule applied to p / E, and a draft model that
    proposes argmax(q_j / E_j) with the same noise is accepted whenever the two argmaxes agree.

    The noise of the last `slots` positions is kept: the draft and the target ask for the same
    positions within a step, and rejected positions come back in the next one.
    """

    def __init__(self, seed: int, n_vocab: int, slots: int = 16) -> None:
        self.seed = seed
        self.n_vocab = n_vocab
        self._noise = np.empty((slots, n_vocab), dtype=np.float32)
        self._position = np.full(slots, -1, dtype=np.int64)
        self._scores = np.empty(n_vocab, dtype=np.float64)

    def at(self, position: int) -> np.ndarray:
        """E for token position `position` (its index in prompt + output)."""
        slot = position % self._position.shape[0]
        if self._position[slot] != position:
            noise = self._noise[slot]
            np.random.default_rng([self.seed, position]).standard_exponential(out=noise, dtype=np.float32)
            np.maximum(noise, np.finfo(np.float32).tiny, out=noise)  # an exact 0 would divide by zero
            self._position[slot] = position
        return self._noise[slot]

    def perturb(self, probs: np.ndarray, position: int) -> np.ndarray:
        """p / E in place: its argmax is the seeded sample at `position`."""
        n = min(probs.shape[0], self.n_vocab)
        probs[n:] = 0.0  # a draft's extra padding rows: never the target's token
        np.divide(probs[:n], self.at(position)[:n], out=probs[:n])
        return probs

    def choose(self, probs: np.ndarray, position: int) -> int:
        """The seeded sample from `probs` at `position` (probs is left untouched)."""
        n = min(probs.shape[0], self.n_vocab)
        scores = self._scores[:n]
        np.divide(probs[:n], self.at(position)[:n], out=scores)
        return int(np.argmax(scores))


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
         noise: PositionNoise | None = None, position: int = 0) -> int:
    """One next token from one logit row: argmax when greedy, else a sample (seeded: at `position`)."""
    if params.greedy:
        return int(np.argmax(logits))
    probs = logits_to_probs(logits, params)
    return noise.choose(probs, position) if noise is not None else sample(probs, rng)


@dataclass
class TokenLogprob:
    """A written token's log-probability, and the most likely tokens at its position (OpenAI's top_logprobs)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # most likely first


class LogitsProcessor:
    """One request's state that its logits depend on: its logit_bias, its presence and frequency penalties over
    the tokens it has generated (as OpenAI defines them: the prompt does not count), and the log-probabilities
    of the tokens it keeps, when it asks for them.

    Row i of a verify pass predicts the token after the accepted output and the path to row i (a chain's
    first i drafted tokens; a tree node's ancestors): `apply` edits each row for its own path, so a drafted
    token counts for the rows after it, as it would have in plain decoding, and speculation samples from the
    same distributions. The edits touch the biased and the counted columns only, from small arrays; the one
    vocabulary-sized cost is the copy of the rows into a reused buffer (the runner's logits stay as they were).
    """

    def __init__(self, params: SamplingParams, n_vocab: int, n_context: int) -> None:
        self.params = params
        self.n_context = n_context  # prompt + accepted output: drafters' paths start after it
        bias = sorted(params.logit_bias.items())
        if bias and bias[-1][0] >= n_vocab:
            raise InvalidParameter(f"logit_bias names token {bias[-1][0]}; the vocabulary has {n_vocab}", "logit_bias")
        self._bias_ids = np.array([token for token, _ in bias], dtype=np.int64)
        self._bias = np.array([value for _, value in bias], dtype=np.float64)
        self._penalised = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.counts = np.zeros(n_vocab, dtype=np.int64)  # generated tokens, by id
        self._seen = np.empty(0, dtype=np.int64)  # the ids counted at least once, sorted
        self._buffer: np.ndarray | None = None
        self.kept_logprobs: list[TokenLogprob] = []  # of the tokens the last accept() kept

    @property
    def edits(self) -> bool:
        return self.params.edits_logits

    def accept(self, tokens: Sequence[int], rows=None) -> None:
        """The step kept `tokens`; `rows` (edited, row i the one token i was drawn from) give their logprobs."""
        ids = np.asarray(tokens, dtype=np.int64)
        if self._penalised:
            np.add.at(self.counts, ids, 1)
            self._seen = np.union1d(self._seen, ids)
        self.n_context += len(tokens)
        if self.params.logprobs is not None and rows is not None:
            self.kept_logprobs = token_logprobs(rows, tokens, self.params)

    def column_edits(self, paths: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """The columns the edits touch (sorted ids, m) and what each row adds to them (len(paths), m)."""
        extra = np.fromiter((t for path in paths for t in path), dtype=np.int64) if self._penalised else self._seen[:0]
        ids = np.union1d(np.union1d(self._bias_ids, self._seen), extra)
        delta = np.zeros((len(paths), ids.shape[0]))
        if self._bias_ids.size:
            delta[:, np.searchsorted(ids, self._bias_ids)] += self._bias
        if self._penalised:
            counts = np.repeat(self.counts[ids][None, :], len(paths), axis=0)
            if extra.size:
                rows = np.repeat(np.arange(len(paths)), [len(path) for path in paths])
                np.add.at(counts, (rows, np.searchsorted(ids, extra)), 1)
            delta -= self.params.frequency_penalty * counts + self.params.presence_penalty * (counts > 0)
        return ids, delta

    def apply(self, rows, paths: Sequence[Sequence[int]], out: np.ndarray | None = None):
        """Rows 0..len(paths)-1 edited, row i for `paths[i]` (the tokens between the accepted output and it).
        Host rows go into `out` (or the processor's own buffer); device rows (torch) into a new tensor."""
        if not self.edits:
            return rows[: len(paths)]
        ids, delta = self.column_edits(paths)
        if not isinstance(rows, np.ndarray):
            from .sampling_device import edit_columns

            return edit_columns(rows[: len(paths)], ids, delta)
        if out is None:
            out = self._buffer_for(rows, len(paths))
        out = out[: len(paths)]
        np.copyto(out, rows[: len(paths)])
        out[:, ids] += delta.astype(out.dtype)
        return out

    def _buffer_for(self, rows: np.ndarray, n: int) -> np.ndarray:
        if self._buffer is None or self._buffer.shape[0] < n or self._buffer.dtype != rows.dtype:
            self._buffer = np.empty((max(n, 16), rows.shape[1]), dtype=rows.dtype)
        return self._buffer


def chain_paths(drafted: Sequence[int]) -> list[list[int]]:
    """The path to each row of a chain's verify pass: row i follows the first i drafted tokens."""
    return [list(drafted[:i]) for i in range(len(drafted) + 1)]


def token_logprobs(rows, tokens: Sequence[int], params: SamplingParams) -> list[TokenLogprob]:
    """log softmax(row_i / T) at tokens[i], and its `params.logprobs` largest entries: the distribution the token
    was drawn from before the cuts (min-p, top-k, top-p), at the request's temperature (1 when greedy), so that a
    greedy request reports the model's own log-probabilities. Masked entries (-inf) are never listed.
    Device rows (torch) are reduced on the device (sampling_device.py)."""
    if not isinstance(rows, np.ndarray):
        from .sampling_device import token_logprobs as on_device

        return [TokenLogprob(*entry) for entry in on_device(rows, tokens, params.logprob_temperature, params.logprobs or 0)]
    n = len(tokens)
    scaled = rows[:n].astype(np.float64) / params.logprob_temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    scaled -= np.log(np.exp(scaled).sum(axis=1, keepdims=True))
    chosen = scaled[np.arange(n), np.asarray(tokens, dtype=np.int64)]
    k = min(params.logprobs or 0, scaled.shape[1])
    top = np.argpartition(-scaled, k - 1, axis=1)[:, :k] if k else np.empty((n, 0), dtype=np.int64)
    out = []
    for i, token in enumerate(tokens):
        ranked = sorted(((int(t), float(scaled[i, t])) for t in top[i]), key=lambda e: (-e[1], e[0]))
        out.append(TokenLogprob(int(token), float(chosen[i]), [e for e in ranked if e[1] > -np.inf]))
    return out


def top2_margin(row: np.ndarray) -> float:
    """Top-1 minus top-2 logit, in two passes over the row and no copy (np.partition copies 152k floats)."""
    i = int(row.argmax())
    top = row[i]
    row[i] = -np.inf
    second = row.max()
    row[i] = top
    return float(top - second)
