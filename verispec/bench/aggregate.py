"""From conversations to numbers: one record per prompt x method, medians and per-prompt ratios per method.

Speedups are medians of per-prompt ratios against `ar` on the same prompt in the same run, so
a prompt that is slow for every method weighs no more than any other.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable

from . import lossless
from .conversation import Conversation
from .methods import BASELINE


def record(conv: Conversation) -> dict:
    stats = [t.stats for t in conv.turns if t.stats is not None]
    generated = sum(len(t.tokens) for t in conv.turns)
    wall = sum(t.wall_seconds for t in conv.turns)
    decode = sum(s.decode_seconds for s in stats)
    drafted = sum(s.drafted for s in stats)
    accepted = sum(s.accepted for s in stats)
    accepted_lengths = [n for s in stats for n in s.accepted_lengths]
    return {
        "prompt_id": conv.prompt.id,
        "category": conv.prompt.category,
        "method": conv.method,
        "turns": len(conv.turns),
        "tokens": generated,
        "wall_seconds": wall,
        "decode_seconds": decode,
        "prefill_seconds": sum(s.prefill_seconds for s in stats),
        "draft_seconds": sum(s.draft_seconds for s in stats),
        "verify_seconds": sum(s.verify_seconds for s in stats),
        "target_passes": sum(s.target_passes for s in stats),
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": statistics.fmean(accepted_lengths) if accepted_lengths else None,
        "accepted_lengths": accepted_lengths,
        "draft_lengths": [n for s in stats for n in s.draft_lengths],
        "accepted_at_position": _sum_lists(s.accepted_at_position for s in stats),
        "drafted_at_position": _sum_lists(s.drafted_at_position for s in stats),
        "tokens_per_s": generated / decode if decode > 0 else None,
        "end_to_end_tokens_per_s": generated / wall if wall > 0 else None,
        "finish_reasons": [s.finish_reason for s in stats],
        "output_tokens": conv.tokens,
        "drafted_by_source": _sum_dicts(s.drafted_by_source for s in stats),
        "accepted_by_source": _sum_dicts(s.accepted_by_source for s in stats),
        "tree_budgets": [b for s in stats for b in s.tree_budgets],
    }


def _sum_dicts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for d in dicts:
        for key, n in d.items():
            total[key] += n
    return dict(total)


def quality_vs_ar(records: list[dict], method: str) -> dict:
    """How far a (lossy) method's greedy output departs from plain decoding's on the same prompts.

    identical: prompts whose whole output equals ar's. token_agreement: the share of ar's tokens
    reproduced at the same position, averaged over prompts (1.0 = lossless).
    """
    base = {r["prompt_id"]: [t for turn in r["output_tokens"] for t in turn] for r in records if r["method"] == BASELINE}
    agreements, identical = [], 0
    for r in records:
        ar = base.get(r["prompt_id"]) if r["method"] == method else None
        if ar is None:
            continue
        mine = [t for turn in r["output_tokens"] for t in turn]
        identical += mine == ar
        agreements.append(sum(a == b for a, b in zip(ar, mine)) / max(len(ar), 1))
    return {"identical": identical, "prompts": len(agreements),
            "token_agreement": statistics.fmean(agreements) if agreements else None}


def check_lossless(records: list[dict], conversations: dict[tuple[str, str], Conversation], greedy: bool,
                   tolerance: float) -> None:
    """Add `divergence` (first divergence from ar, or None) to each record; None-valued when sampling."""
    for rec in records:
        ar = conversations.get((rec["prompt_id"], BASELINE))
        if not greedy or ar is None:
            rec["divergence"] = None
            rec["matches_ar"] = None
            continue
        div = lossless.compare(ar.tokens, ar.margins, rec["output_tokens"], tolerance)
        rec["divergence"] = div.to_dict() if div else None
        rec["matches_ar"] = div is None


def ratios_vs_ar(records: list[dict]) -> dict[tuple[str, str], float]:
    """tokens/s of (prompt, method) over tokens/s of ar on the same prompt."""
    base = {r["prompt_id"]: r["tokens_per_s"] for r in records if r["method"] == BASELINE}
    out = {}
    for r in records:
        b = base.get(r["prompt_id"])
        if b and r["tokens_per_s"]:
            out[(r["prompt_id"], r["method"])] = r["tokens_per_s"] / b
    return out


def summarize(records: list[dict], methods: list[str], greedy: bool,
              verify_seconds: dict[int, float] | None = None) -> list[dict]:
    ratio = ratios_vs_ar(records)
    rows = []
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        rows.append({"method": m, "prompts": len(mine), **_pooled(mine),
                     "speedup": _median(ratio.get((r["prompt_id"], m)) for r in mine),
                     "speedup_min": _min(ratio.get((r["prompt_id"], m)) for r in mine),
                     "speedup_max": _max(ratio.get((r["prompt_id"], m)) for r in mine),
                     **_mismatches(mine, greedy),
                     **(speedup_bound(mine, verify_seconds) if m != BASELINE and verify_seconds else {})})
    return rows


def per_category(records: list[dict], methods: list[str]) -> dict[str, dict[str, dict]]:
    """category -> method -> speedup (median per-prompt ratio), acceptance, mean accepted length."""
    ratio = ratios_vs_ar(records)
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r)
    out = {}
    for cat, recs in by_cat.items():
        out[cat] = {}
        for m in methods:
            mine = [r for r in recs if r["method"] == m]
            if mine:
                out[cat][m] = {"prompts": len(mine), **_pooled(mine),
                               "speedup": _median(ratio.get((r["prompt_id"], m)) for r in mine)}
    return out


def acceptance_by_position(records: list[dict], method: str) -> list[float]:
    """Fraction of drafted tokens accepted at each draft position (1-based position = index + 1)."""
    mine = [r for r in records if r["method"] == method]
    drafted = _sum_lists(r["drafted_at_position"] for r in mine)
    accepted = _sum_lists(r["accepted_at_position"] for r in mine)
    return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]


def _pooled(recs: list[dict]) -> dict:
    drafted = sum(r["drafted"] for r in recs)
    accepted = sum(r["accepted"] for r in recs)
    lengths = [n for r in recs for n in r["accepted_lengths"]]
    draft_lengths = [n for r in recs for n in r["draft_lengths"]]
    return {
        "tokens_per_s": _median(r["tokens_per_s"] for r in recs),
        "end_to_end_tokens_per_s": _median(r["end_to_end_tokens_per_s"] for r in recs),
        "tokens": sum(r["tokens"] for r in recs),
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_length": statistics.fmean(lengths) if lengths else 0.0,
        "mean_draft_length": statistics.fmean(draft_lengths) if draft_lengths else 0.0,
        "draft_seconds": sum(r["draft_seconds"] for r in recs),
        "draft_ms_per_step": 1e3 * sum(r["draft_seconds"] for r in recs) / len(lengths) if lengths else 0.0,
        "verify_seconds": sum(r["verify_seconds"] for r in recs),
        "nodes_per_pass": 1 + statistics.fmean(draft_lengths) if draft_lengths else 1.0,
        "drafted_by_source": _sum_dicts(r.get("drafted_by_source", {}) for r in recs),
        "accepted_by_source": _sum_dicts(r.get("accepted_by_source", {}) for r in recs),
    }


def _mismatches(recs: list[dict], greedy: bool) -> dict:
    if not greedy:
        return {"mismatches": None, "unexplained_mismatches": None}
    found, unexplained = lossless.count([lossless.Divergence(**r["divergence"]) if r["divergence"] else None for r in recs])
    return {"mismatches": found, "unexplained_mismatches": unexplained}


def _sum_lists(lists: Iterable[list[int]]) -> list[int]:
    total: list[int] = []
    for xs in lists:
        if len(xs) > len(total):
            total.extend([0] * (len(xs) - len(total)))
        for i, x in enumerate(xs):
            total[i] += x
    return total


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _min(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return min(vals) if vals else None


def _max(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def peer_records(convs: list[Conversation], variants: tuple[str, ...], ar: dict[str, Conversation], *,
                 has_tokens: bool, timing: str, greedy: bool, tolerance: float) -> list[dict]:
    """One record per prompt x peer variant, with its ratio to the peer's own baseline and to verispec's ar.

    The ar reference is timed the way the peer is: end to end (prefill included) or decode only,
    over the same turns.
    """
    out = []
    for conv in convs:
        variant = conv.method.split(":", 1)[1]
        n = len(conv.turns)
        generated = sum(t.extra.get("generated", len(t.tokens)) for t in conv.turns)
        wall = sum(t.wall_seconds for t in conv.turns)
        if timing == "decode":
            decode = sum(t.extra.get("decode_seconds", t.wall_seconds) for t in conv.turns)
        else:
            decode = wall
        ref = ar.get(conv.prompt.id)
        ref_tps = None
        if ref is not None:
            turns = ref.turns[:n]
            ref_secs = sum(t.stats.decode_seconds if timing == "decode" else t.wall_seconds for t in turns)
            ref_tps = sum(len(t.tokens) for t in turns) / ref_secs if ref_secs > 0 else None
        div = None
        if has_tokens and greedy and ref is not None:
            d = lossless.compare(ref.tokens[:n], ref.margins[:n], conv.tokens, tolerance)
            div = d.to_dict() if d else None
        extras = [t.extra for t in conv.turns if t.extra]
        out.append({
            "prompt_id": conv.prompt.id, "category": conv.prompt.category, "variant": variant, "turns": n,
            "tokens": generated, "wall_seconds": wall, "tokens_per_s": generated / decode if decode > 0 else None,
            "verispec_ar_tokens_per_s": ref_tps, "divergence_from_ar": div,
            "matches_ar": (div is None) if has_tokens and greedy and ref is not None else None,
            "output_tokens": conv.tokens if has_tokens else None, "reported": extras or None,
        })
    base = {r["prompt_id"]: r["tokens_per_s"] for r in out if r["variant"] == variants[0]}
    own_plain = {r["prompt_id"]: r["output_tokens"] for r in out if r["variant"] == variants[0]}
    for r in out:
        plain = own_plain.get(r["prompt_id"])
        r["matches_own_plain"] = plain == r["output_tokens"] if has_tokens and greedy and plain is not None else None
        b = base.get(r["prompt_id"])
        r["ratio_vs_own_plain"] = r["tokens_per_s"] / b if b and r["tokens_per_s"] and len(variants) > 1 else None
        ar_tps = r["verispec_ar_tokens_per_s"]
        r["ratio_vs_verispec_ar"] = r["tokens_per_s"] / ar_tps if ar_tps and r["tokens_per_s"] else None
    return out


def peer_summary(records: list[dict], variants: tuple[str, ...]) -> list[dict]:
    rows = []
    for v in variants:
        mine = [r for r in records if r["variant"] == v]
        checked = [r for r in mine if r["matches_ar"] is not None]
        found, unexplained = lossless.count(
            [lossless.Divergence(**r["divergence_from_ar"]) if r["divergence_from_ar"] else None for r in checked])
        rows.append({
            "variant": v, "prompts": len(mine),
            "tokens_per_s": _median(r["tokens_per_s"] for r in mine),
            "speedup_vs_own_plain": _median(r["ratio_vs_own_plain"] for r in mine),
            "ratio_vs_verispec_ar": _median(r["ratio_vs_verispec_ar"] for r in mine),
            "mismatches_vs_ar": found if checked else None,
            "unexplained_mismatches_vs_ar": unexplained if checked else None,
            "mismatches_vs_own_plain": (sum(r["matches_own_plain"] is False for r in mine)
                                        if any(r["matches_own_plain"] is not None for r in mine) else None),
        })
    return rows


def speedup_bound(recs: list[dict], verify_seconds: dict[int, float]) -> dict:
    """The best speedup any fixed K could give with this method's measured acceptance and draft cost.

    Uses the choosers' model (cost_model.py): per-token acceptance a (each drafted token up to
    the first rejection is one observation), K draft steps at the measured cost per token, and one
    verify pass over K+1 tokens at the measured T(K+1), interpolated between measured sizes. Plain
    decoding costs T(1) per token. K runs up to the largest measured size minus one.
    """
    from ..cost_model import acceptance_observations, expected_tokens

    trials = [acceptance_observations(drafted, gained - 1)
              for r in recs for drafted, gained in zip(r["draft_lengths"], r["accepted_lengths"]) if drafted]
    accepted, observed = sum(a for a, _ in trials), sum(o for _, o in trials)
    drafted = sum(r["drafted"] for r in recs)
    if not observed or not verify_seconds:
        return {"bound_speedup": None, "bound_k": None, "acceptance_per_token": None}
    a = accepted / observed
    draft_cost = sum(r["draft_seconds"] for r in recs) / drafted
    times = {int(k): v for k, v in verify_seconds.items()}
    t1 = _interpolate(times, 1)
    rates = {k: expected_tokens(a, k) / (_interpolate(times, k + 1) + k * draft_cost) for k in range(max(times))}
    best = max(rates, key=rates.get)
    return {"bound_speedup": rates[best] * t1, "bound_k": best, "acceptance_per_token": a,
            "draft_seconds_per_token": draft_cost}


def _interpolate(times: dict[int, float], n: int) -> float:
    if n in times:
        return times[n]
    lo = max(k for k in times if k < n)
    hi = min(k for k in times if k > n)
    return times[lo] + (times[hi] - times[lo]) * (n - lo) / (hi - lo)


def reference_records(convs: list[Conversation], ar: dict[str, Conversation], tolerance: float) -> dict[str, dict]:
    """prompt id -> llama.cpp's own plain decoding on that prompt: decode tokens/s, prefill seconds, whether
    its greedy tokens equal verispec ar's (they need not: its prompt passes have other shapes)."""
    out = {}
    for conv in convs:
        generated = sum(t.extra.get("generated", len(t.tokens)) for t in conv.turns)
        decode = sum(t.extra.get("decode_seconds", t.wall_seconds) for t in conv.turns)
        ref = ar.get(conv.prompt.id)
        div = lossless.compare(ref.tokens, ref.margins, conv.tokens, tolerance) if ref is not None else None
        out[conv.prompt.id] = {"prompt_id": conv.prompt.id, "category": conv.prompt.category,
                               "tokens_per_s": generated / decode if decode > 0 else None,
                               "prefill_seconds": sum(t.extra.get("prefill_seconds", 0.0) for t in conv.turns),
                               "output_tokens": conv.tokens, "matches_ar": ref is not None and div is None,
                               "divergence_from_ar": div.to_dict() if div else None}
    return out


def against_reference(records: list[dict], reference: dict[str, dict], methods: list[str]) -> dict[str, dict]:
    """method -> median per-prompt ratio of its decode tokens/s to llama.cpp's plain decoding (the speed users
    feel against llama.cpp itself), the lowest such ratio, and ar's time to first token against llama.cpp's."""
    out = {}
    for m in methods:
        mine = [r for r in records if r["method"] == m and r["prompt_id"] in reference]
        speed = [r["tokens_per_s"] / reference[r["prompt_id"]]["tokens_per_s"] for r in mine
                 if r["tokens_per_s"] and reference[r["prompt_id"]]["tokens_per_s"]]
        ttft = [r["prefill_seconds"] / reference[r["prompt_id"]]["prefill_seconds"] for r in mine
                if reference[r["prompt_id"]]["prefill_seconds"] > 0]
        out[m] = {"speed": _median(speed), "speed_min": _min(speed), "ttft": _median(ttft),
                  "by_category": {cat: _median(r["tokens_per_s"] / reference[r["prompt_id"]]["tokens_per_s"]
                                               for r in mine if r["category"] == cat and r["tokens_per_s"])
                                  for cat in sorted({r["category"] for r in mine})}}
    return out
