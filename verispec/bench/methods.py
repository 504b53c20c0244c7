"""Method names on the bench command line -> SpeculativeConfig.

ar = plain decoding; ngram, draft (the --draft model) and auto (`--draft auto`) draft with
adaptive K; a `-kN` suffix fixes K = N, e.g. ngram-k4, draft-k3; a `-wN` suffix verifies a token
tree with N candidates per depth instead of a chain, e.g. draft-k3-w2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..engine import SpeculativeConfig
from ..errors import InvalidParameter

_PATTERN = re.compile(r"^(ngram|draft|auto)(?:-k(\d+))?(?:-w(\d+))?$")
BASELINE = "ar"


@dataclass(frozen=True)
class Method:
    name: str
    draft: str | None  # the SpeculativeConfig.draft value; None = plain decoding
    fixed_k: int | None = None
    family: str = BASELINE  # ar | ngram | draft | auto
    tree_width: int = 1

    def config(self, draft_max: int = 12) -> SpeculativeConfig:
        return SpeculativeConfig(draft=self.draft, draft_tokens=self.fixed_k, draft_max=draft_max, tree_width=self.tree_width)


def parse_methods(text: str | list[str], draft: str) -> list[Method]:
    """Parse 'ar,ngram,draft-k3,...'; `ar` is always run (first), since speedups and mismatches need it."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    methods = [Method(BASELINE, None)]
    for name in names:
        if name == BASELINE or any(m.name == name for m in methods):
            continue
        match = _PATTERN.match(name)
        if not match:
            raise InvalidParameter(
                f"unknown bench method {name!r}: use ar, ngram, draft, auto, or one of those with -kN (e.g. ngram-k4)",
                "methods",
            )
        family, k, width = match.group(1), match.group(2), match.group(3)
        draft_name = {"ngram": "ngram", "draft": draft, "auto": "auto"}[family]
        methods.append(Method(name, draft_name, int(k) if k is not None else None, family, int(width) if width else 1))
    return methods
