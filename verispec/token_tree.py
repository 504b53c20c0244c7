"""The shape of a token tree, as parent indices: each node's depth, and which nodes each node may attend to.

Pure structure with no dependencies: runners turn it into positions and attention masks, the verifiers and the
engine walk it, so it sits below all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def tree_depths(parents: Sequence[int]) -> np.ndarray:
    """Depth of each node (0 for children of the committed prefix). Parents must precede children."""
    depths = np.zeros(len(parents), dtype=np.int64)
    for i, parent in enumerate(parents):
        if parent >= i:
            raise ValueError(f"tree node {i} has parent {parent}: parents must come before their children")
        depths[i] = 0 if parent < 0 else depths[parent] + 1
    return depths


def ancestor_mask(parents: Sequence[int]) -> np.ndarray:
    """mask[i, j] is True when node j is node i or one of its ancestors (what node i may attend to)."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask
