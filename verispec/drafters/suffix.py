"""Suffix drafting: continue the longest earlier occurrence of the context's recent tokens, in this request or
in earlier ones, weighting each continuation by how often it followed.

Two histories are searched at every step: the request's own (prompt and output so far, suffix_index.SuffixIndex)
and its key's global one (finished requests, suffix_store.SuffixStore, shared by a Model and its server). In
each, the longest match of the context's last MAX_PATTERN tokens is found, and the continuations of its
latest occurrences are merged into a trie whose node counts are empirical frequencies. The speculation keeps
the nodes whose frequency is at least `min_prob` of the match's, no deeper than `factor` x the match length
(a short match earns a short draft), the most frequent first; the history whose speculation expects more
accepted tokens (the sum of its nodes' frequencies) drafts. This is SuffixDecoding (Oliaro et al., NeurIPS
2025) on hashed n-gram tables instead of a suffix tree.

Lossless as every drafter here: a chain is a deterministic proposal (probs None: a point mass to the
rejection sampler), and tree candidates are one-hot to the tree verifier; frequencies only rank them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Candidates, Draft, Drafter
from .suffix_index import MAX_PATTERN, SuffixIndex, Trie, continuation_trie
from .suffix_store import SuffixStore

TREE_DEPTH = 24  # deepest node a grown tree asks for
TREE_NODES = 64  # nodes kept for a grown tree's expansions


@dataclass
class Speculation:
    trie: Trie
    kept: np.ndarray  # bool per node (the root included)
    score: float  # expected accepted tokens if the frequencies held: the sum of the kept nodes' frequencies

    def children(self, node: int) -> np.ndarray:
        """Kept children of a node, the most frequent first (ties: the smaller token)."""
        kids = np.nonzero(self.kept & (self.trie.parents == node))[0]
        return kids[np.lexsort((self.trie.tokens[kids], -self.trie.counts[kids]))]

    @property
    def chain_score(self) -> float:
        """The chain's expected accepted tokens if the frequencies held."""
        node, score = 0, 0.0
        while len(kids := self.children(node)):
            node = int(kids[0])
            score += self.trie.counts[node] / self.trie.counts[0]
        return score

    def chain(self) -> list[int]:
        node, tokens = 0, []
        while len(kids := self.children(node)):
            node = int(kids[0])
            tokens.append(int(self.trie.tokens[node]))
        return tokens

    def branches(self, width: int) -> list[list[int]]:
        """Root-to-leaf paths of the kept nodes, the main chain first, then by frequency."""
        leaves = [n for n in np.nonzero(self.kept)[0][1:] if not len(self.children(int(n)))]
        leaves.sort(key=lambda n: (-self.trie.counts[n], -self.trie.depths[n]))
        paths = []
        for leaf in leaves[:width]:
            path, node = [], int(leaf)
            while node > 0:
                path.append(int(self.trie.tokens[node]))
                node = int(self.trie.parents[node])
            paths.append(path[::-1])
        main = self.chain()
        return [main] + [p for p in paths if p != main][: width - 1] if main else []

    def node_at(self, path: Sequence[int]) -> int | None:
        node = 0
        for token in path:
            kids = self.children(node)
            hit = kids[self.trie.tokens[kids] == token]
            if not len(hit):
                return None
            node = int(hit[0])
        return node


def speculate(rows: np.ndarray, match_length: int, factor: float, min_prob: float, depth: int, nodes: int) -> Speculation:
    """The kept part of the continuations' trie: frequency >= min_prob, depth <= factor x the match length,
    the `nodes` most frequent (shallower first on ties, so that every kept node's parent is kept)."""
    depth = max(1, min(depth, math.ceil(factor * match_length)))
    trie = continuation_trie(rows[:, :depth])
    frequency = trie.counts / trie.counts[0]
    order = np.lexsort((trie.depths, -trie.counts))  # the root first
    kept = np.zeros(len(trie.tokens), dtype=bool)
    eligible = order[frequency[order] >= min_prob][: nodes + 1]
    kept[eligible] = True
    return Speculation(trie, kept, float(frequency[kept].sum() - 1.0))


