"""Other implementations run on the same prompts in the same bench run, each optional.

- llamacpp-pld: llama-cpp-python's `Llama` with `LlamaPromptLookupDecoding`, against the same
  `Llama` without it, on the target GGUF.
- hf: transformers assisted generation (the draft GGUF as `assistant_model`, and
  `prompt_lookup_num_tokens`), against transformers' own plain `generate()`; GGUF dequantized to fp32.
- llama-speculative: llama.cpp's `llama-speculative-simple` binary with the target and draft.
- llama-lookup: llama.cpp's `llama-lookup` binary (n-gram speculation, target only).
- llama.cpp: llama.cpp's own `llama-server`, plain decoding. The bench runs it on every prompt between
  the methods as the reference (BenchConfig.reference), not only as a peer.

llama.cpp's programs come from `make llama-tools` (build-support/llama-cpp.sh): the sdist's vendored
llama.cpp, unpatched, with its default OpenMP build, run without verispec's OMP_WAIT_POLICY.

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

from ..huge_pages import without_huge_pages
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
        for exe in self.executables:
            found = llama_cpp_tool(exe, self.ctx.llama_cpp_bin)
            if found:
                self.exe = found
                return
        raise PeerUnavailable(f"none of {', '.join(self.executables)} built: run `make llama-tools` (or pass --llama-cpp-bin)")

    def describe(self) -> str:
        return (f"`{self.exe} -m {self.ctx.target_path.name} -md {self.ctx.draft_path.name} -f PROMPT -n N "
                f"--temp {self.ctx.temperature} -t {self.ctx.threads} -c {self.ctx.n_ctx} --spec-type draft-simple "
                f"--spec-draft-n-max {self.draft_max}` "
                "on the chat-rendered first turn of each prompt; tokens/s is the binary's own decode speed "
                "(prefill excluded), so it is compared with verispec ar's decode tokens/s.")

    def command(self, prompt_file: str, max_tokens: int) -> list[str]:
        return [self.exe, "-m", str(self.ctx.target_path), "-md", str(self.ctx.draft_path), "-f", prompt_file,
                "-n", str(max_tokens), "--temp", str(self.ctx.temperature), "-t", str(self.ctx.threads),
                "-c", str(self.ctx.n_ctx), "--spec-type", "draft-simple", "--spec-draft-n-max", str(self.draft_max),
                "--seed", str(self.ctx.seed)]

    def turn_fn(self, variant: str, max_tokens: int) -> TurnFn:
        def generate(text: str, _tokens: list[int]) -> Turn:
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                f.write(text)
            cmd = self.command(f.name, max_tokens)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=llama_cpp_env())
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


class LlamaLookupBinary(LlamaSpeculativeBinary):
    """llama.cpp's `llama-lookup`: prompt-lookup (n-gram) speculation with the target alone."""

    name = "llama-lookup"
    variants = ("lookup",)
    executables = ("llama-lookup",)

    def open(self) -> None:
        found = llama_cpp_tool("llama-lookup", self.ctx.llama_cpp_bin)
        if not found:
            raise PeerUnavailable("llama-lookup not built: run `make llama-tools` (or pass --llama-cpp-bin)")
        self.exe = found

    def describe(self) -> str:
        return (f"`{Path(self.exe).name} -m {self.ctx.target_path.name} -f PROMPT -n N --temp {self.ctx.temperature} "
                f"-t {self.ctx.threads} -c {self.ctx.n_ctx} --spec-draft-n-max {self.draft_max}` on the chat-rendered "
                "first turn of each prompt; tokens/s is the binary's own decode speed (prefill excluded).")

    def command(self, prompt_file: str, max_tokens: int) -> list[str]:
        return [self.exe, "-m", str(self.ctx.target_path), "-f", prompt_file, "-n", str(max_tokens),
                "--temp", str(self.ctx.temperature), "-t", str(self.ctx.threads), "-c", str(self.ctx.n_ctx),
                "--spec-draft-n-max", str(self.draft_max), "--seed", str(self.ctx.seed)]


def llama_cpp_tool(name: str, bin_dir: str | None = None) -> str | None:
    """A llama.cpp program: in `bin_dir`, on PATH, or where `make llama-tools` (build-support/llama-cpp.sh)
    builds them from the sdist's vendored llama.cpp."""
    cache = Path(os.environ.get("VERISPEC_CACHE", Path.home() / ".cache" / "verispec")) / "llama.cpp"
    built = sorted(cache.glob("tools-*/bin"), key=lambda p: p.stat().st_mtime, reverse=True)
    search = os.pathsep.join(str(p) for p in (bin_dir, *built, os.environ.get("PATH", "")) if p)
    return shutil.which(name, path=search)


