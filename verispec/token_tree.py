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


def leaf_sequences(parents: Sequence[int]) -> list[list[int]]:
    """Sequence ids per node for a runner that attends by sequence (llama.cpp): leaf k gets id k + 1, and every
    node carries the ids of the leaves below it, so a node's first id sees exactly its ancestors and itself."""
    n = len(parents)
    has_child = [False] * n
    for p in parents:
        if p >= 0:
            has_child[p] = True
    seqs: list[list[int]] = [[] for _ in range(n)]
    next_id = 1
    for i in range(n):
        if not has_child[i]:
            seqs[i].append(next_id)
            next_id += 1
    for i in range(n - 1, -1, -1):
        if parents[i] >= 0:
            seqs[parents[i]].extend(seqs[i])
    return seqs


def nodes_within_leaves(parents: Sequence[int], max_leaves: int) -> int:
    """The most leading nodes that form a tree of at most `max_leaves` leaves (at least the root).

    Parents precede children, so every leading run of nodes is a tree; a runner that gives each leaf a
    sequence id of its own holds only so many (trees put their most likely chain first, which stays)."""
    leaves, is_leaf = 0, [False] * len(parents)
    for i, parent in enumerate(parents):
        if parent >= 0 and is_leaf[parent]:
            is_leaf[parent] = False
            leaves -= 1
        is_leaf[i] = True
        leaves += 1
        if leaves > max_leaves:
            return max(i, 1)
    return len(parents)
