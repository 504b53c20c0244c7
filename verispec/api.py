"""The Python API: `load()` a target (and optionally a drafter), then `generate()` or `stream()` text."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .drafters.suffix_store import DEFAULT_MEMORY_MIB
from .engine import Engine, SpeculativeConfig, Stats
from .loaded import LoadedModel
from .models import registry
from .sampling import SamplingParams
from .text import TextAssembler


@dataclass
class Completion:
    text: str
    tokens: list[int]
    stats: Stats
    finish_reason: str = "length"
    draft: str = "none"


@dataclass
class StreamChunk:
    text: str
    tokens: list[int]


@dataclass
class Model(LoadedModel):
    """A loaded target with its drafters, and the engines that decode on it. Not thread-safe: one request at a
    time per Model."""

    _engines: dict[str, Engine] = field(default_factory=dict)

    def engine(self, spec: SpeculativeConfig | None = None) -> Engine:
        spec = spec or self.spec
        drafter = self.drafter(spec.draft)
        # Hidden states cost a side pass per prompt on llama.cpp: keep them only for drafters that read them.
        self.target.keep_hidden = bool(getattr(drafter, "needs_hidden", False))
        # One engine per distinct config, kept: what an engine measures (tree budgets) outlives a request.
        key = repr(spec)
        if key not in self._engines:
            self._engines[key] = Engine(self.target, drafter, spec)
        return self._engines[key]

    def stream(self, prompt: str | None = None, params: SamplingParams | None = None, *, messages: list[dict] | None = None,
               chat: bool = False, spec: SpeculativeConfig | None = None, stats: Stats | None = None,
               record_margins: bool = False, prompt_tokens: list[int] | None = None) -> Iterator[StreamChunk]:
        """Yield text as it is decoded. Stop strings end the stream; `stats` is filled in place."""
        params = params or SamplingParams()
        stats = stats if stats is not None else Stats()
        tokens = prompt_tokens if prompt_tokens is not None else self.prompt_tokens(prompt, messages, chat)
        decoder = TextAssembler(self.tokenizer, params.stop)
        for new in self.engine(spec).generate(tokens, params, stats, record_margins):
            text = decoder.add(new)
            # Chunks carry their tokens even when their text is held back (partial UTF-8, stop prefix).
            yield StreamChunk(text, new)
            if decoder.stopped:
                stats.finish_reason = "stop"
                return
        tail = decoder.flush()
        if tail:
            yield StreamChunk(tail, [])

    def generate(self, prompt: str | None = None, params: SamplingParams | None = None, **kwargs) -> Completion:
        stats = kwargs.pop("stats", None) or Stats()
        spec = kwargs.get("spec") or self.spec
        chunks = list(self.stream(prompt, params, stats=stats, **kwargs))
        tokens = [t for c in chunks for t in c.tokens]
        return Completion("".join(c.text for c in chunks), tokens, stats, stats.finish_reason, spec.draft or "none")


def load(model: str = registry.DEFAULT_TARGET, *, draft: str | None = None, backend: str = "auto",
         spec: SpeculativeConfig | None = None, pull: bool = False, suffix_cache: str | None = None,
         suffix_memory_mib: float = DEFAULT_MEMORY_MIB, **runner_options) -> Model:
    """Open a target by registered name, GGUF path or HF directory; `draft` sets the default drafter.
    `suffix_cache` keeps the suffix drafter's history of earlier requests in a file across restarts."""
    return Model.open(model, draft=draft, backend=backend, spec=spec, pull=pull, suffix_cache=suffix_cache,
                      suffix_memory_mib=suffix_memory_mib, **runner_options)
