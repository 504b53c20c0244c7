"""Grow a token tree from a drafter's next-token candidates: fixed shapes and dynamic trees.

`static:4,2,2,1`: every node at depth d gets the drafter's top b[d] candidates, the way Medusa's
"choices" fix a tree. `dynamic`: as in EAGLE-2, each node is scored by its cumulative draft
probability (the product along its path); the most probable node not yet expanded is expanded
next, until `expansions` drafter calls are spent, and the `budget` most probable nodes form the
tree. A child's cumulative probability never exceeds its parent's, so the chosen nodes always
include their ancestors.

Each expansion of a model drafter is one draft pass, so on a CPU `expansions` is what the tree
costs to draft; the n-gram drafter expands for free. The growth is a coroutine (`grow_tree_steps`) that
yields those passes, so that a server runs the expansions of all its requests' trees together.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidParameter
from ..runners.passes import DraftPass
from ..token_tree import TokenTree
from .base import Drafter, run_passes


@dataclass(frozen=True)
class TreeShape:
    kind: str  # "static" | "dynamic"
    branching: tuple[int, ...] = ()  # static: children per node at each depth
    width: int = 4  # dynamic: candidates taken from each expansion

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """'dynamic' or 'static:4,2,2,1'."""
        if text == "dynamic":
            return cls("dynamic")
        if text.startswith("static:"):
            try:
                branching = tuple(int(b) for b in text[len("static:") :].split(","))
            except ValueError:
                branching = ()
            if branching and all(1 <= b <= 16 for b in branching) and len(branching) <= 16:
                return cls("static", branching)
        raise InvalidParameter(f"tree must be 'dynamic' or 'static:B1,B2,...' with each B in 1..16, got {text!r}", "tree")

    def full_size(self) -> int:
        """Nodes in the complete static tree (root excluded)."""
        size, width = 0, 1
        for b in self.branching:
            width *= b
            size += width
        return size


class _Growth:
    """Nodes under construction. Node 0 is the root: the context's last token."""

    def __init__(self, context: Sequence[int]) -> None:
        self.context = list(context)
        self.tokens = [self.context[-1]]
        self.parents = [-1]
        self.logp = [0.0]
        self.depth = [0]
        self.sources = ["target"]

    def path_context(self, node: int) -> list[int]:
        path = []
        while node > 0:
            path.append(self.tokens[node])
            node = self.parents[node]
        return self.context + path[::-1]

    def add_children(self, drafter: Drafter, node: int, width: int, room: int) -> Generator[DraftPass, np.ndarray, list[int]]:
        candidates = yield from drafter.expand_steps(self.path_context(node), width)
        added = []
        for token, prob in list(zip(candidates.tokens, candidates.probs))[: max(room, 0)]:
            self.tokens.append(int(token))
            self.parents.append(node)
            self.logp.append(self.logp[node] + math.log(max(float(prob), 1e-30)))
            self.depth.append(self.depth[node] + 1)
            self.sources.append(candidates.source)
            added.append(len(self.tokens) - 1)
        return added

    def tree(self, chosen: Sequence[int]) -> TokenTree:
        """A TokenTree of the chosen nodes: the most probable chain first, then the rest by depth."""
        chosen_set = set(chosen)
        kids: dict[int, list[int]] = {}
        for node in sorted(chosen_set):
            kids.setdefault(self.parents[node], []).append(node)
        main, node = [], 0
        while kids.get(node):
            node = max(kids[node], key=lambda c: (self.logp[c], -c))
            main.append(node)
        rest = sorted(chosen_set - set(main), key=lambda n: (self.depth[n], -self.logp[n], n))
        order = [0] + main + rest
        index = {node: i for i, node in enumerate(order)}
        return TokenTree(
            [self.tokens[n] for n in order],
            [-1] + [index[self.parents[n]] for n in order[1:]],
            [self.sources[n] for n in order],
        )


def grow_tree(drafter: Drafter, context: Sequence[int], shape: TreeShape, budget: int, expansions: int,
              max_depth: int = 12) -> TokenTree:
    """Grow a tree of at most `budget` drafted nodes under the context's last token."""
    return run_passes(grow_tree_steps(drafter, context, shape, budget, expansions, max_depth))


def grow_tree_steps(drafter: Drafter, context: Sequence[int], shape: TreeShape, budget: int, expansions: int,
                    max_depth: int = 12) -> Generator[DraftPass, np.ndarray, TokenTree]:
    """grow_tree() as a coroutine that yields the drafter's model passes (Drafter.expand_steps), one per
    expansion: a server runs those of all its requests' trees together, one draft decode per round."""
    growth = _Growth(context)
    if shape.kind == "static":
        return (yield from _grow_static(drafter, growth, shape.branching[:max_depth], budget))
    return (yield from _grow_dynamic(drafter, growth, shape.width, budget, expansions, max_depth))


def _grow_static(drafter: Drafter, growth: _Growth, branching: Sequence[int],
                 budget: int) -> Generator[DraftPass, np.ndarray, TokenTree]:
    frontier = [0]
    for width in branching:
        next_frontier: list[int] = []
        for node in frontier:
            room = budget - (len(growth.tokens) - 1)
            if room <= 0:
                break
            next_frontier += yield from growth.add_children(drafter, node, width, room)
        frontier = next_frontier
    return growth.tree(range(1, len(growth.tokens)))


def _grow_dynamic(drafter: Drafter, growth: _Growth, width: int, budget: int, expansions: int,
                  max_depth: int) -> Generator[DraftPass, np.ndarray, TokenTree]:
    heap = [(0.0, 0)]  # (-cumulative log probability, node) of nodes not yet expanded
    for _ in range(expansions):
        if not heap:
            break
        neg_logp, node = heapq.heappop(heap)
        if len(growth.tokens) - 1 >= budget and -neg_logp <= _kth_best(growth.logp, budget):
            break  # no child of this node could make the chosen `budget` nodes any more
        for child in (yield from growth.add_children(drafter, node, width, room=width)):
            if growth.depth[child] < max_depth:
                heapq.heappush(heap, (-growth.logp[child], child))
    drafted = range(1, len(growth.tokens))
    chosen = sorted(drafted, key=lambda n: (-growth.logp[n], n))[:budget]
    return growth.tree(chosen)


def _kth_best(logp: Sequence[float], k: int) -> float:
    return heapq.nlargest(k, logp[1:])[-1]
