"""Token trees: their structure, and which root-to-node path the target accepts.

Node 0 is the last accepted token (the root, already sampled); every other node is a drafted
candidate whose parent precedes it. Siblings are deterministic candidates (top-k of a draft
model, or distinct n-gram continuations), so each is a one-hot proposal.

Greedy: follow the child equal to the target's argmax while one exists.
Sampling: at a node with target distribution p, try its children in order; accept child x with
probability p'(x), where p' starts as p and, after each rejected child, loses that child's mass
and is renormalised. If every child is rejected, draw from the final p'. This is sampling from p
by sequential elimination, so the accepted token is distributed exactly as p (SpecInfer's
multi-candidate rejection sampling with one-hot drafts).

Seeded sampling (sampling.PositionNoise): follow the child equal to the argmax of p / E, with the
noise of the node's token position.

Relaxed acceptance (opt-in, LOSSY): a child is also accepted when the target gives it at least
`relaxed` times the probability of the target's own top token. Output then departs from the
target's; the bench measures by how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..token_tree import tree_depths
from ..sampling import PositionNoise, SamplingParams, logits_to_probs, sample


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


@dataclass
class TreeVerdict:
    path: list[int]  # accepted nodes, starting with the root
    next_token: int


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


class TreeVerifier:
    def __init__(self, n_vocab: int, params: SamplingParams, rng: np.random.Generator,
                 relaxed: float | None = None, noise: PositionNoise | None = None) -> None:
        self.params = params
        self.rng = rng
        self.noise = noise
        self.relaxed = relaxed
        self._p = np.empty(n_vocab, dtype=np.float64)
        self._scratch = np.empty(n_vocab, dtype=np.float64)  # top-k work space, then the CDF

    def verify(self, tree: TokenTree, target_logits: np.ndarray, position: int = 0) -> TreeVerdict:
        """`position`: the token position the root's row predicts (used by seeded requests only)."""
        kids = tree.children()
        depths = tree_depths(tree.parents) if self.noise is not None else None
        path = [0]
        while True:
            node = path[-1]
            row = target_logits[node]
            if self.params.greedy:
                choice = int(np.argmax(row))
                nxt = next((c for c in kids[node] if tree.tokens[c] == choice), None)
                if nxt is None and self.relaxed:
                    nxt = self._relaxed_child(row, kids[node], tree.tokens, float(row[choice]) + np.log(self.relaxed))
                if nxt is None:
                    return TreeVerdict(path, choice)
                path.append(nxt)
                continue
            p = logits_to_probs(row, self.params, out=self._p[None, :], scratch=self._scratch)
            accepted = None
            if self.relaxed:
                accepted = self._relaxed_child(p, kids[node], tree.tokens, float(p.max()) * self.relaxed)
            if accepted is None and self.noise is not None:
                choice = self.noise.choose(p, position + int(depths[node]))
                accepted = next((c for c in kids[node] if tree.tokens[c] == choice), None)
                if accepted is None:
                    return TreeVerdict(path, choice)
            if accepted is None:
                accepted = self._accept_child(p, kids[node], tree.tokens)
            if accepted is None:
                return TreeVerdict(path, sample(p, self.rng, self._scratch))
            path.append(accepted)

    @staticmethod
    def _relaxed_child(scores: np.ndarray, children: list[int], tokens: list[int], floor: float) -> int | None:
        """The child the target scores highest, if its score reaches `floor` (lossy acceptance)."""
        best = max(children, key=lambda c: scores[tokens[c]], default=None)
        return best if best is not None and scores[tokens[best]] >= floor else None

    def _accept_child(self, p: np.ndarray, children: list[int], tokens: list[int]) -> int | None:
        """Sequential elimination over one-hot candidates; `p` becomes the residual in place."""
        for child in children:
            x = tokens[child]
            if p[x] <= 0.0:
                continue
            if self.rng.random() < p[x]:
                return child
            p[x] = 0.0
            p /= p.sum()
        return None
