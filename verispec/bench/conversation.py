"""Run one benchmark prompt as a conversation: each user turn through the chat template, later turns
seeing the method's own earlier answers. The same loop serves verispec's methods and the peers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine import SpeculativeConfig, Stats
from ..sampling import SamplingParams
from ..prompts import BenchPrompt


@dataclass
class Turn:
    tokens: list[int]
    wall_seconds: float
    stats: Stats | None = None  # verispec methods only
    margins: list[float] = field(default_factory=list)  # top-2 logit margin per emitted token (and a final EOS)
    extra: dict = field(default_factory=dict)  # what a peer reports about itself


@dataclass
class Conversation:
    prompt: BenchPrompt
    method: str
    turns: list[Turn]

    @property
    def tokens(self) -> list[list[int]]:
        return [t.tokens for t in self.turns]

    @property
    def margins(self) -> list[list[float]]:
        return [t.margins for t in self.turns]


# A turn generator gets the rendered prompt (text, token ids) and returns the turn's output.
TurnFn = Callable[[str, list[int]], Turn]


def converse(model, prompt: BenchPrompt, method: str, generate: TurnFn, max_turns: int | None = None) -> Conversation:
    """`model` (a verispec Model) renders messages with its chat template and decodes the answers."""
    from ..models.chat import render_chat

    tok = model.tokenizer
    messages: list[dict] = []
    turns = []
    for text in prompt.turns[:max_turns]:
        messages.append({"role": "user", "content": text})
        rendered = render_chat(tok.chat_template, messages, tok.bos_text, tok.eos_text)
        turn = generate(rendered, model.prompt_tokens(messages=messages))
        turns.append(turn)
        messages.append({"role": "assistant", "content": tok.decode(turn.tokens)})
    return Conversation(prompt, method, turns)


def engine_turn(model, spec: SpeculativeConfig, params: SamplingParams) -> TurnFn:
    """A turn through verispec's engine. The engine's own iterator is used, not Model.generate,
    so that every emitted token is kept (text chunks may hold tokens back)."""

    def generate(_text: str, tokens: list[int]) -> Turn:
        stats = Stats()
        engine = model.engine(spec)
        t0 = time.perf_counter()
        out = [t for step in engine.generate(tokens, params, stats, record_margins=True) for t in step]
        return Turn(out, time.perf_counter() - t0, stats, list(stats.margins))

    return generate
