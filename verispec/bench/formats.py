"""Verification-friendly formats: the target requantized by llama.cpp (Q4_0, Q8_0), its verify cost and quality.

For each format the bench opens the derived file alone (after the shipped model is closed) and records
(a) its verify-cost curve T(K)/T(1), in exact chunks and as one unchunked pass, and (b) its top-1 agreement
with the shipped target: both models are teacher-forced on the shipped target's `ar` outputs and their
next-token argmax is compared at every position from the last prompt token on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.console import Console

from ..errors import VerispecError
from ..models import quantize
from . import verify_cost
from ..prompts import BenchPrompt

SEGMENT = 256  # teacher-forced scoring goes in unchunked passes of at most this many tokens (< n_batch)


def parse(formats: str | Sequence[str] | None) -> list[str]:
    """'q4_0,q8_0' -> ['q4_0', 'q8_0']; '' -> []; an unknown name raises InvalidParameter."""
    if not formats:
        return []
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    return list(dict.fromkeys(quantize.check_format(f) for f in items if f.strip()))


def reference(model, prompts: list[BenchPrompt], ar: dict, context: list[int], names: list[str],
              console: Console) -> dict | None:
    """The teacher-forced sequences (each turn of `ar`) and the shipped target's argmax along them."""
    source = getattr(model.target, "source", None)
    if not names:
        return None
    if source is None or source.kind != "gguf" or not hasattr(model.target, "exact_chunk"):
        return {"skipped": "the target is not a GGUF model on the llama.cpp runner"}
    sequences = []
    for prompt in prompts:
        conv = ar.get(prompt.id)
        if conv is None:
            continue
        messages: list[dict] = []
        for text, turn in zip(prompt.turns, conv.turns):
            messages.append({"role": "user", "content": text})
            sequences.append((model.prompt_tokens(messages=messages), list(turn.tokens)))
            messages.append({"role": "assistant", "content": model.tokenizer.decode(turn.tokens)})
    with console.status("scoring ar's outputs with the shipped target (for the format comparison)"):
        argmax = [teacher_forced_argmax(model.target, p, o) for p, o in sequences]
    return {"source": source, "context": context, "sequences": sequences, "argmax": argmax}


def teacher_forced_argmax(runner, prompt: Sequence[int], output: Sequence[int]) -> list[int]:
    """Argmax of the logits after prompt[-1] and after each output token, from unchunked passes.

    Unchunked (one batched pass per segment) because this measures the format, not batch-invariance,
    and it is several times faster than exact chunks; the shipped and the derived model are scored alike.
    """
    saved = runner.exact_chunk
    runner.reset()
    runner.exact_chunk = 0
    try:
        if len(prompt) > 1:
            runner.forward(list(prompt[:-1]), all_logits=False)
        scored = list(prompt[-1:]) + list(output)
        out = []
        for start in range(0, len(scored), SEGMENT):
            rows = runner.forward(scored[start : start + SEGMENT])
            out += np.argmax(rows, axis=1).tolist()
        return out
    finally:
        runner.exact_chunk = saved
        runner.reset()


