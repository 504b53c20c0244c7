"""Training heads on self-distillation data: AdamW on random batches, checkpoints, exact resume.

The batch for step s is drawn from an rng seeded with (seed, s), and the learning rate is a
function of s alone, so a run resumed from a checkpoint continues exactly as if uninterrupted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DistillData
from .file import Heads
from .vocab import IGNORE


@dataclass
class TrainConfig:
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 50
    eagle_unroll: int = 3  # EAGLE steps trained on the layer's own predicted features
    seed: int = 0
    checkpoint_every: int = 100
    held_out: float = 0.1  # share of sequences kept for evaluation


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # per step
    seconds: float = 0.0


class Batcher:
    """Turns data rows into tensors for one kind of heads; vectorised gathers, no per-row Python."""

    def __init__(self, heads: Heads, data: DistillData, unroll: int) -> None:
        self.kind = heads.kind
        self.data = data
        self.labels = heads.vocab.labels(data.tokens.astype(np.int64))  # reduced ids or IGNORE
        reduced = heads.vocab.to_reduced[data.tokens.astype(np.int64)]
        self.inputs = np.where(reduced >= 0, reduced, len(heads.vocab))  # the out-of-vocab embedding row
        self.end = data.sequence_end()
        self.depth = heads.module.n_heads if self.kind == "medusa" else unroll

    def __call__(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        d = self.data
        hidden = torch.from_numpy(d.hidden[rows].astype(np.float32))
        if self.kind == "medusa":  # head k on H_j: token g_{j+1+k}
            at = rows[:, None] + 1 + np.arange(self.depth)[None, :]
            ok = at < self.end[rows][:, None]
            labels = np.where(ok, self.labels[np.minimum(at, len(d) - 1)], IGNORE)
            return {"hidden": hidden, "labels": torch.from_numpy(labels), "inside": torch.from_numpy(ok)}
        steps = np.arange(self.depth)[None, :]  # step s: (H_{j+s}, g_{j+s}) -> H_{j+s+1}, g_{j+s+1}
        src, dst = rows[:, None] + steps, rows[:, None] + steps + 1
        ok_src, ok_dst = src < self.end[rows][:, None], dst < self.end[rows][:, None]
        src_c, dst_c = np.minimum(src, len(d) - 1), np.minimum(dst, len(d) - 1)
        return {
            "hidden": hidden,
            "tokens": torch.from_numpy(np.where(ok_src, self.inputs[src_c], self.inputs[rows][:, None])),
            "labels": torch.from_numpy(np.where(ok_dst, self.labels[dst_c], IGNORE)),
            "targets": torch.from_numpy(d.hidden[dst_c].astype(np.float32)),
            "valid": torch.from_numpy(ok_dst.astype(np.float32)),
            "inside": torch.from_numpy(ok_dst),
        }

    def rows_for_step(self, step: int, seed: int, batch: int) -> np.ndarray:
        return np.random.default_rng([seed, step]).integers(0, len(self.data), size=batch)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(heads: Heads, data: DistillData, cfg: TrainConfig, checkpoint: str | Path | None = None,
          on_step: Callable[[TrainState, float], None] | None = None) -> TrainState:
    """Train `heads` in place for cfg.steps steps, resuming from `checkpoint` if it exists."""
    torch.manual_seed(cfg.seed)
    module = heads.module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    state = TrainState()
    if checkpoint and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint, heads, optimizer, cfg)
    batcher = Batcher(heads, data, cfg.eagle_unroll)
    while state.step < cfg.steps:
        t0 = time.perf_counter()
        batch = batcher(batcher.rows_for_step(state.step, cfg.seed, cfg.batch))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, state.step)
        loss, _ = module.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        state.losses.append(loss.item())
        state.seconds += time.perf_counter() - t0
        if checkpoint and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps):
            save_checkpoint(checkpoint, heads, optimizer, state, cfg)
        if on_step:
            on_step(state, state.losses[-1])
    module.eval()
    return state


@torch.no_grad()
def evaluate(heads: Heads, data: DistillData, unroll: int = 3, batch: int = 256) -> dict:
    """Top-1 accuracy per head (Medusa) or per step (EAGLE) on `data`, and the greedy chain's
    expected accepted length: 1 + the mean count of leading correct predictions."""
    batcher = Batcher(heads, data, unroll)
    module = heads.module.eval()
    correct, counted, leading = np.zeros(batcher.depth), np.zeros(batcher.depth), []
    for start in range(0, len(data), batch):
        rows = np.arange(start, min(len(data), start + batch))
        b = batcher(rows)
        hits, has = _hits(heads, b)
        correct += hits.sum(0)
        counted += has.sum(0)
        full = has.all(1)  # only rows whose whole chain lies inside the sequence
        leading.extend(np.cumprod(hits[full], axis=1).sum(1).tolist())
    accuracy = (correct / np.maximum(counted, 1)).round(4).tolist()
    return {"top1": accuracy, "rows": int(counted[0]) if len(counted) else 0,
            "chain_accepted_length": 1.0 + float(np.mean(leading)) if leading else 1.0}


def _hits(heads: Heads, b: dict) -> tuple[np.ndarray, np.ndarray]:
    labels = b["labels"].numpy()
    if heads.kind == "medusa":
        predicted = heads.module(b["hidden"]).argmax(-1).numpy()
    else:  # autoregressive on the layer's own predicted tokens, as when drafting
        h, token, out = b["hidden"], b["tokens"][:, 0], []
        for _ in range(labels.shape[1]):
            h = heads.module.step(h, token)
            token = heads.module.logits(h).argmax(-1)
            out.append(token.numpy())
        predicted = np.stack(out, 1)
    # A label past the sequence end does not count; an out-of-vocabulary one counts as a miss.
    return (predicted == labels) & (labels != IGNORE), b["inside"].numpy()


# -- checkpoints ----------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, heads: Heads, optimizer: torch.optim.Optimizer, state: TrainState,
                    cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    tensors = {f"module.{k}": v.detach().contiguous() for k, v in heads.module.state_dict().items()}
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tensors["vocab_ids"] = torch.from_numpy(heads.vocab.ids)
    meta = {"step": state.step, "losses": state.losses, "seconds": state.seconds, "config": asdict(cfg),
            "kind": heads.kind, "param_groups": opt["param_groups"]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"verispec.checkpoint": json.dumps(meta)})
    tmp.replace(path)


def load_checkpoint(path: str | Path, heads: Heads, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> TrainState:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["verispec.checkpoint"])
    tensors = load_file(str(path))
    if meta["kind"] != heads.kind or not np.array_equal(tensors["vocab_ids"].numpy(), heads.vocab.ids):
        raise ValueError(f"checkpoint {path} belongs to other heads (kind or draft vocabulary differ); delete it to start over")
    heads.module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return TrainState(int(meta["step"]), list(meta["losses"]), float(meta["seconds"]))