def llama_cpp_env() -> dict[str, str]:
    """llama.cpp's programs as users run them: OpenMP's own wait policy, not the PASSIVE that verispec's
    Makefile sets for torch (that would slow every barrier of theirs, see docs/threading.md), and glibc's
    default pages, not the huge pages verispec asks for (huge_pages.py; they gain as much from them), unless
    VERISPEC_PEER_HUGE_PAGES=1 gives them the same pages, to compare like with like."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GGML_CPU_USE_REF")}
    return env if os.environ.get("VERISPEC_PEER_HUGE_PAGES") == "1" else without_huge_pages(env)


class LlamaServerProcess:
    """llama.cpp's `llama-server` on a free loopback port, as users run it (its own OpenMP wait policy)."""

    def __init__(self, model_path: Path, threads: int, n_ctx: int, slots: int = 1, bin_dir: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        import socket

        import httpx

        exe = llama_cpp_tool("llama-server", bin_dir)
        if exe is None:
            raise PeerUnavailable("llama-server not built: run `make llama-tools` (or pass --llama-cpp-bin)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [exe, "-m", str(model_path), "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx),
                    "-np", str(slots), "--host", "127.0.0.1", "--port", str(port), "--no-webui", *extra]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, env=llama_cpp_env(), stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=1800)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"llama-server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.close()
        raise PeerUnavailable(f"llama-server did not become ready in 180 s: {self.tail()}")

    def command_line(self) -> str:
        return " ".join(Path(c).name if i in (0, 2) else c for i, c in enumerate(self.cmd))

    def tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace").strip()[-400:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.client.close()


class LlamaServer(Peer):
    """llama.cpp's own server, plain decoding: what users get from llama.cpp itself, the reference every
    method is also measured against. Token ids in and out, so outputs are compared token for token."""

    name = "llama.cpp"
    variants = ("plain",)
    timing = "decode"

    extra_args: tuple[str, ...] = ()

    def open(self) -> None:
        self.server = LlamaServerProcess(self.ctx.target_path, self.ctx.threads, self.ctx.n_ctx, 1,
                                         self.ctx.llama_cpp_bin, ("--no-cache-prompt", *self.extra_args))
        self.cmd, self._client = self.server.cmd, self.server.client

    def describe(self) -> str:
        return (f"`{self.server.command_line()}` (built from the "
                "llama-cpp-python sdist's vendored llama.cpp, OpenMP and its default wait policy), `/completion` with the "
                "prompt as token ids, `cache_prompt: false`; tokens/s is counted as verispec's: tokens written (EOS "
                "excluded) over its `timings.predicted_ms` (first token to last pass, prefill excluded); its time to "
                "first token is `timings.prompt_ms`.")

    def turn_fn(self, variant: str, max_tokens: int) -> TurnFn:
        def generate(_text: str, tokens: list[int]) -> Turn:
            body = {"prompt": tokens, "n_predict": max_tokens, "temperature": self.ctx.temperature,
                    "seed": self.ctx.seed, "cache_prompt": False, "return_tokens": True}
            t0 = time.perf_counter()
            reply = self._client.post("/completion", json=body)
            elapsed = time.perf_counter() - t0
            if reply.status_code != 200:
                raise PeerUnavailable(f"llama-server answered {reply.status_code}: {reply.text[:300]}")
            data = reply.json()
            out = [t for t in data.get("tokens", [])]
            for i, t in enumerate(out):
                if t in self.ctx.eos_ids:
                    out = out[:i]
                    break
            timings = data["timings"]
            # Counted as verispec counts its own: tokens written, an EOS not among them (predicted_n counts
            # the EOS it sampled, which made llama.cpp ~1/n faster on every prompt that stopped), over the
            # time from the first token to the last pass (predicted_ms).
            extra = {"generated": len(out), "decode_seconds": timings["predicted_ms"] / 1e3,
                     "prefill_seconds": timings["prompt_ms"] / 1e3,
                     **{k: timings[k] for k in ("draft_n", "draft_n_accepted") if k in timings}}
            return Turn(out, elapsed, extra=extra)

        return generate

    def close(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.close()


class LlamaServerNgramMod(LlamaServer):
    """llama-server with `--spec-type ngram-mod`: one hashed n-gram pool shared by all its slots and kept across
    requests, so that a session's later requests draft from its earlier ones: the peer of verispec's suffix lookup.
    One server serves the whole run, prompts in file order, as verispec's methods run them."""

    name = "llama.cpp-ngram-mod"
    variants = ("ngram-mod",)
    extra_args = ("--spec-type", "ngram-mod")

    def describe(self) -> str:
        return (f"`{self.server.command_line()}`, one server for the whole run (its n-gram pool stays warm across "
                "requests), `/completion` with token ids; tokens/s counted as for llama.cpp plain.")


PEERS: dict[str, type[Peer]] = {p.name: p for p in (LlamaCppPromptLookup, HFAssisted, LlamaSpeculativeBinary,
                                                    LlamaLookupBinary, LlamaServer, LlamaServerNgramMod)}
