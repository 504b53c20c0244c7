"""Other implementations run on the same prompts in the same bench run, each optional.

- llamacpp-pld: llama-cpp-python's `Llama` with `LlamaPromptLookupDecoding`, against the same
  `Llama` without it, on the target GGUF.
- hf: transformers assisted generation (the draft GGUF as `assistant_model`, and
  `prompt_lookup_num_tokens`), against transformers' own plain `generate()`; GGUF dequantized to fp32.
- llama-speculative: llama.cpp's `llama-speculative` (or `-simple`) binary with the target and draft.

Every peer renders prompts with verispec's chat template and tokenizer, so all see the same tokens.
A peer that cannot run raises PeerUnavailable and is skipped with its reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .conversation import Turn, TurnFn


class PeerUnavailable(Exception):
    pass


@dataclass
class PeerContext:
    target_path: Path
    draft_path: Path | None
    threads: int
    n_ctx: int
    temperature: float
    seed: int
    eos_ids: frozenset[int]
    llama_cpp_bin: str | None = None


class Peer:
    name: str
    variants: tuple[str, ...]  # the first is the peer's own plain baseline
    multi_turn = True  # False: only the first turn of each prompt is run
    has_tokens = True  # False: the peer reports counts and speed, not token ids
    timing = "end-to-end"  # what its tokens/s include: "end-to-end" (prefill too) or "decode"

    def __init__(self, ctx: PeerContext) -> None:
        self.ctx = ctx

    def open(self) -> None:
        """Load what the peer needs; raise PeerUnavailable with a reason if it cannot run."""

    def describe(self) -> str:
        """How the peer is configured, for the report."""
        raise NotImplementedError

    def turn_fn(self, variant: str, max_tokens: int) -> TurnFn:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LlamaCppPromptLookup(Peer):
    name = "llamacpp-pld"
    variants = ("plain", "pld")
    num_pred_tokens = 10

    def open(self) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError as exc:
            raise PeerUnavailable(f"llama-cpp-python is not importable: {exc}") from None
        common = dict(model_path=str(self.ctx.target_path), n_ctx=self.ctx.n_ctx, n_threads=self.ctx.threads,
                      n_threads_batch=self.ctx.threads, n_batch=512, seed=self.ctx.seed, verbose=False)
        self.llms = {
            "plain": Llama(**common),
            "pld": Llama(**common, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=self.num_pred_tokens)),
        }

    def describe(self) -> str:
        return (f"llama-cpp-python `Llama(n_ctx={self.ctx.n_ctx}, n_threads={self.ctx.threads}, n_batch=512)` on "
                f"`{self.ctx.target_path.name}`; `pld` adds `draft_model=LlamaPromptLookupDecoding(num_pred_tokens="
                f"{self.num_pred_tokens})`, which forces `logits_all=True` (every step copies full logit rows), "
                f"`plain` is the same class without it. Sampling via `Llama.generate(temp={self.ctx.temperature})` "
                "(greedy at 0). Timed end to end, prefill included.")

    def turn_fn(self, variant: str, max_tokens: int) -> TurnFn:
        import llama_cpp as L

        llm = self.llms[variant]
        vocab = L.llama_model_get_vocab(llm.model)

        def generate(_text: str, tokens: list[int]) -> Turn:
            llm.reset()  # no KV reuse from the previous request: every turn prefills, as verispec's do
            out: list[int] = []
            t0 = time.perf_counter()
            for token in llm.generate(tokens, temp=self.ctx.temperature, top_k=0, top_p=1.0, min_p=0.0, reset=True):
                if L.llama_vocab_is_eog(vocab, token):
                    break
                out.append(token)
                if len(out) >= max_tokens:
                    break
            return Turn(out, time.perf_counter() - t0)

        return generate

    def close(self) -> None:
        for llm in getattr(self, "llms", {}).values():
            llm.close()


class HFAssisted(Peer):
    name = "hf"
    variants = ("plain", "assisted", "prompt-lookup")
    prompt_lookup_tokens = 10

    def open(self) -> None:
        if self.ctx.draft_path is None:
            raise PeerUnavailable("needs a draft model file (--draft NAME or a GGUF path)")
        if self.ctx.target_path.suffix != ".gguf":
            raise PeerUnavailable("needs GGUF files")
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise PeerUnavailable(f"transformers/torch not importable: {exc}") from None
        self._torch = torch
        torch.set_num_threads(self.ctx.threads)

        def load(path: Path):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            return model.eval()

        t0 = time.perf_counter()
        self.target = load(self.ctx.target_path)
        self.draft = load(self.ctx.draft_path)
        self.load_seconds = time.perf_counter() - t0

    def _assistant_config(self):
        """The assistant's generation_config with transformers' defaults filled in, as its candidate generator does."""
        import copy

        g = copy.deepcopy(self.draft.generation_config)
        try:
            g.update(**g._get_default_generation_params(), defaults_only=True)
        except AttributeError:  # another transformers version: report the raw values
            pass
        return g

    def describe(self) -> str:
        g = self._assistant_config()
        return (f"transformers `AutoModelForCausalLM.from_pretrained(gguf_file=...)`, fp32 dequantized (loading took "
                f"{self.load_seconds:.0f}s), torch threads {self._torch.get_num_threads()}. `plain` = `generate(do_sample="
                f"{self.ctx.temperature > 0})`; `assisted` adds `assistant_model=` the draft "
                f"(`{self.ctx.draft_path.name}`; num_assistant_tokens={getattr(g, 'num_assistant_tokens', None)}, "
                f"schedule={getattr(g, 'num_assistant_tokens_schedule', None)}, "
                f"assistant_confidence_threshold={getattr(g, 'assistant_confidence_threshold', None)}: the assistant's "
                "generation_config with transformers' defaults); "
                f"`prompt-lookup` adds `prompt_lookup_num_tokens={self.prompt_lookup_tokens}`. Timed end to end.")

    def turn_fn(self, variant: str, max_tokens: int) -> TurnFn:
        torch = self._torch
        extra = {"assisted": {"assistant_model": getattr(self, "draft", None)},
                 "prompt-lookup": {"prompt_lookup_num_tokens": self.prompt_lookup_tokens}}.get(variant, {})
        eos = sorted(self.ctx.eos_ids)
        sampling = ({"do_sample": True, "temperature": self.ctx.temperature} if self.ctx.temperature > 0
                    else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})

        def generate(_text: str, tokens: list[int]) -> Turn:
            ids = torch.tensor([tokens], dtype=torch.long)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                           eos_token_id=eos, pad_token_id=eos[0] if eos else None, **sampling, **extra)
            elapsed = time.perf_counter() - t0
            new = out[0, len(tokens):].tolist()
            for i, t in enumerate(new):
                if t in self.ctx.eos_ids:
                    new = new[:i]
                    break
            return Turn(new, elapsed)

        return generate

    def close(self) -> None:
        self.target = self.draft = None


_SPEED = re.compile(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+)\s+seconds, speed:\s+([\d.]+)\s+t/s")
_COUNTER = re.compile(r"^(n_draft|n_predict|n_drafted|n_accept|accept)\s*=\s*([\d.]+)", re.M)


class LlamaSpeculativeBinary(Peer):
    name = "llama-speculative"
    variants = ("speculative",)
    multi_turn = False
    has_tokens = False
    timing = "decode"
    draft_max = 8
    executables = ("llama-speculative", "llama-speculative-simple")

    def open(self) -> None:
        if self.ctx.draft_path is None:
            raise PeerUnavailable("needs a draft model file (--draft NAME or a GGUF path)")
        search = os.pathsep.join(p for p in (self.ctx.llama_cpp_bin, os.environ.get("PATH", "")) if p)
        for exe in self.executables:
            found = shutil.which(exe, path=search)
            if found:
                self.exe = found
                return
        raise PeerUnavailable(f"none of {', '.join(self.executables)} found on PATH or in --llama-cpp-bin")

    def describe(self) -> str:
        return (f"`{self.exe} -m {self.ctx.target_path.name} -md {self.ctx.draft_path.name} -f PROMPT -n N "
                f"--temp {self.ctx.temperature} -t {self.ctx.threads} -c {self.ctx.n_ctx} --draft-max {self.draft_max}` "
                "on the chat-rendered first turn of each prompt; tokens/s is the binary's own decode speed "
                "(prefill excluded), so it is compared with verispec ar's decode tokens/s.")

    def turn_fn(self, variant: str, max_tokens: int) -> TurnFn:
        def generate(text: str, _tokens: list[int]) -> Turn:
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                f.write(text)
            cmd = [self.exe, "-m", str(self.ctx.target_path), "-md", str(self.ctx.draft_path), "-f", f.name,
                   "-n", str(max_tokens), "--temp", str(self.ctx.temperature), "-t", str(self.ctx.threads),
                   "-c", str(self.ctx.n_ctx), "--draft-max", str(self.draft_max), "--seed", str(self.ctx.seed)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            finally:
                os.unlink(f.name)
            elapsed = time.perf_counter() - t0
            log = proc.stdout + proc.stderr
            speed = _SPEED.search(log)
            if proc.returncode != 0 or not speed:
                raise PeerUnavailable(f"{Path(self.exe).name} failed (exit {proc.returncode}): {log.strip()[-300:]}")
            info = {k: float(v) for k, v in _COUNTER.findall(log)}
            extra = {"generated": int(speed.group(1)), "decode_seconds": float(speed.group(2)),
                     "tokens_per_s": float(speed.group(3)), **info}
            return Turn([], elapsed, extra=extra)

        return generate


PEERS: dict[str, type[Peer]] = {p.name: p for p in (LlamaCppPromptLookup, HFAssisted, LlamaSpeculativeBinary)}
