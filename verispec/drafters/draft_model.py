"""A small model drafts autoregressively. Its KV cache mirrors a prefix of the context.

Before each proposal the drafter rolls its cache back to the longest prefix it shares with the
accepted context, then feeds what is missing (the accepted tokens and the target's bonus token).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np

from ..errors import TokenizerMismatch
from ..runners.base import Runner
from ..runners.passes import DraftPass
from ..sampling import LogitsProcessor, PositionNoise, SamplingParams, logits_to_probs, sample
from .base import Candidates, Draft, Drafter, run_passes


class ModelDrafter(Drafter):
    costly = True

    def __init__(self, runner: Runner, min_prob: float = 0.0, max_tokens: int = 32) -> None:
        self.runner = runner
        self.name = runner.name
        self.min_prob = min_prob  # stop drafting when the draft's own top probability falls below this
        self._cached: list[int] = []
        self._q = np.empty((max_tokens, runner.n_vocab), dtype=np.float64)
        self._scratch = np.empty(runner.n_vocab, dtype=np.float32)
        self._edited = np.empty((1, runner.n_vocab), dtype=np.float32)
        self.params = SamplingParams()
        self.rng = np.random.default_rng()
        self.noise: PositionNoise | None = None
        self.processor: LogitsProcessor | None = None

    def begin(self, prompt, params: SamplingParams, rng: np.random.Generator,
              noise: PositionNoise | None = None, processor: LogitsProcessor | None = None) -> None:
        self.params, self.rng, self.noise = params, rng, noise
        self.processor = processor if processor is not None and processor.edits else None

    def prefill(self, prompt: Sequence[int]) -> None:
        """Prefill the prompt before the first proposal, so that proposal's measured time is draft steps only."""
        self.runner.check_fits(len(prompt) - _common_prefix(self._cached, prompt))
        self._sync(prompt)

    def _sync(self, context: Sequence[int], on_device: bool = False):
        """Make the cache hold context[:-1]... plus the last token; return the logits after the context
        (a host array, or with `on_device` the runner's own tensor)."""
        if on_device:
            missing = self._missing(context)
            logits = self.runner.forward_native(missing, all_logits=False)[-1]
            self._cached.extend(missing)
            return logits
        return run_passes(self._sync_steps(context))

    def _missing(self, context: Sequence[int]) -> list[int]:
        """Roll the cache back to what it shares with the context (at least the last token is left) and
        return the tokens it must be fed."""
        del self._cached[self.runner.n_past :]  # cut under us: a server frees a slot's draft cells between requests
        common = _common_prefix(self._cached, context)
        if common == len(context):  # never re-feed nothing: we need the logits after the last token
            common -= 1
        self.runner.rollback(common)
        del self._cached[common:]
        return list(context[common:])

    def _sync_steps(self, context: Sequence[int]) -> Generator[DraftPass, np.ndarray, np.ndarray]:
        missing = self._missing(context)
        logits = yield DraftPass(self.runner, missing)
        self._cached.extend(missing)
        return logits

    def propose(self, context: Sequence[int], k: int) -> Draft:
        return run_passes(self.propose_steps(context, k))

    def propose_steps(self, context: Sequence[int], k: int) -> Generator[DraftPass, np.ndarray, Draft]:
        """A chain of up to k tokens: a pass that catches the cache up on the context, then one per token."""
        if k <= 0:
            return Draft([], None, self.name)
        if k > self._q.shape[0]:
            self._q = np.empty((k, self.runner.n_vocab), dtype=np.float64)
        self.runner.check_fits(len(context) - self.runner.n_past + k)
        if self._chains_on_device():
            return Draft(self._greedy_chain_on_device(context, k), None, self.name)
        logits = yield from self._sync_steps(context)
        tokens: list[int] = []
        for i in range(k):
            if self.processor is not None:  # the target's edits for this position, its own drafts counted
                path = list(context[self.processor.n_context :]) + tokens
                logits = self.processor.apply(logits[None], [path], out=self._edited)[0]
            token, confident = self._choose(logits, i, len(context) + i)
            if not confident and tokens:
                break
            tokens.append(token)
            if not confident:
                break
            if i + 1 < k:
                logits = yield DraftPass(self.runner, [token])
                self._cached.append(token)
        # A seeded draft is verified by comparing argmaxes (sampling.PositionNoise): no q needed.
        probs = None if self.params.greedy or self.noise is not None else self._q[: len(tokens)]
        return Draft(tokens, probs, self.name)

    def _chains_on_device(self) -> bool:
        """A greedy draft on a device runner (torch) feeds each argmax back without reading it on the host."""
        return (getattr(self.runner, "logits_on_device", False) and self.params.greedy and self.min_prob <= 0.0
                and self.processor is None)

    def _greedy_chain_on_device(self, context: Sequence[int], k: int) -> list[int]:
        """K greedy tokens with one host sync: each pass's argmax stays a device tensor and is the next input."""
        import torch

        token = self._sync(context, on_device=True).argmax().view(1)
        chain = [token]
        for _ in range(k - 1):
            token = self.runner.forward_native(token, all_logits=False)[-1].argmax().view(1)
            chain.append(token)
        tokens = torch.cat(chain).tolist()
        self._cached.extend(tokens[:-1])
        return tokens

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        return run_passes(self._branches(context, k, width))

    def branch_steps(self, context: Sequence[int], k: int, width: int) -> Generator[DraftPass, np.ndarray,
                                                                                      tuple[list[list[int]], list[str]]]:
        branches = yield from self._branches(context, k, width)
        return branches, [self.name] * len(branches)

    def _branches(self, context: Sequence[int], k: int, width: int) -> Generator[DraftPass, np.ndarray, list[list[int]]]:
        """The draft's greedy chain, plus its next-best `width - 1` tokens at each depth as side leaves.

        Siblings are deterministic candidates, so the tree verifier treats them as one-hot drafts.
        """
        if k <= 0:
            return []
        self.runner.check_fits(len(context) - self.runner.n_past + k)
        logits = yield from self._sync_steps(context)
        chain: list[int] = []
        sides: list[list[int]] = []
        for i in range(k):
            ranked = np.argpartition(logits, -width)[-width:] if width > 1 else np.array([int(np.argmax(logits))])
            ranked = ranked[np.argsort(-logits[ranked])]
            token = int(ranked[0])
            sides.extend(chain + [int(alt)] for alt in ranked[1:])
            chain.append(token)
            if i + 1 < k:
                logits = yield DraftPass(self.runner, [token])
                self._cached.append(token)
        return [chain] + sides

    def expand(self, context: Sequence[int], width: int) -> Candidates:
        return run_passes(self.expand_steps(context, width))

    def expand_steps(self, context: Sequence[int], width: int) -> Generator[DraftPass, np.ndarray, Candidates]:
        """The draft's `width` most likely next tokens after `context` (one draft pass, plus any re-feed)."""
        self.runner.check_fits(len(context) - self.runner.n_past + 1)
        logits = yield from self._sync_steps(context)
        top = np.argpartition(logits, -width)[-width:] if width < logits.shape[0] else np.arange(logits.shape[0])
        top = top[np.argsort(-logits[top])]
        peak = float(logits[top[0]])
        np.subtract(logits, peak, out=self._scratch)
        log_norm = peak + float(np.log(np.exp(self._scratch, out=self._scratch).sum()))
        return Candidates([int(t) for t in top], np.exp(logits[top].astype(np.float64) - log_norm), self.name)

    def _choose(self, logits: np.ndarray, row: int, position: int) -> tuple[int, bool]:
        if self.params.greedy:
            token = int(np.argmax(logits))
            if self.min_prob <= 0.0:
                return token, True
            top_prob = 1.0 / float(np.exp(logits - logits[token]).sum())
            return token, top_prob >= self.min_prob
        q = logits_to_probs(logits, self.params, out=self._q[row : row + 1])
        token = self.noise.choose(q, position) if self.noise is not None else sample(q, self.rng)
        return token, q[token] >= self.min_prob

    def close(self) -> None:
        self.runner.close()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n and a[n - 1] == b[n - 1] and list(a[:n]) == list(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_same_vocab(target: Runner, draft: Runner) -> None:
    """A draft must share the target's tokens id for id; only trailing padding rows may differ."""
    t_vocab, d_vocab = target.tokenizer.vocab_strings(), draft.tokenizer.vocab_strings()
    shared = min(len(t_vocab), len(d_vocab))
    extra = t_vocab[shared:] + d_vocab[shared:]
    if any(e and not _is_padding(e) for e in extra):
        raise TokenizerMismatch(
            f"draft {draft.name} has {len(d_vocab)} tokens and target {target.name} has {len(t_vocab)}: "
            "their vocabularies differ beyond padding rows"
        )
    diff = next((i for i in range(shared) if t_vocab[i] != d_vocab[i]), None)
    if diff is not None:
        raise TokenizerMismatch(
            f"draft {draft.name} does not share the target's tokenizer: token {diff} is "
            f"{d_vocab[diff]!r} in the draft but {t_vocab[diff]!r} in {target.name}"
        )


def _is_padding(token: str) -> bool:
    return "pad" in token.lower() or token.startswith("<unused") or token.startswith("[PAD")
