"""The runner interface: tokens with explicit tree structure in, logit rows out, KV cache positions managed.

Positions are implicit in the structure: a chain starts at `n_past`; a tree node sits at
`n_past + depth(node)`. Rollback is a position change (`rollback(n)`), and after a tree pass
`keep_path` keeps exactly one root-to-node chain.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np


class Tokenizer(ABC):
    """Text <-> token ids, as the model file defines them."""

    bos_id: int | None
    eos_ids: frozenset[int]
    chat_template: str | None
    bos_text: str
    eos_text: str

    @abstractmethod
    def encode(self, text: str, add_special: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, tokens: Sequence[int]) -> str: ...

    @abstractmethod
    def vocab_strings(self) -> list[str]:
        """Each token id's text, for checking that a draft shares the target's vocabulary."""

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (what logprobs report). Default: its decoded text, where a token that holds
        part of a character reads as U+FFFD; tokenizers that know their bytes say so."""
        return self.decode([token]).encode("utf-8")


class Runner(ABC):
    """A model with a KV cache. `n_past` tokens are committed; forward() appends after them."""

    name: str
    n_ctx: int
    n_vocab: int
    tokenizer: Tokenizer
    n_past: int = 0

    @abstractmethod
    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None, all_logits: bool = True) -> np.ndarray:
        """Score `tokens` after the committed prefix; return logits rows (n, V), or (1, V) if not all_logits.

        parents=None means a chain: the tokens are committed at once (n_past grows by len(tokens)).
        With parents (index of each node's parent, -1 for the prefix), the tokens form a tree scored
        in one pass; nothing is committed until keep_path(). The returned array may be a view that
        is valid only until the next forward().
        """

    def forward_native(self, tokens: Sequence[int], parents: Sequence[int] | None = None,
                       all_logits: bool = True):
        """forward() without the copy to the host: the logits as the runner keeps them. A runner with
        `logits_on_device = True` returns a torch tensor on its device, and verify/backend.py verifies it there."""
        return self.forward(tokens, parents, all_logits)

    @abstractmethod
    def rollback(self, n_past: int) -> None:
        """Drop every cached position >= n_past."""

    @abstractmethod
    def keep_path(self, path: Sequence[int]) -> None:
        """After a tree forward: commit nodes `path` (a root-to-node chain, in order) and drop the rest."""

    @property
    def cost_curve(self) -> str:
        """The name of this runner's prior T(n)/T(1) curve in cost_model.PRIOR_VERIFY_RATIO."""
        return "one-pass"

    def reset(self) -> None:
        self.rollback(0)

    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in this runner's cache (what a KV pool is sized by)."""
        raise NotImplementedError(f"{type(self).__name__} does not say its KV cost")

    def hidden_states(self) -> np.ndarray:
        """Last-layer hidden states of the previous forward's tokens, when the runner can give them."""
        raise NotImplementedError(f"{type(self).__name__} does not expose hidden states")

    def close(self) -> None:
        """Free native memory; the runner is unusable afterwards."""

    def check_fits(self, n_new: int) -> None:
        from ..errors import PromptError

        if self.n_past + n_new > self.n_ctx:
            raise PromptError(
                f"{self.n_past + n_new} tokens do not fit the context of {self.n_ctx} tokens"
                f" ({self.n_past} already in the cache, {n_new} new)",
                "prompt",
            )
