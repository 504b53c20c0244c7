"""An EAGLE-style feature-level drafter: one layer predicts the target's next hidden state.

Input: the target's hidden state at t (after its output norm) and the embedding of token t+1;
output: the hidden state at t+1, which the target's own LM head (restricted to the draft
vocabulary, frozen) turns into token t+2. Drafting runs it autoregressively on its own outputs.

Simplification against EAGLE: the layer is a feed-forward block without attention over earlier
positions; the target's hidden state already summarises the context, and this keeps a drafting
step to three small matmuls with no drafter KV cache.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .vocab import IGNORE


class EagleLayer(nn.Module):
    kind = "eagle"

    def __init__(self, hidden: int, vocab_size: int) -> None:
        super().__init__()
        self.hidden, self.vocab_size = hidden, vocab_size
        self.embed = nn.Embedding(vocab_size + 1, hidden)  # the last row stands for every token outside the vocab
        self.fc = nn.Linear(2 * hidden, hidden)
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.up = nn.Linear(hidden, hidden)
        self.down = nn.Linear(hidden, hidden)
        self.out_norm = nn.RMSNorm(hidden, eps=1e-6)  # the target's hidden states are normalised too
        self.register_buffer("lm_head", torch.zeros(vocab_size, hidden))  # target LM head rows, frozen

    def config(self) -> dict:
        return {"hidden": self.hidden, "vocab_size": self.vocab_size}

    def init_from_target(self, lm_rows: torch.Tensor, embed_rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.lm_head.copy_(lm_rows)
            self.embed.weight[: self.vocab_size].copy_(embed_rows)
            self.embed.weight[self.vocab_size].copy_(embed_rows.mean(0))

    def step(self, h: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """h (B, hidden), token (B,) reduced ids (vocab_size = outside) -> next hidden state (B, hidden)."""
        x = self.fc(torch.cat([h, self.embed(token)], dim=-1))
        x = x + self.down(F.silu(self.up(self.norm(x))))
        return self.out_norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.lm_head.T

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrolled over S steps, each fed the previous predicted feature (training-time test, EAGLE-3).

        Per step: cross-entropy against the target's token plus smooth-L1 against its hidden state.
        Returns (loss, per-step top-1 accuracy).
        """
        h = batch["hidden"]  # (B, hidden): the target's state at t
        tokens, labels, targets = batch["tokens"], batch["labels"], batch["targets"]  # (B,S) (B,S) (B,S,hidden)
        valid = batch["valid"]  # (B, S) float: the step exists within the sequence
        losses, accuracy = [], []
        for s in range(tokens.shape[1]):
            h = self.step(h, tokens[:, s])
            logits = self.logits(h)
            mask = (labels[:, s] != IGNORE).float()
            ce = (F.cross_entropy(logits, labels[:, s], ignore_index=IGNORE, reduction="none") * mask).sum()
            ce = ce / mask.sum().clamp_min(1.0)
            reg = (F.smooth_l1_loss(h, targets[:, s], reduction="none").mean(-1) * valid[:, s]).sum()
            reg = reg / valid[:, s].sum().clamp_min(1.0)
            losses.append(ce + reg)
            accuracy.append(((logits.argmax(-1) == labels[:, s]).float() * mask).sum() / mask.sum().clamp_min(1.0))
        return torch.stack(losses).mean(), torch.stack(accuracy).detach()
