"""Drafting heads trained on the target itself: Medusa heads and an EAGLE-style feature drafter.

Both read the target's last hidden state (after its output norm, so `logits = hidden @ lm_head.T`)
and score only a reduced draft vocabulary of the K most frequent tokens (`vocab.py`). Training
data is the target's own greedy output (`data.py`); `train.py` fits the heads with checkpoints;
`file.py` saves and loads them; `verispec/drafters/heads.py` drafts with them.
"""

from .file import Heads, load_heads, save_heads

__all__ = ["Heads", "load_heads", "save_heads"]
