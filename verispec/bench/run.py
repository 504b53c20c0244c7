"""One bench run: load the target once, warm every method up, then run the methods interleaved per
prompt (A B C, A B C, ...), check greedy outputs against ar, run the peers, write the report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import VerispecError
from ..models import files, registry
from ..sampling import SamplingParams
from . import aggregate, environment, formats as derived_formats, peers as peer_impls, verify_cost
from .conversation import Conversation, converse, engine_turn
from .methods import BASELINE, Method, parse_methods
from ..prompts import BUILTIN, BenchPrompt, load_prompts

WARMUP_TOKENS = 32


@dataclass
class BenchConfig:
    target: str = registry.DEFAULT_TARGET
    draft: str = registry.DEFAULT_DRAFT
    methods: str = "ar,ngram,draft,auto"
    prompts: str = BUILTIN
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    peers: list[str] = field(default_factory=list)
    llama_cpp_bin: str | None = None
    limit: int | None = None
    categories: list[str] | None = None
    out: str = "bench-out"
    threads: int | None = None
    ctx: int = 4096
    draft_max: int = 12
    verify_ks: tuple[int, ...] = (1, 2, 3, 4, 8, 16)  # 3: the largest exact chunk, the K = 2 step of a chain
    verify: str = "exact"  # the target runner's verify mode: exact | one-pass
    tie_tolerance: float | None = None  # None: the pass-shape noise the run measures for its verify mode
    noise_context: int = 1500  # tokens of the long context at which pass-shape noise is measured
    plots: bool = True
    formats: str = "q4_0,q8_0"  # derived formats whose verify cost and quality are measured ("" = none)
    reference: bool = True  # llama.cpp's own plain decoding (llama-server) on every prompt, between the methods
    print_table: bool = True  # the console summary (the demo prints its own)
    backend: str = "auto"  # the target's runner: llamacpp | torch | auto (llamacpp for GGUF)
    device: str = "auto"  # torch backend: auto | cpu | cuda
    dtype: str = "auto"  # torch backend: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32

    def runner_options(self) -> dict:
        """What load() gets for the target (and, through the Model, for a draft model on the same backend)."""
        options = {"n_ctx": self.ctx, "verify": self.verify, **({"n_threads": self.threads} if self.threads else {})}
        if self.device != "auto":
            options["device"] = self.device
        if self.dtype != "auto":
            options["dtype"] = self.dtype
        return options


def run_bench(config: BenchConfig, console: Console | None = None) -> dict:
    """Run the bench and write DIR/results.json, DIR/report.md and PNG plots; return the results."""
    from .. import load
    from . import report

    console = console or Console(stderr=True)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = environment.load_average()
    if load_before[0] > environment.BUSY_LOAD:
        console.print(f"[yellow]warning:[/] load average {load_before[0]} before the run: other processes compete for "
                      "the CPU and the numbers will be skewed (ggml's threads spin)")
    prompts = load_prompts(config.prompts, config.limit, config.categories)
    methods = parse_methods(config.methods, config.draft)
    format_names = derived_formats.parse(config.formats)
    params = SamplingParams(max_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed)
    runner_options = config.runner_options()
    memory = {"before_load": environment.memory()}

    with console.status(f"loading {config.target}"):
        model = load(config.target, backend=config.backend, **runner_options)
    if model.backend != "llamacpp":
        format_names = []  # derived formats are GGUF requantizations, measured on llama.cpp
    try:
        warmup = SamplingParams(max_tokens=min(WARMUP_TOKENS, config.max_new_tokens), temperature=config.temperature,
                                seed=config.seed)
        _warm_up(model, prompts[0], methods[0], warmup, config)
        memory["target"] = environment.memory()
        drafts = {}
        for m in methods[1:]:
            if m.draft not in drafts:
                with console.status(f"loading drafter {m.draft}"):
                    drafts[m.draft] = _draft_info(model, m.draft)
                if drafts[m.draft]["note"]:
                    console.print(drafts[m.draft]["note"])
            _warm_up(model, prompts[0], m, warmup, config)
            if drafts[m.draft]["kind"] == "model" and f"with {m.draft}" not in memory:
                memory[f"with {m.draft}"] = environment.memory()

        context = model.prompt_tokens(messages=[{"role": "user", "content": prompts[0].turns[0]}])
        with console.status("measuring the target's verify-cost curve T(K)/T(1)"):
            verify = verify_cost.measure(model.target, config.verify_ks, context)
        with console.status("measuring the numerical noise between pass shapes (short and long context)"):
            noise = verify_cost.pass_shape_noise(model.target, config.verify_ks,
                                                 _noise_contexts(model, context, config.noise_context, max(config.verify_ks)))
        mode = config.verify if config.verify in noise else next(iter(noise))
        tolerance = config.tie_tolerance if config.tie_tolerance is not None else noise[mode]["max"]
        config = _with_tolerance(config, tolerance)

        reference = _open_reference(model, config, console) if config.reference else None
        try:
            conversations, reference_convs = _run_methods(model, prompts, methods, params, config, console, reference)
        finally:
            if reference is not None:
                reference.close()
        records = [aggregate.record(c) for c in conversations.values()]
        greedy = params.greedy
        aggregate.check_lossless(records, conversations, greedy, config.tie_tolerance)
        names = [m.name for m in methods]
        summary = aggregate.summarize(records, names, greedy, verify["seconds"])
        for row, m in zip(summary, methods):
            row.update(tree=m.tree, tree_budget=m.tree_budget, acceptance=m.acceptance, family=m.family, lossy=m.lossy)
            if m.lossy and greedy:
                row["quality_vs_ar"] = aggregate.quality_vs_ar(records, m.name)

        ar = {pid: c for (pid, method), c in conversations.items() if method == BASELINE}
        reference_results = None
        if reference_convs:
            by_prompt = aggregate.reference_records(reference_convs, ar, config.tie_tolerance)
            reference_results = {"configuration": reference.describe(), "records": by_prompt,
                                 "ratios": aggregate.against_reference(records, by_prompt, names)}
        peer_results = [_run_peer(name, model, prompts, ar, config, console) for name in config.peers]
        format_reference = derived_formats.reference(model, prompts, ar, context, format_names, console)
        threads = getattr(model.target, "n_threads", config.threads)
        target_info = {"name": model.target.name, "parameters": getattr(model.target, "n_params", None),
                       "file_bytes": model.target.source.file_bytes if getattr(model.target, "source", None) else None,
                       "runner": _runner_description(model), "cost_curve": getattr(model.target, "cost_curve", None)}
    finally:
        model.close()
    # One derived model at a time, after the shipped one is closed, to bound memory.
    format_results = derived_formats.measure(format_reference, format_names, config, runner_options, console)

    results = {
        "config": {**asdict(config), "methods": names, "prompt_count": len(prompts)},
        "environment": {**environment.describe(threads), "load_before": load_before,
                        "load_after": environment.load_average(), "busy_threshold": environment.BUSY_LOAD},
        "target": target_info,
        "drafts": {m.name: drafts.get(m.draft) for m in methods},
        "summary": summary,
        "per_category": aggregate.per_category(records, names),
        "acceptance_by_position": {n: aggregate.acceptance_by_position(records, n) for n in names if n != BASELINE},
        "fixed_k": {m.name: {"family": m.family, "k": m.fixed_k} for m in methods if m.fixed_k is not None},
        "verify_cost": verify,
        "noise": noise,
        "formats": format_results,
        "memory": memory,
        "peers": peer_results,
        "llama_cpp": reference_results,
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = []
    if config.plots:
        from . import plots as plotting

        plots = plotting.write_all(results, out)
    (out / "report.md").write_text(report.markdown(results, plots))
    if config.print_table:
        report.print_summary(results, Console())
    console.print(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(plots)} plots")
    return results


def _runner_description(model) -> str:
    """Which runner computed the target, as the report names it: 'llamacpp (verify exact)', 'torch (fp32 on cpu)'."""
    target = model.target
    if model.backend == "torch":
        from ..runners.torch import dtype_name

        return f"torch ({dtype_name(target.dtype)} on {target.device})"
    return f"{model.backend} (verify {getattr(target, 'verify_mode', 'exact')})"


def _noise_contexts(model, context: list[int], long_tokens: int, k_max: int) -> list[list[int]]:
    """A bench prompt's context, and a long one past ggml's 512-cell attention threshold (the first
    context repeated), each with room for the K rows rescored at its end."""
    long = (context * (long_tokens // max(1, len(context)) + 1))[: max(long_tokens, len(context) + k_max)]
    short = context if len(context) > k_max else (context * (k_max // max(1, len(context)) + 2))
    return [short, long[: model.target.n_ctx - 1]]


def _with_tolerance(config: BenchConfig, tolerance: float) -> BenchConfig:
    from dataclasses import replace

    return replace(config, tie_tolerance=tolerance)


def _warm_up(model, prompt: BenchPrompt, method: Method, params: SamplingParams, config: BenchConfig) -> None:
    _use_history(model, method, f"warm-up {method.name}")
    converse(model, prompt, method.name, engine_turn(model, method.config(config.draft_max), params), max_turns=1)


def _use_history(model, method: Method, history: str) -> None:
    """Suffix lookup drafts from the method's own earlier requests of the run (the prompts run in file order, so a
    session's later requests find its earlier ones), never from another method's answer to the same prompt."""
    levels = (method.draft or "").removeprefix("cascade:").split(",")
    if "suffix" in levels:
        model.drafter("suffix").history = history


def _draft_info(model, draft: str) -> dict:
    model.draft_choice_note = ""
    drafter = model.drafter(draft)
    runner = getattr(drafter, "runner", None)
    heads = bool(getattr(drafter, "needs_hidden", False))
    return {
        "drafter": drafter.name,
        "kind": "heads" if heads else "model" if runner is not None else "ngram",
        "parameters": getattr(drafter, "n_params", 0) if heads else getattr(runner, "n_params", 0) if runner is not None else 0,
        "file_bytes": (runner.source.file_bytes if getattr(runner, "source", None) else None) if runner is not None else 0,
        "note": model.draft_choice_note,
    }


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[last]}"), console=console)


def _run_methods(model, prompts: list[BenchPrompt], methods: list[Method], params: SamplingParams,
                 config: BenchConfig, console: Console, reference: peer_impls.Peer | None = None,
                 ) -> tuple[dict[tuple[str, str], Conversation], list[Conversation]]:
    """Every method on each prompt in turn, then llama.cpp's plain decoding on the same prompt, so that the
    machine's drift (10-20% over an hour) falls on all of them alike."""
    conversations, reference_convs = {}, []
    reference_fn = reference.turn_fn("plain", config.max_new_tokens) if reference is not None else None
    with _progress(console) as progress:
        task = progress.add_task("bench", total=len(prompts) * (len(methods) + bool(reference_fn)), last="")
        for prompt in prompts:
            for m in methods:
                progress.update(task, description=f"{prompt.id} · {m.name}")
                _use_history(model, m, m.name)
                conv = converse(model, prompt, m.name, engine_turn(model, m.config(config.draft_max), params))
                conversations[(prompt.id, m.name)] = conv
                generated = sum(t.stats.generated for t in conv.turns)
                decode = sum(t.stats.decode_seconds for t in conv.turns)
                progress.update(task, advance=1, last=f"{m.name}: {generated / decode if decode else 0:.1f} tok/s")
            if reference_fn is not None:
                progress.update(task, description=f"{prompt.id} · llama.cpp")
                conv = converse(model, prompt, "llama.cpp", reference_fn)
                reference_convs.append(conv)
                generated = sum(t.extra["generated"] for t in conv.turns)
                decode = sum(t.extra["decode_seconds"] for t in conv.turns)
                progress.update(task, advance=1, last=f"llama.cpp: {generated / decode if decode else 0:.1f} tok/s")
    return conversations, reference_convs


