"""Drafting from heads trained on the target (Medusa heads or an EAGLE-style layer).

The engine calls accepted(row) after every target pass; the target's hidden state at that row
predicted the bonus token that now ends the context. Medusa head k maps it to the token k+1
places after the bonus; the EAGLE layer steps from (hidden, bonus) to the next hidden state and
drafts autoregressively. Proposals are the heads' top-1 chain plus, for trees, their next-best
tokens at each depth as side leaves (one-hot candidates, so every temperature stays exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..heads.file import Heads
from ..runners.base import Runner
from .base import Candidates, Draft, Drafter


class HeadsDrafter(Drafter):
    costly = False  # a few small matmuls per proposal: cheap next to a target pass
    needs_hidden = True

    def __init__(self, heads: Heads, target: Runner, name: str | None = None) -> None:
        self.heads = heads
        self.target = target
        self.name = name or f"{heads.kind} heads"
        self.n_params = heads.n_params
        self._h: torch.Tensor | None = None
        self._root_len = -1  # context length at the tree root, for expand()
        self._features: dict[tuple[int, ...], torch.Tensor] = {}  # EAGLE features along tree paths


    def begin(self, prompt, params, rng, noise=None, processor=None) -> None:
        self.target.keep_hidden = True
        self._h = None

    def accepted(self, row: int) -> None:
        self._h = torch.from_numpy(np.array(self.target.hidden_states()[row], dtype=np.float32))
        self._root_len = -1
        self._features.clear()

    @torch.inference_mode()
    def expand(self, context: Sequence[int], width: int) -> Candidates:
        """Candidates for a tree node; the first call after a target pass names the root (EAGLE-2 growth).

        Medusa: head d's top tokens at depth d, whatever the path. EAGLE: the layer stepped along the path.
        """
        if self._h is None:
            return Candidates([], np.zeros(0), self.name)
        if self._root_len < 0:
            self._root_len = len(context)
        path = tuple(context[self._root_len :])
        if self.heads.kind == "medusa":
            if len(path) >= self.heads.module.n_heads:
                return Candidates([], np.zeros(0), self.name)
            logits = self.heads.module.proj[len(path)](self.heads.module.blocks[len(path)](self._h[None, :]))[0]
        else:
            logits = self.heads.module.logits(self._eagle_feature(context[self._root_len - 1 :]))[0]
        probs = torch.softmax(logits, -1)
        top = torch.topk(probs, min(width, len(probs)))
        return Candidates(self.heads.vocab.ids[top.indices.numpy()].tolist(), top.values.numpy().astype(np.float64), self.name)

    def _eagle_feature(self, tokens: Sequence[int]) -> torch.Tensor:
        """The layer's feature after the root token and the path `tokens[1:]`, cached per path."""
        key = tuple(tokens)
        if key not in self._features:
            parent = self._h[None, :] if len(key) == 1 else self._eagle_feature(key[:-1])
            reduced = int(self.heads.vocab.to_reduced[key[-1]])
            token = torch.tensor([reduced if reduced >= 0 else len(self.heads.vocab)])
            self._features[key] = self.heads.module.step(parent, token)
        return self._features[key]

    def propose(self, context: Sequence[int], k: int) -> Draft:
        ranked = self.ranked(context[-1], k, 1)
        return Draft([int(r[0]) for r in ranked], None, self.name)

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        ranked = self.ranked(context[-1], k, width)
        chain = [int(r[0]) for r in ranked]
        if not chain:
            return []
        sides = [chain[:depth] + [int(alt)] for depth, r in enumerate(ranked) for alt in r[1:]]
        return [chain] + sides

    @torch.inference_mode()
    def ranked(self, root: int, k: int, width: int) -> list[np.ndarray]:
        """Full token ids of the `width` best candidates at each of up to k depths after `root`."""
        if k <= 0 or self._h is None:
            return []
        h = self._h[None, :]
        if self.heads.kind == "medusa":
            logits = self.heads.module(h, k)[0]  # (depths, V')
            return [self._top(row, width) for row in logits]
        layer, vocab = self.heads.module, self.heads.vocab
        reduced = int(vocab.to_reduced[root])
        token = torch.tensor([reduced if reduced >= 0 else len(vocab)])
        out = []
        for _ in range(k):
            h = layer.step(h, token)
            best = self._top(layer.logits(h)[0], width)
            out.append(best)
            token = torch.tensor([int(vocab.to_reduced[best[0]])])
        return out

    def _top(self, logits: torch.Tensor, width: int) -> np.ndarray:
        if width == 1:
            return self.heads.vocab.ids[[int(torch.argmax(logits))]]
        return self.heads.vocab.ids[torch.topk(logits, width).indices.numpy()]
