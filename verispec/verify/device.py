"""Verification and sampling on the torch runner's device: the rules of sampling.py, verify/rejection.py and
verify/tree.py on tensors, so that a pass's logits never leave the device; only the accepted ids do.

Each step ends in exactly one host sync (a `.tolist()` of a few ints), whatever the number of drafted tokens:
- greedy chains: argmax of every row, then the longest matching prefix on the host;
- sampled chains: every row's acceptance test and every row's residual draw run at once, and the first
  rejected row (or the bonus row) is picked on the device;
- seeded requests: p / E with the same per-position noise as the numpy path (sampling.PositionNoise, drawn on
  the host once per position and kept on the device), so seeded outputs do not depend on the implementation;
- trees: greedy trees walk the argmaxes of all nodes (one sync); sampled and relaxed trees copy their rows to the
  host once and walk them with verify/tree.py's numpy rules (a tree's walk is sequential by nature).
Probabilities are float64, as in the numpy implementation, and the nucleus is cut by sampling.nucleus_inside's
rule, whose sums are exact: both make the same top-k and top-p cuts.
Greedy steps allocate nothing vocabulary-sized; sampled steps allocate their (K+1) x V temporaries per step (a
GPU's caching allocator serves them without a malloc), where the numpy path reuses buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..sampling import NUCLEUS_CANDIDATES, NUCLEUS_UNITS_PER_TOP_TOKEN, PositionNoise, SamplingParams, TokenLogprob, nucleus_inside
from ..sampling_device import edit_columns  # noqa: F401 (re-exported: it lived here)
from ..token_tree import TokenTree
from .rejection import Verdict
from .tree import TreeVerdict, TreeVerifier


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """sampling.logits_to_probs on a tensor of rows (n, V): temperature, min-p, top-k, top-p; greedy is a one-hot."""
    # The host path gets float32 rows (bf16 widened) and scales them in float32 before widening to float64:
    # the same steps here give the same cuts.
    rows = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if params.greedy:
        return torch.zeros(rows.shape, dtype=torch.float64, device=rows.device).scatter_(
            1, rows.argmax(dim=1, keepdim=True), 1.0)
    scaled = (rows * (1.0 / params.temperature)).to(torch.float64)
    weights = torch.exp(scaled - scaled.amax(dim=1, keepdim=True))  # each row's top entry is 1
    if params.min_p > 0.0:
        weights = torch.where(weights < params.min_p, 0.0, weights)
    if params.top_k and params.top_k < rows.shape[1]:
        kth = torch.topk(weights, params.top_k, dim=1).values[:, -1:]
        weights = torch.where(weights < kth, 0.0, weights)
    if params.top_p < 1.0:
        weights = _keep_nucleus(weights, params.top_p)
    return weights / weights.sum(dim=1, keepdim=True)


def _keep_nucleus(weights: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the weights (top token 1.0) outside each row's nucleus: sampling.nucleus_inside's rule.

    On a CPU the nucleus is first looked for among each row's top candidates, as sampling.py does (a full sort
    of a 152k vocabulary costs ~10 ms a row there); on a GPU the full sort is cheap, and checking whether the
    candidates suffice would cost a host sync."""
    units = (weights * NUCLEUS_UNITS_PER_TOP_TOKEN).floor_()
    total = units.sum(dim=1, keepdim=True)
    sorted_units = None
    if units.device.type == "cpu" and units.shape[1] > NUCLEUS_CANDIDATES:
        top = torch.topk(units, NUCLEUS_CANDIDATES, dim=1).values  # descending
        if bool((nucleus_inside(top, total, top_p).sum(dim=1) < NUCLEUS_CANDIDATES).all()):
            sorted_units = top
    if sorted_units is None:
        sorted_units = torch.sort(units, dim=1, descending=True).values
    n_inside = nucleus_inside(sorted_units, total, top_p).sum(dim=1, keepdim=True)
    return torch.where(units < sorted_units.gather(1, n_inside - 1), 0.0, weights)


def top2_margin(row: torch.Tensor) -> float:
    top = torch.topk(row.float(), 2).values
    return float(top[0] - top[1])


class DeviceNoise:
    """PositionNoise's E for each position, uploaded once and kept on the device for the positions in flight."""

    def __init__(self, noise: PositionNoise, device: torch.device) -> None:
        self.noise, self.device = noise, device
        self._rows: dict[int, torch.Tensor] = {}

    def at(self, positions: Sequence[int]) -> torch.Tensor:
        for position in positions:
            if position not in self._rows:
                self._rows[position] = torch.from_numpy(self.noise.at(position).copy()).to(self.device, torch.float64)
        for stale in [p for p in self._rows if p < min(positions)]:
            del self._rows[stale]
        return torch.stack([self._rows[p] for p in positions])