class SuffixDrafter(Drafter):
    name = "suffix"

    def __init__(self, store: SuffixStore, history: str = "", factor: float = 1.0, min_prob: float = 0.1,
                 index_prompts: bool = False) -> None:
        self.store = store
        self.history = history  # the key of the global history read and written (the server's: the API key's)
        self.factor, self.min_prob, self.index_prompts = factor, min_prob, index_prompts
        self._reset(0)

    def _reset(self, prompt_len: int) -> None:
        self._local = SuffixIndex()
        self._context: list[int] = []
        self._prompt_len = prompt_len
        self._tree: tuple[list[int], Speculation] | None = None  # the last grown tree's root context and speculation

    def begin(self, prompt, params, rng, noise=None, processor=None) -> None:
        self._reset(len(prompt))

    def finish(self, context: Sequence[int]) -> None:
        tokens = list(context) if self.index_prompts else list(context[self._prompt_len :])
        self.store.add(self.history, tokens)
        self._reset(0)

    def _sync(self, context: Sequence[int]) -> None:
        """Index `context`: cut what lies past the shared prefix with the last context, add the rest."""
        old, common = self._context, 0
        limit = min(len(old), len(context))
        if limit and old[limit - 1] == context[limit - 1] and old[:limit] == list(context[:limit]):
            common = limit
        else:
            while common < limit and old[common] == context[common]:
                common += 1
        self._local.truncate(common)
        self._local.extend(context[common:])
        self._context = list(context)

    def _speculate(self, context: Sequence[int], depth: int, nodes: int, chain: bool = False) -> Speculation | None:
        self._sync(context)
        pattern = np.asarray(context[-MAX_PATTERN:], dtype=np.int32)
        found = []
        local = self._local.match(pattern)
        if local is not None:
            found.append((local.length, self._local.continuations(local.ends, depth)))
        shared = self.store.lookup(self.history, pattern, depth)
        if shared is not None:
            found.append((shared[0].length, shared[1]))
        options = [speculate(rows, length, self.factor, self.min_prob, depth, nodes) for length, rows in found]
        return max(options, key=lambda s: s.chain_score if chain else s.score, default=None)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        speculation = self._speculate(context, k, TREE_NODES, chain=True) if k > 0 else None
        return Draft(speculation.chain()[:k] if speculation else [], None, self.name)

    def propose_branches(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        """The speculation tree's paths (one when the tree is a chain)."""
        speculation = self._speculate(context, k, k * width) if k > 0 else None
        return speculation.branches(width) if speculation else []

    def expand(self, context: Sequence[int], width: int) -> Candidates:
        """A grown tree's node: its children in the speculation made at the tree's root, with their conditional
        frequencies; a context outside it (another drafter's node, in a cascade) gets a speculation of its own."""
        node, speculation = self._tree_node(context)
        if node is None:
            speculation = self._speculate(context, TREE_DEPTH, TREE_NODES)
            self._tree = (list(context), speculation) if speculation else None
            node = 0
        if speculation is None:
            return Candidates([], np.empty(0), self.name)
        kids = speculation.children(node)[:width]
        counts = speculation.trie.counts
        return Candidates([int(t) for t in speculation.trie.tokens[kids]], counts[kids] / counts[node], self.name)

    def _tree_node(self, context: Sequence[int]) -> tuple[int | None, Speculation | None]:
        if self._tree is None:
            return None, None
        root, speculation = self._tree
        n = len(root)
        tail = max(0, n - MAX_PATTERN)
        if len(context) < n or list(context[tail:n]) != root[tail:] or len(context) == n and list(context) != root:
            return None, None
        return speculation.node_at(context[n:]), speculation
