"""sampling.py's logit edits and log-probabilities on torch rows, on their device (the numpy versions are there)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def edit_columns(rows: torch.Tensor, ids: np.ndarray, delta: np.ndarray) -> torch.Tensor:
    """sampling.LogitsProcessor.apply's edits on device rows: `delta` (n, m) added to columns `ids`, in a copy
    (float32 at least, as the host rows are)."""
    edited = rows.float() if rows.dtype not in (torch.float32, torch.float64) else rows.clone()
    if ids.size:
        columns = torch.from_numpy(ids).to(edited.device)
        edited[:, columns] += torch.from_numpy(delta).to(edited.device, edited.dtype)
    return edited


def token_logprobs(rows: torch.Tensor, tokens: Sequence[int], temperature: float,
                   top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """sampling.token_logprobs on device rows, as (token, its logprob, the top entries): one host copy of them."""
    n = len(tokens)
    scaled = torch.log_softmax(rows[:n].to(torch.float64) / temperature, dim=1)
    chosen = scaled.gather(1, torch.tensor(list(tokens), device=rows.device).view(n, 1))[:, 0]
    k = min(top, scaled.shape[1])
    values, ids = torch.topk(scaled, k, dim=1) if k else (scaled[:, :0], scaled[:, :0].long())
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    out = []
    for i, token in enumerate(tokens):
        ranked = sorted(zip(ids[i], values[i]), key=lambda e: (-e[1], e[0]))
        out.append((int(token), chosen[i], [e for e in ranked if e[1] > -float("inf")]))
    return out
