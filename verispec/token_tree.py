"""A token tree (its tokens and parent indices, merged from candidate continuations) and its shape: each node's
depth, and which nodes each node may attend to.

Pure structure with no dependencies: runners turn it into positions and attention masks, the verifiers and the
engine walk it, so it sits below all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenTree:
    tokens: list[int]
    parents: list[int]  # parents[0] == -1 (the root); others point to an earlier node
    sources: list[str] = field(default_factory=list)  # which drafter proposed each node

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                kids[parent].append(node)
        return kids

    def __len__(self) -> int:
        return len(self.tokens)

    def paths(self) -> list[list[int]]:
        """The drafted tokens each node's row follows: the path from the root's child down to the node itself
        (the root's row follows nothing drafted)."""
        paths: list[list[int]] = []
        for node, parent in enumerate(self.parents):
            paths.append([] if parent < 0 else paths[parent] + [self.tokens[node]])
        return paths

    def first(self, n: int) -> TokenTree:
        """The tree of its first n nodes (parents precede children, so they form one)."""
        return TokenTree(self.tokens[:n], self.parents[:n], self.sources[:n])


def build_tree(root: int, branches: Sequence[Sequence[int]], sources: Sequence[str] | None = None) -> TokenTree:
    """Merge candidate continuations into a trie under `root`; the first branch becomes nodes 1..n.

    Keeping the first (most likely) branch first lets runners keep an accepted main branch in
    place without re-decoding it.
    """
    tree = TokenTree([root], [-1], ["target"])
    index: dict[tuple[int, int], int] = {}
    for b, branch in enumerate(branches):
        node = 0
        for token in branch:
            key = (node, int(token))
            if key not in index:
                index[key] = len(tree.tokens)
                tree.tokens.append(int(token))
                tree.parents.append(node)
                tree.sources.append(sources[b] if sources else "draft")
            node = index[key]
    return tree


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
