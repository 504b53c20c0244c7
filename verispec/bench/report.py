"""report.md and the console table, from the results dict that results.json also holds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..cost_model import prior_ratio
from . import formats
from .methods import BASELINE


def markdown(results: dict, plots: list[tuple[str, str]]) -> str:
    env, cfg = results["environment"], results["config"]
    lines = [
        "# verispec bench",
        "",
        f"{env['date']} · {env['cpu']} · {env['cores']} cores ({env['cores_available']} available) · "
        f"{env['threads']} threads · commit `{env['commit']}`",
        "",
        f"Target `{results['target']['name']}` on the {results['target'].get('runner', 'llamacpp')} runner, "
        f"draft `{cfg['draft']}`, methods {', '.join(cfg['methods'])}; "
        f"{cfg['prompt_count']} prompts from `{cfg['prompts']}`"
        + (f" (categories {', '.join(cfg['categories'])})" if cfg.get("categories") else "")
        + f"; {cfg['max_new_tokens']} new tokens at most per turn, temperature {cfg['temperature']}.",
        "",
    ]
    if env["load_before"][0] > env["busy_threshold"]:
        lines += [f"> **Warning:** the load average was {env['load_before'][0]} before the run (above "
                  f"{env['busy_threshold']}). Other processes competed for the CPU; ggml's threads spin, so these "
                  "numbers are skewed. Rerun on a quiet machine.", ""]
    lines += _seeds_table(results) + _reference(results) + _category_table(results) + _drafting_cost(results) + _trees(results) + _plots(plots) + _verify_cost(results) + _noise(results)
    lines += formats.markdown(results)
    lines += _memory(results) + _lossless(results) + _per_prompt(results) + _peers(results) + _environment(results)
    return "\n".join(lines) + "\n"


def print_summary(results: dict, console: Console) -> None:
    table = Table(title=f"verispec bench: {results['target']['name']} ({results['config']['prompt_count']} prompts)")
    for col in ("method", "tokens/s", "speedup", "acceptance", "mean accepted length", "mean K", "mismatches (unexplained)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results["summary"]:
        table.add_row(r["method"], _f(r["tokens_per_s"], ".1f"), _f(r["speedup"], ".2f", "x"),
                      _pct(r["acceptance_rate"]) if r["method"] != BASELINE else "–",
                      _f(r["mean_accepted_length"], ".2f"), _f(r["mean_draft_length"], ".1f"), _mismatch(r))
    console.print(table)
    ref = results.get("llama_cpp")
    if ref:
        for method, r in ref["ratios"].items():
            console.print(f"{method}: {_f(r['speed'], '.2f', 'x')} of llama.cpp's own plain decoding (lowest prompt "
                          f"{_f(r['speed_min'], '.2f', 'x')})" + (f", time to first token {_f(r['ttft'], '.2f', 'x')} of "
                                                                  "llama.cpp's" if method == BASELINE else ""))
    for line in formats.console_lines(results):
        console.print(line)
    for p in results["peers"]:
        if "skipped" in p:
            console.print(f"peer {p['peer']}: skipped ({p['skipped']})")
            continue
        for r in p["summary"]:
            console.print(f"peer {p['peer']} {r['variant']}: {_f(r['tokens_per_s'], '.1f')} tokens/s ({p['timing']}), "
                          f"{_f(r['speedup_vs_own_plain'], '.2f', 'x')} of its own plain, "
                          f"{_f(r['ratio_vs_verispec_ar'], '.2f', 'x')} of verispec ar")


def _seeds_table(results: dict) -> list[str]:
    rows = {r["method"]: r for r in results["summary"]}
    base = rows[BASELINE]["tokens_per_s"]
    out = [
        "## Results",
        "",
        "| target | method | drafter | baseline tokens/s | speculative tokens/s | speedup (min–max) | draft parameters | "
        "draft file bytes | acceptance rate | mean accepted length | mean K | mismatches (unexplained) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        d = results["drafts"].get(r["method"]) or {}
        spread = f" ({_f(r['speedup_min'], '.2f')}–{_f(r['speedup_max'], '.2f')})" if r["method"] != BASELINE else ""
        out.append(
            f"| {results['target']['name']} | {r['method']} | {d.get('drafter', '–')} | {_f(base, '.1f')} | "
            f"{_f(r['tokens_per_s'], '.1f')} | {_f(r['speedup'], '.2f', 'x')}{spread} | {_count(d.get('parameters'))} | "
            f"{_bytes(d.get('file_bytes'))} | {_pct(r['acceptance_rate']) if r['method'] != BASELINE else '–'} | "
            f"{_f(r['mean_accepted_length'], '.2f')} | {_f(r['mean_draft_length'], '.1f')} | {_mismatch(r)} |"
        )
    out += [
        "",
        "Tokens/s are decode tokens/s (prefill excluded), medians over prompts. Speedup is the median of per-prompt "
        "ratios against `ar` on the same prompt in this run, with the smallest and largest ratio. Acceptance rate = "
        "accepted / drafted tokens; mean accepted length = tokens gained per target pass, the target's own token "
        "included; mean K = mean draft length per pass. Every method records top-2 logit margins per emitted token "
        "(for the losslessness check), which costs the same per token in all methods.",
        "",
    ]
    bounds = [r for r in results["summary"] if r.get("bound_speedup")]
    if bounds:
        out += ["Bound: the best speedup any fixed K could give with the method's measured per-token acceptance a "
                "and draft cost per token, and the measured verify costs T(K+1) below (the draft-length chooser's "
                "model, cost_model.py).", "",
                "| method | per-token acceptance a | draft ms/token | best K | bound | reached |", "|---|---|---|---|---|---|"]
        for r in bounds:
            reached = r["speedup"] / r["bound_speedup"] if r["speedup"] else None
            out.append(f"| {r['method']} | {r['acceptance_per_token']:.2f} | {r['draft_seconds_per_token'] * 1e3:.2f} | "
                       f"{r['bound_k']} | {r['bound_speedup']:.2f}x | {_pct(reached)} |")
        out.append("")
    notes = [f"- {d['note']}" for d in results["drafts"].values() if d and d.get("note")]
    return out + (notes + [""] if notes else [])


def _category_table(results: dict) -> list[str]:
    methods = [m for m in results["config"]["methods"] if m != BASELINE]
    if not methods:
        return []
    out = ["## Per category", "", "Speedup (median of per-prompt ratios) / mean accepted length / acceptance rate.", "",
           "| category | prompts | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for cat, per in sorted(results["per_category"].items()):
        cells = []
        for m in methods:
            r = per.get(m)
            cells.append(f"{_f(r['speedup'], '.2f', 'x')} / {_f(r['mean_accepted_length'], '.2f')} / "
                         f"{_pct(r['acceptance_rate'])}" if r else "–")
        n = per.get(BASELINE, {}).get("prompts", "")
        out.append(f"| {cat} | {n} | " + " | ".join(cells) + " |")
    return out + [""]


def _drafting_cost(results: dict) -> list[str]:
    rows = [r for r in results["summary"] if r["method"] != BASELINE and r.get("draft_ms_per_step") is not None]
    if not rows:
        return []
    out = ["## Drafting cost", "", "Drafting time per target pass (every step, drafted or not) and its share of the time "
           "spent drafting and verifying.", "", "| method | draft ms per step | share of step time |", "|---|---|---|"]
    for r in rows:
        total = r["draft_seconds"] + r["verify_seconds"]
        out.append(f"| {r['method']} | {r['draft_ms_per_step']:.3f} | {_pct(r['draft_seconds'] / total if total else None)} |")
    return out + [""]


def _trees(results: dict) -> list[str]:
    """Tree, cascade, prefix and lossy rows: what each verified per pass and where accepted tokens came from."""
    rows = [r for r in results["summary"]
            if r.get("tree") or r.get("acceptance", "exact") != "exact" or r.get("family") == "cascade"]
    if not rows:
        return []
    out = ["## Trees, cascades and prefixes", "",
           "Nodes per pass = tokens the target scores in one verification pass (root included). "
           "Accepted by level: accepted / drafted tokens per drafter.", "",
           "| method | tokens/s | speedup | acceptance | mean accepted length | nodes per pass | accepted by level | budgets used |",
           "|---|---|---|---|---|---|---|---|"]
    records = results["records"]
    for r in rows:
        levels = ", ".join(f"{s} {r['accepted_by_source'].get(s, 0)}/{n}" for s, n in r.get("drafted_by_source", {}).items())
        budgets = [b for rec in records if rec["method"] == r["method"] for b in rec.get("tree_budgets", [])]
        used = ", ".join(f"{b}: {budgets.count(b)}" for b in sorted(set(budgets))) if budgets else "–"
        out.append(f"| {r['method']} | {_f(r['tokens_per_s'], '.1f')} | {_f(r['speedup'], '.2f', 'x')} | "
                   f"{_pct(r['acceptance_rate'])} | {_f(r['mean_accepted_length'], '.2f')} | "
                   f"{_f(r.get('nodes_per_pass'), '.1f')} | {levels or '–'} | {used} |")
    lossy = [r for r in rows if r.get("quality_vs_ar")]
    if lossy:
        out += ["", "**Lossy (opt-in) acceptance: its quality cost against exact greedy output (`ar`).**", "",
                "| method | identical outputs | token agreement with ar |", "|---|---|---|"]
        for r in lossy:
            q = r["quality_vs_ar"]
            out.append(f"| {r['method']} | {q['identical']}/{q['prompts']} | {_pct(q['token_agreement'])} |")
    return out + [""]


def _plots(plots: list[tuple[str, str]]) -> list[str]:
    out = []
    for title, name in plots:
        out += [f"### {title}", "", f"![{title}]({name})", ""]
    return out


def _reference(results: dict) -> list[str]:
    ref = results.get("llama_cpp")
    if not ref:
        return ["## Against llama.cpp", "", "Not measured: llama-server is not built (`make llama-tools`).", ""]
    records = list(ref["records"].values())
    tps = sorted(r["tokens_per_s"] for r in records if r["tokens_per_s"])
    cats = sorted({c for r in ref["ratios"].values() for c in r["by_category"]})
    out = ["## Against llama.cpp", "",
           f"llama.cpp's own plain decoding ran on every prompt right after the methods: {ref['configuration']} "
           f"Median {tps[len(tps) // 2]:.1f} decode tokens/s. Its greedy output equalled verispec `ar`'s on "
           f"{sum(r['matches_ar'] for r in records)} of {len(records)} prompts. Each ratio is the median over prompts "
           "of the method's decode tokens/s over llama.cpp's on the same prompt: the speed users feel against "
           "llama.cpp itself.", "",
           "| method | vs llama.cpp plain (lowest prompt) | " + " | ".join(cats) + " | time to first token vs llama.cpp |",
           "|---|---|" + "---|" * len(cats) + "---|"]
    for method, r in ref["ratios"].items():
        by_cat = " | ".join(_f(r["by_category"].get(c), ".2f", "x") for c in cats)
        ttft = _f(r["ttft"], ".2f", "x") if method == BASELINE else ""
        out.append(f"| {method} | {_f(r['speed'], '.2f', 'x')} ({_f(r['speed_min'], '.2f', 'x')}) | {by_cat} | {ttft} |")
    return out + [""]


def _verify_cost(results: dict) -> list[str]:
    v = results.get("verify_cost")
    if not v:
        return []
    single = "single_pass_ratio" in v
    # The runner's prior curve is the one the chooser used (older results name only the verify mode).
    mode = results.get("target", {}).get("cost_curve") or results["config"].get("verify", "exact")
    out = ["## Verify cost of the target", "",
           f"Median of 5 timed `runner.forward` passes over K tokens (all logits) after the first prompt, rolled back "
           f"after each. " + (f"The llama.cpp runner scores in exact chunks of {v['exact_chunk']} tokens (bit-identical "
                              "to single-token passes); \"one pass\" is the same K tokens in one unchunked batch. "
                              if single else ""),
           "",
           "| K | T(K) ms | T(K)/T(1) |" + (" one pass T(K) ms | one pass T(K)/T(1) |" if single else "")
           + f" prior T(K)/T(1), {mode} (cost_model.py) |",
           "|---|---|---|" + ("---|---|" if single else "") + "---|"]
    for k in v["ks"]:
        row = f"| {k} | {_get(v['seconds'], k) * 1e3:.1f} | {_get(v['ratio'], k):.2f} |"
        if single:
            row += f" {_get(v['single_pass_seconds'], k) * 1e3:.1f} | {_get(v['single_pass_ratio'], k):.2f} |"
        out.append(row + f" {prior_ratio(int(k), mode):.2f} |")
    return out + [""]


def _noise(results: dict) -> list[str]:
    noise = results.get("noise")
    if not noise:
        return []
    cfg = results["config"]
    out = ["## Numerical noise between pass shapes", "",
           "The largest |logit difference| between a token scored inside a K-row pass and the same token scored "
           "alone, after a short and a long context. It is the tolerance of the losslessness check below "
           f"(the run's verify mode: `{cfg.get('verify', 'exact')}`, tolerance {cfg['tie_tolerance']:g}). "
           "`exact` scores in passes of at most 64 rows on the batch-invariant build (3 on another), with attention split by the cells each row sees (verispec's ggml patches), and must read 0 at every context length; `one-pass` is one "
           "unchunked batch (lossless in distribution, not bit-identical).", ""]
    ks = sorted({int(k) for m in noise.values() for per_k in m["by_context"].values() for k in per_k})
    out += ["| mode | context tokens | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for mode, m in noise.items():
        for ctx, per_k in m["by_context"].items():
            out.append(f"| {mode} | {ctx} | " + " | ".join(f"{_get(per_k, k):.3g}" for k in ks) + " |")
    return out + [""]


def _memory(results: dict) -> list[str]:
    mem = results["memory"]
    target = mem.get("target", {}).get("VmHWM")
    out = ["## Peak memory", "",
           "Peak resident memory (VmHWM from /proc/self/status) of the bench process, read after each model's "
           "warm-up, so the weights it touches are resident.", "",
           "| stage | peak RSS | over target alone |", "|---|---|---|",
           f"| process before loading the target (current RSS) | {_mb(mem.get('before_load', {}).get('VmRSS'))} | |",
           f"| target alone | {_mb(target)} | |"]
    for key, m in mem.items():
        if key.startswith("with ") and target:
            out.append(f"| target + draft {key[5:]} | {_mb(m.get('VmHWM'))} | +{(m['VmHWM'] - target) / target:.0%} |")
    return out + [""]


def _lossless(results: dict) -> list[str]:
    cfg = results["config"]
    out = ["## Losslessness", ""]
    if cfg["temperature"] != 0:
        return out + ["Not checked: outputs are compared with `ar` only at temperature 0.", ""]
    out += [f"Every method's greedy output is compared token for token with `ar`'s on the same prompt (all turns). "
            f"A divergence is a numerical tie when `ar`'s top-1 minus top-2 logit margin at the first differing token "
            f"is below {cfg['tie_tolerance']:g} (the pass-shape noise measured above, unless set by hand); any other "
            "divergence is unexplained, i.e. a bug.", "",
            "| method | prompts | mismatches | unexplained mismatches |", "|---|---|---|---|"]
    for r in results["summary"]:
        if r["method"] != BASELINE:
            lossy = " (lossy by choice)" if r.get("lossy") else ""
            out.append(f"| {r['method']}{lossy} | {r['prompts']} | {r['mismatches']} | {r['unexplained_mismatches']} |")
    diverged = [r for r in results["records"] if r.get("divergence")]
    if diverged:
        out += ["", "| method | prompt | turn | first differing token | ar margin there | tie |", "|---|---|---|---|---|---|"]
        for r in diverged:
            d = r["divergence"]
            out.append(f"| {r['method']} | {r['prompt_id']} | {d['turn'] + 1} | {d['index']} | "
                       f"{_f(d['ar_margin'], '.4g')} | {'yes' if d['tie'] else '**no**'} |")
    return out + [""]


def _per_prompt(results: dict) -> list[str]:
    methods = [m for m in results["config"]["methods"] if m != BASELINE]
    recs = {(r["prompt_id"], r["method"]): r for r in results["records"]}
    prompts = list(dict.fromkeys(r["prompt_id"] for r in results["records"]))
    out = ["## Per prompt", "", "`ar` tokens/s, then each method's tokens/s as a ratio of `ar`'s on the same prompt.", "",
           "| prompt | category | tokens (ar) | ar tokens/s | " + " | ".join(methods) + " |",
           "|---|---|---|---|" + "---|" * len(methods)]
    for pid in prompts:
        ar = recs[(pid, BASELINE)]
        cells = []
        for m in methods:
            r = recs.get((pid, m))
            ratio = r["tokens_per_s"] / ar["tokens_per_s"] if r and r["tokens_per_s"] and ar["tokens_per_s"] else None
            cells.append(_f(ratio, ".2f", "x"))
        out.append(f"| {pid} | {ar['category']} | {ar['tokens']} | {_f(ar['tokens_per_s'], '.1f')} | " + " | ".join(cells) + " |")
    return out + [""]


def _peers(results: dict) -> list[str]:
    if not results["peers"]:
        return []
    out = ["## Peers", "", "Run after verispec's methods, on the same prompts rendered with the same chat template; "
           "each peer's variants interleaved per prompt after one warm-up each.", ""]
    for p in results["peers"]:
        out.append(f"### {p['peer']}")
        out.append("")
        if "skipped" in p:
            out += [f"Skipped: {p['skipped']}", ""]
            continue
        out += [p["configuration"], "",
                f"Tokens/s are {p['timing']}; the ratio to verispec `ar` compares with `ar` timed the same way on the "
                f"same {'turns' if p['multi_turn'] else 'first turns'}. Greedy outputs are compared with the peer's "
                "own plain variant, and with verispec `ar` (in brackets: divergences where `ar`'s margin is at or above "
                "the tie tolerance). A peer runs other kernels and context settings, so differences from verispec `ar` "
                "measure cross-implementation numerics, not a verispec bug.", "",
                "| variant | tokens/s | speedup vs its own plain | ratio vs verispec ar | differs from its own plain | "
                "differs from verispec ar (above tolerance) |",
                "|---|---|---|---|---|---|"]
        for r in p["summary"]:
            mm = "–" if r["mismatches_vs_ar"] is None else f"{r['mismatches_vs_ar']} ({r['unexplained_mismatches_vs_ar']})"
            own = "–" if r["mismatches_vs_own_plain"] is None else str(r["mismatches_vs_own_plain"])
            out.append(f"| {r['variant']} | {_f(r['tokens_per_s'], '.1f')} | {_f(r['speedup_vs_own_plain'], '.2f', 'x')} | "
                       f"{_f(r['ratio_vs_verispec_ar'], '.2f', 'x')} | {own} | {mm} |")
        out.append("")
    return out


def _environment(results: dict) -> list[str]:
    env = results["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return ["## Environment", "",
            f"- CPU: {env['cpu']}, {env['cores']} cores ({env['cores_available']} available to the process); "
            f"{env['threads']} threads for the target",
            f"- {env['platform']}, Python {env['python']}; {versions}",
            f"- commit `{env['commit']}`; OMP_WAIT_POLICY={env['omp_wait_policy']}",
            _pages(env, results.get("memory", {})),
            f"- load average (1, 5, 15 min) before {env['load_before']}, after {env['load_after']}",
            ""]


def _pages(env: dict, mem: dict) -> str:
    pages = env.get("huge_pages") or {}
    backed = mem.get("target", {}).get("AnonHugePages")
    asked = "glibc asked for huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`)" if pages.get("requested") \
        else "glibc's default pages (no `glibc.malloc.hugetlb`)"
    held = f", {_mb(backed)} of the process on huge pages with the target loaded" if backed is not None else ""
    peers = ("the same pages (VERISPEC_PEER_HUGE_PAGES=1)" if pages.get("peers") else
             "glibc's default pages, as users run them")
    return (f"- memory: {asked}, transparent huge pages `{pages.get('thp_mode')}`{held}; llama.cpp's own programs "
            f"ran with {peers} (verispec/huge_pages.py)")


def _get(d: dict, k):
    return d[k] if k in d else d[str(k)]


def _f(x, fmt: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{suffix}"


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def _count(n) -> str:
    if n is None:
        return "–"
    if n == 0:
        return "0"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n) -> str:
    if n is None:
        return "–"
    return "0" if n == 0 else f"{n:,} ({n / 1e6:,.0f} MB)"


def _mb(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def _mismatch(r: dict) -> str:
    if r.get("lossy"):
        return "lossy (opt-in)"
    if r["method"] == BASELINE or r["mismatches"] is None:
        return "–"
    return f"{r['mismatches']} ({r['unexplained_mismatches']})"
