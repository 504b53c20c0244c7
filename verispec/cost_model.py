"""The arithmetic both K choosers ask: what a verify pass costs and what a draft buys.

The per-request chooser (draft_length.py) and the server's plan across requests (serve/goodput.py)
decide K from the same facts, kept here once:
- T(n), seconds of a target pass over n rows, measured per size as a run goes; sizes not yet seen
  are the nearest measured size scaled by a prior curve T(n)/T(1) (VerifyCosts). A step that
  drafts K tokens costs T(K+1) plus K draft steps.
- the per-token acceptance a, learned from drafting steps (acceptance_observations);
- the tokens a pass yields: 1 + a + a^2 + ... + a^K on average (the target's own token always
  counts; expected_tokens), of which the (k+1)-th draft adds a^(k+1) (next_draft_value).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ema import ema

# T(n)/T(1) for one llama.cpp pass over n rows, per verify mode: the Qwen2.5-Coder-1.5B Q4_K_M target through
# the runner (verispec's GGML_OPENMP=OFF build, huge pages, 2 threads, a 121-token context), as `verispec bench`
# measured it on 2026-12-06 (docs/bench-2026-12-06-huge-pages, "Verify cost"; up to 3 rows both modes run the
# same pass, and the two columns differ there by the run's noise, ~5%).
# "exact-chunks" (a build without the patch) scores in chunks of <= 3 rows, so its cost grows about linearly from 4 rows on; "one-pass" is one
# batch, where ggml's repacked gemm takes over at 4 rows (4 rows cost less than 3; up to 3 rows both modes run
# the same pass). Interpolated between sizes, extrapolated linearly beyond; measurements replace it as a run goes.
# "torch-cpu-*": the torch runner's pass (runners/torch.py) over the Qwen2.5-Coder-1.5B shapes, 2 threads, a
# 121-200-token context, on this Xeon (AVX-512 and AMX), 2026-12-06 (docs/bench-2026-12-06-torch-fp32 and
# -bf16, "Verify cost", and random weights of the same shapes for n = 32). fp32: MKL's one- to three-row path reads each
# weight once, from 4 rows a gemm runs compute-bound. bf16: oneDNN's AMX tiles keep a pass up to 32 rows within
# 22% of one row, and one row is itself faster than fp32's (196 against 232 ms). A CPU without AMX would see
# bf16 far steeper; the measurements replace the prior as a run goes. CUDA has no measured curve yet (see
# scripts/device_check.py) and borrows the bf16 one, the flattest: a GPU's passes are flatter still.
# 2026-12-08: "exact" is verispec's batch-invariant build, one pass per draft up to 64 rows (llama_lib.py). Its
# prior is the flattest llama.cpp curve measured, upstream's one pass on the Xeon ("one-pass", the same kernels'
# pass up to 64 rows there): a prior only decides what is tried before anything is measured, and a steep one
# from one CPU would keep another CPU, where drafting pays, from ever trying it; measured T(n) replace it within
# a few steps, and T(1) is always measured before K > 0 is kept (draft_length.py). On the AMD EPYC with AVX-512
# of that day `make demo` measured 1.91 / 2.66 / 3.26 / 5.85 / 8.88 at n = 2 / 3 / 4 / 8 / 16
# (docs/batch-invariance.md). "exact-chunks" is the curve of a build without the patch (passes of 3 rows).
PRIOR_VERIFY_RATIO = {
    "exact": {1: 1.0, 2: 1.58, 3: 1.89, 4: 1.82, 8: 3.34, 16: 4.14},
    "exact-chunks": {1: 1.0, 2: 1.51, 3: 1.78, 4: 2.77, 8: 5.02, 16: 10.16},
    "one-pass": {1: 1.0, 2: 1.58, 3: 1.89, 4: 1.82, 8: 3.34, 16: 4.14},
    "torch-cpu-fp32": {1: 1.0, 2: 1.08, 3: 1.08, 4: 1.97, 8: 2.64, 16: 2.62, 32: 3.35},
    "torch-cpu-bf16": {1: 1.0, 2: 1.04, 3: 1.03, 4: 1.08, 8: 1.06, 16: 1.13, 32: 1.22},
}


def prior_ratio(n: int, curve: str = "exact") -> float:
    """The prior T(n)/T(1) of a cost curve named by a runner's `cost_curve` (unknown names: the one-pass curve)."""
    return ratio_at(prior_curve(curve), n)


