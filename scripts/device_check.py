"""The torch runner on one GPU, in one table: what a session with a lent device runs once (issue: torch on GPU).

The device machine reaches no package registry and gets at most 64 MiB of files, so the models are built here
with random weights from the Qwen2.5-Coder 1.5B (target) and 0.5B (draft) configs, written in code: speed
depends on shapes, not values. It needs torch, transformers, numpy and rich (all on the device image), and
verispec's own engine, runner and drafters from this checkout (no llama-cpp-python, no gguf).

    python3 scripts/device_check.py                  # on the GPU: both dtypes, then bf16 with CUDA graphs
    python3 scripts/device_check.py --smoke          # a smoke test on a CPU, in seconds (what a test runs)

It measures, per dtype (bf16, fp32):
- plain decoding tokens/s through verispec's Engine;
- T(K)/T(1) of one target pass over K rows, K = 1..64, by wall clock and by CUDA events (their difference is
  host overhead per pass);
- n-gram and draft-model speculative tokens/s at fixed K, with the drafted and accepted counts (random
  weights accept little: the point is the cost of the machinery, not the speedup);
- the draft/target cost ratio of one-row passes;
- host milliseconds per step of sampling at top-p 0.9 (logits to probabilities and a draw, on the host);
- greedy and seeded equality of speculative and plain output, with plain decoding's logit margin at the
  first divergence (random weights give small margins: a divergence below the pass-shape noise is a tie).
A last column runs bf16 again with fixed-shape passes (padded to the runner's ROW_BUCKETS) captured as CUDA
graphs through torch.compile(mode="reduce-overhead"), over fewer pass sizes (each bucket compiles once). On a
CPU that column runs the same fixed-shape passes uncompiled. If it fails, the error is its entry and the
other columns still stand.
The table is printed and written as JSON to $OUT/device_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verispec.drafters.draft_model import ModelDrafter  # noqa: E402
from verispec.drafters.ngram import NgramDrafter  # noqa: E402
from verispec.engine import Engine, SpeculativeConfig, Stats  # noqa: E402
from verispec.runners.base import Tokenizer  # noqa: E402
from verispec.runners.torch import TorchRunner, resolve_dtype  # noqa: E402
from verispec.sampling import SamplingParams, logits_to_probs, sample  # noqa: E402

# Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct (config.json of each), and a tiny pair for a CPU smoke test.
CONFIGS = {
    "full": {
        "target": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
        "draft": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    },
    "tiny": {
        "target": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        "draft": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
    },
}
VERIFY_KS = (1, 2, 4, 8, 16, 32, 64)
GRAPH_VERIFY_KS = (1, 4, 8, 16)  # the graphs column: one compile per bucket, so fewer sizes
SPEC_K = 4
PROMPT_TOKENS = 256


class IdTokenizer(Tokenizer):
    """Token ids are the text: the check never decodes meaningfully, and the vocabularies agree by construction."""

    bos_id = 1
    eos_ids = frozenset({2})
    chat_template = None
    bos_text = eos_text = ""

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, tokens) -> str:
        return " ".join(map(str, tokens))

    def vocab_strings(self) -> list[str]:
        return []


def build(kind: str, scale: str, device: str, dtype: str, graphs: bool = False) -> TorchRunner:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(max_position_embeddings=4096, rope_theta=1e6, attn_implementation="sdpa",
                         **CONFIGS[scale][kind])
    torch.manual_seed({"target": 0, "draft": 1}[kind])
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(resolve_dtype(dtype, device))
    return TorchRunner(model, IdTokenizer(), f"qwen-{kind}-{scale}-random", n_ctx=2048, device=device,
                       fixed_shapes=graphs, cuda_graphs=graphs and device.startswith("cuda"))


def prompt_ids(vocab: int) -> list[int]:
    """A prompt with repeats, so n-gram lookup finds something to draft."""
    rng = np.random.default_rng(0)
    phrase = list(rng.integers(3, vocab, 32))
    return [1] + (phrase * (PROMPT_TOKENS // 32 + 1))[: PROMPT_TOKENS - 1]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_pass(runner: TorchRunner, tokens: list[int], device: str) -> tuple[float, float]:
    """(wall seconds, GPU seconds by CUDA events; the wall time again on a CPU) of one forward over `tokens`."""
    import torch

    base = runner.n_past
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        t0 = time.perf_counter()
        start.record()
        runner.forward(tokens)
        end.record()
        sync(device)
        wall = time.perf_counter() - t0
        gpu = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        runner.forward(tokens)
        wall = gpu = time.perf_counter() - t0
    runner.rollback(base)
    return wall, gpu


def verify_curve(runner: TorchRunner, context: list[int], device: str, repeats: int,
                 ks: tuple[int, ...] = VERIFY_KS) -> dict:
    runner.reset()
    runner.forward(context, all_logits=False)
    rows = {}
    for k in ks:
        probe = context[:k]
        timed_pass(runner, probe, device)  # warm-up of this shape
        samples = [timed_pass(runner, probe, device) for _ in range(repeats)]
        rows[k] = {"wall_ms": 1e3 * float(np.median([w for w, _ in samples])),
                   "gpu_ms": 1e3 * float(np.median([g for _, g in samples]))}
    runner.reset()
    t1 = rows[1]["wall_ms"]
    for k in rows:
        rows[k]["ratio"] = rows[k]["wall_ms"] / t1
        rows[k]["host_ms"] = rows[k]["wall_ms"] - rows[k]["gpu_ms"]
    return rows


def generate(engine: Engine, prompt: list[int], params: SamplingParams, device: str) -> tuple[list[int], Stats, float]:
    stats = Stats()
    sync(device)
    t0 = time.perf_counter()
    out = [t for step in engine.generate(prompt, params, stats, record_margins=True) for t in step]
    sync(device)
    return out, stats, time.perf_counter() - t0


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def host_sampling_ms(vocab: int, repeats: int = 50) -> float:
    """Host time of one sampled token at top-p 0.9: logits to probabilities over the vocabulary, and a draw."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(vocab).astype(np.float32) * 3
    params = SamplingParams(temperature=0.8, top_p=0.9)
    t0 = time.perf_counter()
    for _ in range(repeats):
        sample(logits_to_probs(logits, params), rng)
    return 1e3 * (time.perf_counter() - t0) / repeats