def _generator(rng: np.random.Generator, device: torch.device) -> torch.Generator:
    """A torch stream seeded from the request's numpy one, so a test that passes an rng repeats its run."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(rng.integers(0, 2**63 - 1)))
    return generator


def pick(logits: torch.Tensor, params: SamplingParams, rng: np.random.Generator,
         noise: PositionNoise | None = None, position: int = 0) -> int:
    """sampling.pick on a device row: argmax when greedy, else a sample (seeded: at `position`)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = logits_to_probs(logits[None, :], params)
    if noise is not None:
        return int(torch.argmax(probs[0] / DeviceNoise(noise, logits.device).at([position])[0]))
    return int(torch.multinomial(probs, 1, generator=_generator(rng, logits.device))[0, 0])


class DeviceChainVerifier:
    """rejection.ChainVerifier on the device: same constructor, same Verdict, one host sync per step."""

    def __init__(self, n_vocab: int, params: SamplingParams, rng: np.random.Generator, max_rows: int = 64,
                 noise: PositionNoise | None = None) -> None:
        self.params, self.rng, self.noise = params, rng, noise
        self._generator: torch.Generator | None = None
        self._noise: DeviceNoise | None = None

    def verify(self, target_logits: torch.Tensor, drafted: Sequence[int], draft_probs: np.ndarray | None,
               position: int = 0) -> Verdict:
        k = len(drafted)
        rows = target_logits[: k + 1]
        if self.params.greedy:
            return _first_mismatch(rows.argmax(dim=1).tolist(), drafted)
        p = logits_to_probs(rows, self.params)
        if self.noise is not None:
            if self._noise is None:
                self._noise = DeviceNoise(self.noise, rows.device)
            return _first_mismatch((p / self._noise.at(range(position, position + k + 1))).argmax(dim=1).tolist(),
                                   drafted)
        q = None if draft_probs is None else torch.as_tensor(draft_probs[:k], device=rows.device, dtype=torch.float64)
        return self.verify_probs(p, drafted, q)

    def verify_probs(self, p: torch.Tensor, drafted: Sequence[int], q: torch.Tensor | None) -> Verdict:
        """Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); the first rejected row draws from its residual
        max(0, p_i - q_i), a full acceptance from p_K. Every row's test and draw run at once."""
        k, device = len(drafted), p.device
        if self._generator is None:
            self._generator = _generator(self.rng, device)
        x = torch.tensor(list(drafted), dtype=torch.long, device=device)
        rows = torch.arange(k, device=device)
        uniform = torch.rand(k, dtype=torch.float64, device=device, generator=self._generator)
        q_x = torch.ones(k, dtype=torch.float64, device=device) if q is None else q[rows, x]
        rejected = uniform * q_x >= p[rows, x]
        # The first rejected row (argmax gives the first of equal maxima), or K when all pass.
        n = torch.where(rejected.any(), rejected.to(torch.int8).argmax(), k) if k else torch.zeros((), dtype=torch.long,
                                                                                                  device=device)
        residual = p.clone()
        if q is None:
            residual[rows, x] = 0.0
        else:
            residual[:k] = (p[:k] - q).clamp_min(0.0)
        mass = residual.sum(dim=1, keepdim=True)
        # p == q up to rounding: rejection had probability 0 there, and any draw from p is exact.
        residual = torch.where(mass > 0.0, residual / mass.clamp_min(torch.finfo(torch.float64).tiny), p)
        draws = torch.multinomial(residual, 1, generator=self._generator)[:, 0]
        n_accepted, token = torch.stack([n, draws[n]]).tolist()
        return Verdict(n_accepted, token)


def _first_mismatch(choices: list[int], drafted: Sequence[int]) -> Verdict:
    n = next((i for i, token in enumerate(drafted) if choices[i] != token), len(drafted))
    return Verdict(n, choices[n])


class DeviceTreeVerifier(TreeVerifier):
    """verify/tree.py's TreeVerifier for device rows: greedy trees on the device, the rest from one host copy."""

    def verify(self, tree: TokenTree, target_logits: torch.Tensor, position: int = 0) -> TreeVerdict:
        if self.params.greedy and not self.relaxed:
            choices = target_logits.argmax(dim=1).tolist()
            kids = tree.children()
            path = [0]
            while (nxt := next((c for c in kids[path[-1]] if tree.tokens[c] == choices[path[-1]]), None)) is not None:
                path.append(nxt)
            return TreeVerdict(path, choices[path[-1]])
        rows = target_logits if target_logits.dtype in (torch.float32, torch.float64) else target_logits.float()
        return super().verify(tree, rows.cpu().numpy(), position)