def measure(ref: dict | None, names: list[str], config, runner_options: dict, console: Console) -> list[dict]:
    """One result per format: file, verify cost, top-1 agreement; or `skipped` with the reason."""
    from ..runners.llamacpp import LlamaCppRunner

    if not names or ref is None:
        return []
    if "skipped" in ref:
        return [{"format": name, "skipped": ref["skipped"]} for name in names]
    results = []
    for name in names:
        try:
            with console.status(f"requantizing {ref['source'].label} to {name} (cached after the first time)"):
                source = quantize.requantize(ref["source"], name)
            with console.status(f"measuring {source.label}: verify cost and top-1 agreement"):
                runner = LlamaCppRunner(source, **runner_options)
                try:
                    verify = verify_cost.measure(runner, config.verify_ks, ref["context"])
                    argmax = [teacher_forced_argmax(runner, p, o) for p, o in ref["sequences"]]
                finally:
                    runner.close()
        except Exception as exc:  # a format failing must not lose the bench's results
            reason = str(exc) if isinstance(exc, VerispecError) else f"failed: {type(exc).__name__}: {exc}"
            console.print(f"[yellow]format {name} skipped:[/] {reason}")
            results.append({"format": name, "skipped": reason})
            continue
        positions = sum(len(a) for a in ref["argmax"])
        agree = sum(int(x == y) for a, b in zip(ref["argmax"], argmax) for x, y in zip(a, b))
        results.append({
            "format": name, "label": source.label, "path": str(source.path), "file_bytes": source.file_bytes,
            "verify_cost": verify, "top1_agreement": agree / positions if positions else None, "positions": positions,
            "sequences": len(ref["sequences"]),
        })
    return results


# -- report -------------------------------------------------------------------------------------


def markdown(results: dict) -> list[str]:
    rows = results.get("formats") or []
    if not rows:
        return []
    shipped = results.get("verify_cost")
    ks = [k for k in (shipped or {}).get("ks", []) if int(k) != 1] or [2, 4, 8, 16]
    out = ["## Verification-friendly formats", "",
           "The target requantized with llama.cpp's own `llama_model_quantize` (from the shipped file, "
           "`allow_requantize`), each measured alone after the bench. T(K)/T(1) cells are *exact chunks / one "
           "pass* (as in the verify-cost section). Top-1 agreement: both the shipped and the derived model are "
           "teacher-forced on the shipped model's `ar` outputs (every turn) and their next-token argmax is compared "
           "at each position from the last prompt token on, scored in unchunked passes.", "",
           "| format | file bytes | T(1) ms | " + " | ".join(f"T({k})/T(1)" for k in ks) + " | top-1 agreement (positions) |",
           "|---|---|---|" + "---|" * len(ks) + "---|"]
    if shipped:
        out.append(f"| shipped ({results['target']['name']}) | {_bytes(results['target'].get('file_bytes'))} | "
                   f"{_get(shipped['seconds'], 1) * 1e3:.1f} | " + " | ".join(_ratio_cell(shipped, k) for k in ks)
                   + " | (reference) |")
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['format']} | skipped: {r['skipped']} |" + " |" * (len(ks) + 2))
            continue
        v = r["verify_cost"]
        agree = "–" if r["top1_agreement"] is None else f"{r['top1_agreement']:.1%} ({r['positions']})"
        out.append(f"| {r['label']} | {_bytes(r['file_bytes'])} | {_get(v['seconds'], 1) * 1e3:.1f} | "
                   + " | ".join(_ratio_cell(v, k) for k in ks) + f" | {agree} |")
    return out + [""]


def console_lines(results: dict) -> list[str]:
    lines = []
    for r in results.get("formats") or []:
        if "skipped" in r:
            lines.append(f"format {r['format']}: skipped ({r['skipped']})")
            continue
        v = r["verify_cost"]
        k_max = max(v["ks"])
        agree = "–" if r["top1_agreement"] is None else f"{r['top1_agreement']:.1%}"
        lines.append(f"format {r['label']}: T(1) {_get(v['seconds'], 1) * 1e3:.1f} ms, "
                     f"T({k_max})/T(1) {_ratio_cell(v, k_max)} (exact chunks / one pass), "
                     f"top-1 agreement {agree} over {r['positions']} positions")
    return lines


def _ratio_cell(v: dict, k) -> str:
    cell = f"{_get(v['ratio'], k):.2f}"
    if "single_pass_ratio" in v:
        cell += f" / {_get(v['single_pass_ratio'], k):.2f}"
    return cell


def _get(d: dict, k):
    return d[k] if k in d else d[str(k)]


def _bytes(n) -> str:
    return "–" if n is None else f"{n:,} ({n / 1e6:,.0f} MB)"
