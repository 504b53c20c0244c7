"""A target opened with its drafters, each built on demand from a --draft name: what the Python API (api.Model)
and the server (serve/) both stand on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

from .drafters.base import Drafter
from .drafters.suffix_store import DEFAULT_MEMORY_MIB, SuffixStore, check_memory_limit, vocab_fingerprint
from .engine import SpeculativeConfig
from .errors import InvalidParameter, PromptError, TokenizerMismatch, VerispecError
from .models import files, registry
from .models.chat import chat_tokens
from .runners import Runner, open_runner


@dataclass
class LoadedModel:
    """A loaded target with its drafters, opened by name (--draft). Not thread-safe: one request at a time."""

    target: Runner
    backend: str
    spec: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    _drafters: dict[str, Drafter] = field(default_factory=dict)
    runner_options: dict = field(default_factory=dict)
    draft_choice_note: str = ""
    suffix_cache: str | None = None  # where the suffix drafter's global history is kept across restarts
    suffix_memory_mib: float = DEFAULT_MEMORY_MIB  # its memory limit
    _suffix_store: SuffixStore | None = None

    @property
    def suffix_store(self) -> SuffixStore:
        """The global history of the suffix drafter, shared by every request of this model (and its server)."""
        if self._suffix_store is None:
            fingerprint = vocab_fingerprint(self.tokenizer, self.target.n_vocab) if self.suffix_cache else ""
            self._suffix_store = SuffixStore(self.suffix_memory_mib, self.suffix_cache, fingerprint, self.target.n_vocab)
        return self._suffix_store

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def prompt_tokens(self, prompt: str | None = None, messages: list[dict] | None = None, chat: bool = False) -> list[int]:
        if messages is not None:
            return chat_tokens(self.tokenizer, messages)
        if prompt is None or not str(prompt).strip():
            raise PromptError("the prompt is empty", "prompt")
        if chat:
            return chat_tokens(self.tokenizer, [{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt, add_special=True)

    def drafter(self, name: str | None) -> Drafter | None:
        """The drafter for a --draft value: None/'none', 'ngram', 'suffix', 'auto', 'medusa:PATH', 'eagle:PATH',
        a registered name or a path."""
        if name in (None, "", "none"):
            return None
        if name not in self._drafters:
            self._drafters[name] = self._make_drafter(name)
        return self._drafters[name]

    def _make_drafter(self, name: str) -> Drafter:
        from .drafters.ngram import NgramDrafter

        if name == "ngram":
            return NgramDrafter(self.spec.ngram_min, self.spec.ngram_max)
        if name == "suffix":
            from .drafters.suffix import SuffixDrafter

            return SuffixDrafter(self.suffix_store)
        if name == "auto":
            return self._auto_drafter()
        if name.startswith(("medusa:", "eagle:")):
            return self._heads_drafter(name)
        if name.startswith("cascade:"):
            return self._cascade_drafter(name)
        from .drafters.draft_model import ModelDrafter, check_same_vocab

        source = files.resolve(name)
        runner = open_runner(source, self.backend, **self.runner_options)
        try:
            check_same_vocab(self.target, runner)
        except TokenizerMismatch:
            runner.close()
            raise
        return ModelDrafter(runner, self.spec.draft_min_prob, self.spec.draft_max)

    def _heads_drafter(self, name: str) -> Drafter:
        """Heads trained on this target by `verispec train-heads`; they read its hidden states."""
        from .drafters.heads import HeadsDrafter
        from .errors import InvalidParameter
        from .heads.file import heads_fit, load_heads

        kind, path = name.split(":", 1)
        heads = load_heads(path)
        if heads.kind != kind:
            raise InvalidParameter(f"{path} holds {heads.kind} heads, not {kind}: use --draft {heads.kind}:{path}", "draft")
        heads_fit(heads, self.target)
        return HeadsDrafter(heads, self.target, name)

    def _cascade_drafter(self, name: str) -> Drafter:
        """'cascade:ngram,qwen2.5-coder-0.5b': the levels in order, cheapest first."""
        from .drafters.cascade import CascadeDrafter

        levels = [part.strip() for part in name[len("cascade:") :].split(",") if part.strip()]
        if len(levels) < 2 or any(level.startswith("cascade:") for level in levels):
            raise InvalidParameter(f"a cascade names two or more drafters, e.g. cascade:ngram,qwen2.5-coder-0.5b; got {name!r}", "draft")
        return CascadeDrafter([self.drafter(level) for level in levels], self.target.n_vocab, self.spec.draft_max)

    def _auto_drafter(self) -> Drafter:
        """The smallest registered, downloaded model that shares the target's vocabulary, else n-gram."""
        from .drafters.ngram import NgramDrafter

        candidates = sorted(
            (s for s in registry.REGISTRY.values() if registry.status(s) in ("present", "unverified")),
            key=lambda s: s.size,
        )
        for spec in candidates:
            if str(registry.model_path(spec)) == str(getattr(self.target, "source", None) and self.target.source.path):
                continue
            if self.target.n_params and spec.parameters >= self.target.n_params:
                continue
            try:
                drafter = self.drafter(spec.name)
            except (TokenizerMismatch, VerispecError):
                continue
            self.draft_choice_note = f"draft auto: chose {spec.name} (same vocabulary as {self.target.name})"
            return drafter
        self.draft_choice_note = f"draft auto: no registered model shares {self.target.name}'s vocabulary; using ngram"
        return NgramDrafter(self.spec.ngram_min, self.spec.ngram_max)

    def close(self) -> None:
        for d in self._drafters.values():
            d.close()
        if self._suffix_store is not None:
            self._suffix_store.close()  # saves it, with a cache path
        self.target.close()

    @classmethod
    def open(cls, model: str = registry.DEFAULT_TARGET, *, draft: str | None = None, backend: str = "auto",
             spec: SpeculativeConfig | None = None, pull: bool = False, suffix_cache: str | None = None,
             suffix_memory_mib: float = DEFAULT_MEMORY_MIB, **runner_options) -> Self:
        """Open a target by registered name, GGUF path or HF directory; `draft` sets the default drafter."""
        check_memory_limit(suffix_memory_mib)
        source = files.resolve(model, pull_if_missing=pull)
        if backend == "auto":
            backend = "llamacpp" if source.kind == "gguf" else "torch"
        target = open_runner(source, backend, **runner_options)
        spec = spec or SpeculativeConfig(draft=draft)
        if draft is not None:
            spec.draft = draft
        loaded = cls(target, backend, spec, runner_options=runner_options, suffix_cache=suffix_cache,
                     suffix_memory_mib=suffix_memory_mib)
        try:
            if suffix_cache is not None or suffix_memory_mib != DEFAULT_MEMORY_MIB:
                loaded.suffix_store  # noqa: B018 - read the cache (and check the limit and the path) at start-up
            if spec.draft:
                loaded.drafter(spec.draft)  # load now so errors surface at start-up
        except BaseException:
            loaded.close()
            raise
        return loaded