def prior_curve(name: str) -> dict[int, float]:
    """A curve by name; an unmeasured torch device/dtype borrows the nearest: a GPU the flattest (bf16 here),
    another CPU dtype (fp16) the steeper fp32 one, anything else the one-pass curve."""
    if name in PRIOR_VERIFY_RATIO:
        return PRIOR_VERIFY_RATIO[name]
    if name.startswith("torch-"):
        return PRIOR_VERIFY_RATIO["torch-cpu-fp32" if name.startswith("torch-cpu") else "torch-cpu-bf16"]
    return PRIOR_VERIFY_RATIO["one-pass"]


def ratio_at(curve: dict[int, float], n: int) -> float:
    """curve[n] of a T(n)/T(1) curve known at some sizes: linear between them, linear from the largest beyond it."""
    keys = sorted(curve)
    if n in curve:
        return curve[n]
    if n > keys[-1]:
        return curve[keys[-1]] * n / keys[-1]
    if n < keys[0]:
        return curve[keys[0]]
    lo = max(k for k in keys if k < n)
    hi = min(k for k in keys if k > n)
    w = (n - lo) / (hi - lo)
    return curve[lo] * (1 - w) + curve[hi] * w


@dataclass
class VerifyCosts:
    """Measured seconds of a verify pass by its size n, extrapolated to unmeasured sizes with a prior curve.

    `measured` is held by reference, not copied: its owners (a chooser's `verify_seconds`, the goodput
    policy's `pass_seconds`) expose and share the same dict, and a view made over it stays current.
    """

    measured: dict[int, float] = field(default_factory=dict)
    curve: str = "exact"  # a runner's cost_curve: which prior T(n)/T(1) extrapolates

    def record(self, n: int, seconds: float, weight: float) -> None:
        self.measured[n] = ema(self.measured.get(n), seconds, weight)

    def seconds(self, n: int) -> float:
        """T(n): measured, else the nearest measured size scaled by the prior ratio; with nothing measured the
        prior ratio itself (unitless, T(1) = 1: enough to compare sizes with each other)."""
        if n <= 0:
            return 0.0
        if n in self.measured:
            return self.measured[n]
        if not self.measured:
            return prior_ratio(n, self.curve)
        ref = min(sorted(self.measured), key=lambda m: abs(m - n))  # a tie goes to the smaller size
        return self.measured[ref] * prior_ratio(n, self.curve) / prior_ratio(ref, self.curve)

    def table(self, n_max: int) -> dict[int, float]:
        return {n: self.seconds(n) for n in range(1, n_max + 1)}


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens per target pass with K drafted tokens each accepted with probability `acceptance`."""
    return sum(acceptance**i for i in range(k + 1))


def next_draft_value(acceptance: float, k: int) -> float:
    """Expected tokens the (k+1)-th draft token adds: it counts only if all k+1 drafts are accepted."""
    return acceptance ** (k + 1)


def expected_rate(acceptance: float, k: int, verify_time: float, draft_time_per_token: float) -> float:
    return expected_tokens(acceptance, k) / (verify_time + k * draft_time_per_token)


def best_k(acceptance: float, verify_times: dict[int, float], draft_time_per_token: float, k_max: int,
           min_gain: float = 1.0) -> int:
    """argmax_K of expected tokens/s over 0..k_max; K>0 only if it beats K=0 by `min_gain`."""
    rates = {k: expected_rate(acceptance, k, verify_times[k + 1], draft_time_per_token) for k in range(k_max + 1)}
    k = max(rates, key=rates.get)
    return k if rates[k] >= min_gain * rates[0] else 0


def acceptance_observations(n_drafted: int, n_accepted: int) -> tuple[int, int]:
    """(accepted, observed) Bernoulli trials of per-token acceptance in one step that drafted n_drafted tokens.

    Each drafted token up to and including the first rejection is one observation; the tokens after
    it were never judged, so they say nothing about a.
    """
    return n_accepted, n_accepted + (1 if n_accepted < n_drafted else 0)