def _open_reference(model, config: BenchConfig, console: Console) -> peer_impls.Peer | None:
    """llama-server on the target, warmed up; None (with the reason printed) when it is not built."""
    context = _peer_context(model, config)
    if context.target_path.suffix != ".gguf":
        console.print(f"[yellow]llama.cpp reference skipped:[/] {context.target_path} is not a GGUF file")
        return None
    server = peer_impls.LlamaServer(context)
    try:
        with console.status("starting llama.cpp's llama-server (the reference)"):
            server.open()
            server.turn_fn("plain", WARMUP_TOKENS)("", model.tokenizer.encode("Hello"))
    except peer_impls.PeerUnavailable as exc:
        server.close()
        console.print(f"[yellow]llama.cpp reference skipped:[/] {exc}")
        return None
    return server


def _peer_context(model, config: BenchConfig) -> peer_impls.PeerContext:
    draft_path = None
    if config.draft not in ("ngram", "auto", "none"):
        try:
            draft_path = files.resolve(config.draft).path
        except VerispecError:
            draft_path = None  # the peers that need a draft say so
    source = getattr(model.target, "source", None) or files.resolve(config.target)
    return peer_impls.PeerContext(
        target_path=source.path, draft_path=draft_path,
        threads=getattr(model.target, "n_threads", None) or config.threads or 1, n_ctx=config.ctx,
        temperature=config.temperature, seed=config.seed, eos_ids=model.tokenizer.eos_ids,
        llama_cpp_bin=config.llama_cpp_bin,
    )


def _run_peer(name: str, model, prompts: list[BenchPrompt], ar: dict[str, Conversation], config: BenchConfig,
              console: Console) -> dict:
    cls = peer_impls.PEERS.get(name)
    if cls is None:
        console.print(f"[yellow]peer {name} skipped:[/] unknown peer (known: {', '.join(peer_impls.PEERS)})")
        return {"peer": name, "skipped": "unknown peer"}
    peer = cls(_peer_context(model, config))
    try:
        with console.status(f"loading peer {name}"):
            peer.open()
        fns = {v: peer.turn_fn(v, config.max_new_tokens) for v in peer.variants}
        max_turns = None if peer.multi_turn else 1
        for v in peer.variants:
            converse(model, prompts[0], f"{name}:{v}", peer.turn_fn(v, min(WARMUP_TOKENS, config.max_new_tokens)), 1)
        convs = []
        with _progress(console) as progress:
            task = progress.add_task(f"peer {name}", total=len(prompts) * len(peer.variants), last="")
            for prompt in prompts:
                for v in peer.variants:
                    progress.update(task, description=f"peer {name}: {prompt.id} · {v}")
                    convs.append(converse(model, prompt, f"{name}:{v}", fns[v], max_turns))
                    progress.advance(task)
        description = peer.describe()
    except peer_impls.PeerUnavailable as exc:
        console.print(f"[yellow]peer {name} skipped:[/] {exc}")
        return {"peer": name, "skipped": str(exc)}
    except Exception as exc:  # a peer failing mid-run must not lose the verispec results
        console.print(f"[yellow]peer {name} failed:[/] {type(exc).__name__}: {exc}")
        return {"peer": name, "skipped": f"failed: {type(exc).__name__}: {exc}"}
    finally:
        peer.close()
    records = aggregate.peer_records(convs, peer.variants, ar, has_tokens=peer.has_tokens, timing=peer.timing,
                                     greedy=config.temperature == 0, tolerance=config.tie_tolerance)
    return {"peer": name, "configuration": description, "timing": peer.timing, "multi_turn": peer.multi_turn,
            "variants": list(peer.variants), "summary": aggregate.peer_summary(records, peer.variants), "records": records}