def check_mode(scale: str, device: str, mode: str, new_tokens: int, repeats: int) -> dict:
    """One column: a dtype ('bf16'), or a dtype with fixed-shape passes and CUDA graphs ('bf16+graphs').
    A failing column (graphs have never run on a GPU here) reports its error instead of ending the check."""
    try:
        return check_dtype(scale, device, mode.removesuffix("+graphs"), new_tokens, repeats, mode.endswith("+graphs"))
    except Exception as exc:  # noqa: BLE001 - the check's other columns must still come back
        if not mode.endswith("+graphs"):
            raise
        return {"dtype": mode, "error": f"{type(exc).__name__}: {exc}"[:500]}


def check_dtype(scale: str, device: str, dtype: str, new_tokens: int, repeats: int, graphs: bool = False) -> dict:
    target, draft = build("target", scale, device, dtype, graphs), build("draft", scale, device, dtype, graphs)
    prompt = prompt_ids(target.n_vocab)
    greedy = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    generate(Engine(target), prompt[:32], SamplingParams(max_tokens=8, ignore_eos=True), device)  # warm-up
    plain, plain_stats, plain_s = generate(Engine(target), prompt, greedy, device)
    ks = GRAPH_VERIFY_KS if graphs else VERIFY_KS
    result = {"dtype": dtype + ("+graphs" if graphs else ""), "plain_tokens_per_s": len(plain) / plain_s,
              "verify": verify_curve(target, prompt, device, repeats, ks)}
    draft_curve = verify_curve(draft, prompt, device, repeats)
    result["draft_over_target_one_row"] = draft_curve[1]["wall_ms"] / result["verify"][1]["wall_ms"]
    for name, drafter in (("ngram", NgramDrafter()), ("draft", ModelDrafter(draft))):
        spec = SpeculativeConfig(draft="x", draft_tokens=SPEC_K)
        out, stats, seconds = generate(Engine(target, drafter, spec), prompt, greedy, device)
        i = first_divergence(plain, out)
        result[name] = {"tokens_per_s": len(out) / seconds, "speedup": plain_s / seconds * len(out) / len(plain),
                        "drafted": stats.drafted, "accepted": stats.accepted, "first_divergence": i,
                        "margin_there": plain_stats.margins[i] if i is not None and i < len(plain_stats.margins) else None}
    seeded = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.8, top_p=0.9, seed=7)
    plain_seeded, _, _ = generate(Engine(target), prompt, seeded, device)
    spec_seeded, stats, _ = generate(Engine(target, ModelDrafter(draft), SpeculativeConfig(draft="x", draft_tokens=SPEC_K)),
                                     prompt, seeded, device)  # the draft model drafts at every step
    result["seeded"] = {"equal": plain_seeded == spec_seeded, "first_divergence": first_divergence(plain_seeded, spec_seeded),
                        "drafted": stats.drafted}
    result["host_sampling_ms_top_p"] = host_sampling_ms(target.n_vocab)
    del target, draft
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return result


