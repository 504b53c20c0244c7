"""PNG plots for the report (matplotlib, Agg backend): each function writes one file and returns its name."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..cost_model import prior_ratio  # noqa: E402
from .methods import BASELINE  # noqa: E402


def write_all(results: dict, out: Path) -> list[tuple[str, str]]:
    """(title, file name) of every plot written."""
    plots = []
    for title, fn in (("Speedup per category", speedup_by_category), ("Acceptance by draft position", acceptance_by_position),
                      ("Tokens/s against fixed draft length K", tokens_per_s_vs_k), ("Verify cost T(K)/T(1)", verify_cost),
                      ("Tokens/s against tree budget", tokens_per_s_vs_budget)):
        name = fn(results, out)
        if name:
            plots.append((title, name))
    return plots


def speedup_by_category(results: dict, out: Path) -> str | None:
    cats = sorted(results["per_category"])
    methods = [m for m in results["config"]["methods"] if m != BASELINE]
    if not cats or not methods:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) * max(1, len(methods) / 2)), 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ys = [(results["per_category"][c].get(m) or {}).get("speedup") or 0.0 for c in cats]
        ax.bar([i + (j - (len(methods) - 1) / 2) * width for i in range(len(cats))], ys, width, label=m)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(cats)), cats, rotation=20)
    ax.set_ylabel("speedup over ar (median of per-prompt ratios)")
    ax.set_title("Speedup per category")
    ax.legend(fontsize=8)
    return _save(fig, out, "speedup_by_category.png")


def acceptance_by_position(results: dict, out: Path) -> str | None:
    curves = {m: c for m, c in results["acceptance_by_position"].items() if c}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, marker="o", label=m)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft position")
    ax.set_ylabel("fraction of drafted tokens accepted")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by draft position")
    ax.legend(fontsize=8)
    return _save(fig, out, "acceptance_by_position.png")


def tokens_per_s_vs_k(results: dict, out: Path) -> str | None:
    fixed = results["fixed_k"]
    if not fixed:
        return None
    rows = {r["method"]: r for r in results["summary"]}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for family in sorted({f["family"] for f in fixed.values()}):
        points = sorted((f["k"], rows[m]["tokens_per_s"] or 0.0) for m, f in fixed.items() if f["family"] == family)
        line = ax.plot([k for k, _ in points], [y for _, y in points], marker="o", label=f"{family}, fixed K")[0]
        if family in rows and rows[family]["tokens_per_s"]:
            ax.axhline(rows[family]["tokens_per_s"], color=line.get_color(), linestyle=":", label=f"{family}, adaptive K")
    if rows.get(BASELINE, {}).get("tokens_per_s"):
        ax.axhline(rows[BASELINE]["tokens_per_s"], color="black", linestyle="--", label="ar")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft length K")
    ax.set_ylabel("tokens/s (median over prompts)")
    ax.set_title("Tokens/s against draft length")
    ax.legend(fontsize=8)
    return _save(fig, out, "tokens_per_s_vs_k.png")


def tokens_per_s_vs_budget(results: dict, out: Path) -> str | None:
    """One line per (drafter, tree kind) run at several fixed budgets; budget 0 is the chain."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in results["summary"]:
        if r.get("tree") and r.get("tree_budget") is not None and r["tokens_per_s"]:
            curves.setdefault(f"{r['family']}, {r['tree']}", []).append((r["tree_budget"], r["tokens_per_s"]))
    curves = {label: sorted(points) for label, points in curves.items() if len(points) >= 2}
    if not curves:
        return None
    rows = {r["method"]: r for r in results["summary"]}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, points in curves.items():
        ax.plot([b for b, _ in points], [y for _, y in points], marker="o", label=label)
    if rows.get(BASELINE, {}).get("tokens_per_s"):
        ax.axhline(rows[BASELINE]["tokens_per_s"], color="black", linestyle="--", label="ar")
    ax.set_xlabel("tree budget (drafted nodes per pass; 0 = chain)")
    ax.set_ylabel("tokens/s (median over prompts)")
    ax.set_title("Tokens/s against tree budget")
    ax.legend(fontsize=8)
    return _save(fig, out, "tokens_per_s_vs_budget.png")


def verify_cost(results: dict, out: Path) -> str | None:
    v = results.get("verify_cost")
    if not v:
        return None
    ks = [int(k) for k in v["ks"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(ks, [_get(v["ratio"], k) for k in ks], marker="o", label="as verification runs it")
    if "single_pass_ratio" in v:
        ax.plot(ks, [_get(v["single_pass_ratio"], k) for k in ks], marker="s", label="one unchunked pass")
    ax.plot(ks, [prior_ratio(k) for k in ks], linestyle=":", label="prior: Qwen 1.5B, llama-bench (cost_model.py)")
    ax.plot(ks, ks, color="gray", linewidth=0.8, label="K sequential passes")
    ax.set_xlabel("tokens per pass K")
    ax.set_ylabel("T(K) / T(1)")
    ax.set_title(f"Verify cost of {results['target']['name']}")
    ax.legend(fontsize=8)
    return _save(fig, out, "verify_cost.png")


def _get(d: dict, k: int) -> float:
    return d.get(k, d.get(str(k)))


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
