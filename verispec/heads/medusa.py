"""Medusa-1 heads: the target stays frozen; head k maps the last hidden state h_t to token t+2+k.

(The target's own LM head on h_t gives token t+1, the bonus token the engine already picks.)
Each head is one residual SiLU block, initialised to the identity, and a projection onto the
draft vocabulary, initialised from the target's LM head rows, as in the Medusa paper.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .vocab import IGNORE


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # starts as the identity: head k begins as the LM head
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.silu(self.linear(h))


class MedusaHeads(nn.Module):
    kind = "medusa"

    def __init__(self, hidden: int, n_heads: int, vocab_size: int) -> None:
        super().__init__()
        self.hidden, self.n_heads, self.vocab_size = hidden, n_heads, vocab_size
        self.blocks = nn.ModuleList(ResBlock(hidden) for _ in range(n_heads))
        self.proj = nn.ModuleList(nn.Linear(hidden, vocab_size, bias=False) for _ in range(n_heads))

    def config(self) -> dict:
        return {"hidden": self.hidden, "n_heads": self.n_heads, "vocab_size": self.vocab_size}

    def init_from_target(self, lm_rows: torch.Tensor, embed_rows: torch.Tensor) -> None:
        with torch.no_grad():
            for proj in self.proj:
                proj.weight.copy_(lm_rows)

    def forward(self, h: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """h (B, hidden) -> logits (B, n, vocab_size) of the first n heads (all by default)."""
        n = self.n_heads if n is None else min(n, self.n_heads)
        return torch.stack([self.proj[k](self.blocks[k](h)) for k in range(n)], dim=1)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy per head against the target's own tokens, weighted 0.8^k (Medusa).

        Returns (loss, per-head top-1 accuracy over labelled rows).
        """
        logits = self(batch["hidden"])  # (B, heads, V)
        labels = batch["labels"]  # (B, heads), IGNORE where there is no label
        per_head = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        mask = (labels != IGNORE).float()
        weights = 0.8 ** torch.arange(self.n_heads, dtype=torch.float32)
        head_loss = (per_head * mask).sum(0) / mask.sum(0).clamp_min(1.0)
        loss = (head_loss * weights).sum() / weights.sum()
        correct = ((logits.argmax(-1) == labels).float() * mask).sum(0) / mask.sum(0).clamp_min(1.0)
        return loss, correct.detach()