def print_table(results: list[dict], header: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(" · ".join(f"{k}: {v}" for k, v in header.items()))
    table = Table(title="verispec torch runner: device check")
    table.add_column("measure")
    for r in results:
        table.add_column(r["dtype"], justify="right")

    def row(label: str, value) -> None:
        table.add_row(label, *[value(r) for r in results])

    failed = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    row("plain tokens/s", lambda r: f"{r['plain_tokens_per_s']:.1f}")
    for k in VERIFY_KS:
        row(f"T({k})/T(1) wall (gpu ms, host ms)",
            lambda r, k=k: f"{r['verify'][k]['ratio']:.2f} ({r['verify'][k]['gpu_ms']:.2f}, {r['verify'][k]['host_ms']:.2f})"
            if k in r["verify"] else "-")
    row("draft/target one-row cost", lambda r: f"{r['draft_over_target_one_row']:.2f}")
    for name in ("ngram", "draft"):
        row(f"{name} K={SPEC_K} tokens/s (x plain)", lambda r, n=name: f"{r[n]['tokens_per_s']:.1f} ({r[n]['speedup']:.2f}x)")
        row(f"{name} drafted / accepted", lambda r, n=name: f"{r[n]['drafted']} / {r[n]['accepted']}")
        row(f"{name} greedy = plain (margin at divergence)", lambda r, n=name: "yes" if r[n]["first_divergence"] is None
            else f"no at {r[n]['first_divergence']} ({r[n]['margin_there']})")
    row("seeded draft-model = plain", lambda r: "yes" if r["seeded"]["equal"] else f"no at {r['seeded']['first_divergence']}")
    row("host ms per sampled token, top-p 0.9", lambda r: f"{r['host_sampling_ms_top_p']:.2f}")
    console.print(table)
    for r in failed:
        console.print(f"[red]{r['dtype']} failed:[/] {r['error']}")


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--smoke", action="store_true", help="the tiny models on this machine's CPU, in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bf16,fp32,bf16+graphs",
                        help="columns: a dtype, or a dtype+graphs (fixed-shape passes, CUDA graphs on a GPU)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.smoke:
        args.scale, args.device = "tiny", "cpu"
    header = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "scale": args.scale, "prompt tokens": PROMPT_TOKENS,
              "new tokens": args.new_tokens}
    t0 = time.perf_counter()
    results = [check_mode(args.scale, args.device, d, args.new_tokens, args.repeats) for d in args.dtypes.split(",")]
    header["seconds"] = round(time.perf_counter() - t0, 1)
    print_table(results, header)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "device_check.json").write_text(json.dumps({"header": header, "results": results}, indent=1))


if __name__ == "__main__":
    main()
