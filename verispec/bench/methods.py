"""Method names on the bench command line -> SpeculativeConfig.

ar = plain decoding; ngram, suffix (suffix lookup in the request and in the method's own earlier requests of
the run), draft (the --draft model), auto (`--draft auto`), cascade (`cascade:ngram,<draft>`) and suffix+draft
(`cascade:suffix,<draft>`) draft with adaptive K. `medusa:PATH` and `eagle:PATH` draft from heads
trained by `verispec train-heads`. Suffixes, in this order, all optional:
  -kN        fix K = N (ngram-k4, draft-k3)
  -wN        verify a tree of N candidates per depth instead of a chain (draft-k3-w2)
  -dyn       grow a dynamic tree by cumulative draft probability; -s4.2.2.1 a static tree shape
  -bN        tree budget N drafted nodes (default: measured, "no tree" included); -b0 = chain
  -prefix    several candidates side by side, longest valid prefix kept (lossless)
  -relaxedT  LOSSY relaxed acceptance with TAU = T (draft-relaxed0.5)
e.g. draft-dyn-b8, ngram-s4.2.2.1, cascade-prefix, medusa:heads.safetensors-k4-w2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..engine import SpeculativeConfig
from ..errors import InvalidParameter

_SUFFIXES = r"(?:-k(?P<k>\d+))?(?:-w(?P<w>\d+))?(?:-(?P<tree>dyn|s[\d.]+))?(?:-b(?P<b>\d+))?(?:-(?P<acc>prefix|relaxed[\d.]+))?$"
_PATTERN = re.compile(r"^(?P<family>ngram|suffix\+draft|suffix|draft|auto|cascade)" + _SUFFIXES)
_HEADS = re.compile(r"^(?P<family>medusa|eagle):(?P<path>.+?)" + _SUFFIXES)
BASELINE = "ar"


@dataclass(frozen=True)
class Method:
    name: str
    draft: str | None  # the SpeculativeConfig.draft value; None = plain decoding
    fixed_k: int | None = None
    family: str = BASELINE  # ar | ngram | suffix | draft | auto | cascade | suffix+draft | medusa | eagle
    tree_width: int = 1
    tree: str | None = None  # "dynamic" | "static:4,2,2,1"
    tree_budget: int | None = None
    acceptance: str = "exact"

    @property
    def lossy(self) -> bool:
        return self.acceptance.startswith("relaxed")

    def config(self, draft_max: int = 12) -> SpeculativeConfig:
        return SpeculativeConfig(draft=self.draft, draft_tokens=self.fixed_k, draft_max=draft_max, tree_width=self.tree_width,
                                 tree=self.tree, tree_budget=self.tree_budget, acceptance=self.acceptance)


def parse_methods(text: str | list[str], draft: str) -> list[Method]:
    """Parse 'ar,ngram,draft-k3,...'; `ar` is always run (first), since speedups and mismatches need it."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    methods = [Method(BASELINE, None)]
    for name in names:
        if name == BASELINE or any(m.name == name for m in methods):
            continue
        match = _HEADS.match(name) or _PATTERN.match(name)
        if not match:
            raise InvalidParameter(
                f"unknown bench method {name!r}: use ar, ngram, suffix, draft, auto, cascade, suffix+draft, medusa:PATH, eagle:PATH, "
                "optionally with -kN, -wN, -dyn or -sB1.B2, -bN, -prefix or -relaxedTAU (e.g. ngram-k4, draft-dyn-b8)",
                "methods",
            )
        methods.append(_method(name, match, draft))
    return methods


def _method(name: str, match: re.Match, draft: str) -> Method:
    family = match["family"]
    draft_name = {"ngram": "ngram", "suffix": "suffix", "draft": draft, "auto": "auto", "cascade": f"cascade:ngram,{draft}",
                  "suffix+draft": f"cascade:suffix,{draft}"}.get(family)
    if draft_name is None:  # medusa / eagle heads
        draft_name = f"{family}:{match['path']}"
    tree = match["tree"]
    if tree is not None:
        tree = "dynamic" if tree == "dyn" else "static:" + ",".join(tree[1:].split("."))
    acceptance = match["acc"] or "exact"
    if acceptance.startswith("relaxed"):
        acceptance = "relaxed:" + acceptance[len("relaxed"):]
    as_int = lambda g: int(match[g]) if match[g] is not None else None  # noqa: E731
    method = Method(name, draft_name, as_int("k"), family, as_int("w") or 1, tree, as_int("b"), acceptance)
    method.config()  # validate the tree shape and acceptance now, with the method's name in the error
    return method
