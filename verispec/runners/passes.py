"""The passes a request's steps hand to whoever drives them (Engine.generate, or the server's stepper): a target
pass (`Forward`) and a draft model's pass (`DraftPass`). The engine and the drafters yield them, the pools run them:
they sit here, below all of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Runner


@dataclass
class Forward:
    """A target pass a request's steps need: whoever drives them runs it and sends back its rows' logits.

    Engine.generate runs it at once on the engine's own target; the server's scheduler gathers the
    passes of all its requests and runs them fused (serve/scheduler.py). Either way the steps are
    the same code."""

    tokens: list[int]
    parents: list[int] | None = None  # a token tree's parent per node (None: a chain)
    all_logits: bool = True  # False: a prompt prefill, only the last row's logits


@dataclass
class DraftPass:
    """A pass a draft model needs while it drafts (`Drafter.propose_steps`): whoever drives the steps runs it on
    `runner` and sends back the logits of its last row. Engine.generate runs it at once; the server's stepper
    runs the passes of all drafting requests together, one decode per round (verispec/stepper.py)."""

    runner: Runner
    tokens: list[int]

    def run(self) -> np.ndarray:
        return self.runner.forward(self.tokens, all_logits=False)[-1]
