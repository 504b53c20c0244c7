"""What `verispec demo` prints from a bench run: one table that fits 80 columns, a legend for the names too long
for it, why the best speculative mode came out as it did, and the rows that failed."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .methods import BASELINE

# Short enough that the table, borders included, fits 80 columns; the legend says what each stands for.
SHORT_NAMES = {BASELINE: "plain", "ngram": "n-gram", "draft": "draft", "auto": "auto"}
COLUMNS = ("method", "tok/s", "vs plain", "vs llama.cpp", "accept", "tok/pass", "same text")
REFERENCE = "llama.cpp"


def print_demo(results: dict, out: Console) -> list[str]:
    """Print the table, its legend, the 'Why' line and any failures; return the failures."""
    out.print(table(results))
    for line in legend(results):
        out.print(line, style="dim", highlight=False)
    out.print(why_line(results))
    failed = failures(results)
    for line in failed:
        out.print(f"[bold red]FAILED:[/] {line}", highlight=False)
    return failed


def table(results: dict) -> Table:
    ref = results.get("llama_cpp") or {}
    vs_llama = ref.get("ratios", {})
    grid = Table(title=f"{results['target']['name']}, {results['config']['max_new_tokens']} new tokens, greedy")
    for col in COLUMNS:
        grid.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in results["summary"]:
        speculative = r["method"] != BASELINE
        ratio = vs_llama.get(r["method"], {}).get("speed")
        grid.add_row(_name(r["method"]), _f(r["tokens_per_s"], ".1f"), _f(r["speedup"], ".2f", "x"), _f(ratio, ".2f", "x"),
                     _f(r["acceptance_rate"], ".0%") if speculative and r["drafted"] else "–",
                     _f(r["mean_accepted_length"], ".2f"), _same_text(r) if speculative else "")
    if ref:
        tps = sorted(x["tokens_per_s"] for x in ref["records"].values() if x["tokens_per_s"] is not None)
        grid.add_row(REFERENCE, _f(tps[len(tps) // 2] if tps else None, ".1f"), "", "1.00x", "–", "1.00", "")
    return grid


def legend(results: dict) -> list[str]:
    """What the short names stand for, a few to a line, so that a line breaks between them."""
    return [f"draft = draft model {results['config']['draft']}; n-gram = prompt lookup",
            f"auto = a matching draft model, else n-gram; {REFERENCE} = llama-server, plain",
            "accept = drafted tokens accepted; tok/pass = tokens kept per target pass"]


def failures(results: dict) -> list[str]:
    """A method that wrote nothing, a speculative method whose text is not plain decoding's, a reference that
    was asked for and did not run."""
    failed = []
    for r in results["summary"]:
        if not r["tokens"]:
            failed.append(f"{_name(r['method'])} wrote no tokens")
        elif r["method"] != BASELINE and r["mismatches"]:
            first = min(rec["divergence"]["index"] for rec in results["records"]
                        if rec["method"] == r["method"] and rec["divergence"])
            failed.append(f"{_name(r['method'])}'s text differs from plain decoding's from token {first}")
    if results["config"].get("reference") and not results.get("llama_cpp"):
        failed.append(f"the {REFERENCE} reference did not run (why: above the table)")
    return failed


def why_line(results: dict) -> str:
    """Why the best speculative mode came out as it did: what its drafting steps kept against what they cost."""
    from ..cost_model import ratio_at

    r = {int(k): v for k, v in results["verify_cost"]["ratio"].items()}
    measured = ", ".join(f"T({n})/T(1) = {v:.2f}" for n, v in sorted(r.items()) if n > 1)
    best = max((x for x in results["summary"] if x["method"] != BASELINE), key=lambda x: x["speedup"] or 0)
    mine = [rec for rec in results["records"] if rec["method"] == best["method"]]
    steps = sum(rec["target_passes"] for rec in mine)
    drafting = sum((rec["drafted_at_position"] or [0])[0] for rec in mine)  # steps that drafted 1+ tokens
    if not drafting:
        return (f"Why: on this machine a pass over K+1 tokens costs nearly K+1 one-token passes (measured: {measured}), "
                "and the drafters' acceptance did not cover that, so the adaptive K stayed at 0: plain decoding's speed.")
    k = max(1, round(sum(rec["drafted"] for rec in mine) / drafting))
    cost = ratio_at(r, k + 1)
    kept = 1 + sum(rec["accepted"] for rec in mine) / drafting
    return (f"Why: on this machine one pass over {k + 1} tokens costs {cost:.2f}x a one-token pass (measured: {measured}). "
            f"{_name(best['method'])} drafted on {drafting} of its {steps} steps, about {k} tokens each, and those steps "
            f"kept {kept:.2f} tokens each against their {cost:.2f}x cost; the other steps ran as plain decoding. Every "
            "speculative output above is checked token for token against plain decoding.")


def _name(method: str) -> str:
    return SHORT_NAMES.get(method, method)


def _same_text(row: dict) -> str:
    if row["mismatches"] is None:
        return "–"  # sampled, not greedy: no single text to compare
    return "NO" if row["mismatches"] else "yes"


def _f(x: float | None, fmt: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{suffix}"
