"""A heads file: one safetensors file with the module's weights, the draft vocabulary and metadata
(kind, shapes, the target it was trained on, and the command and data that produced it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .eagle import EagleLayer
from .medusa import MedusaHeads
from .vocab import DraftVocab

META_KEY = "verispec.heads"
KINDS = ("medusa", "eagle")


@dataclass
class Heads:
    kind: str
    module: nn.Module
    vocab: DraftVocab
    meta: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters()) + sum(b.numel() for b in self.module.buffers())


def build_module(kind: str, hidden: int, vocab_size: int, n_heads: int = 4) -> nn.Module:
    if kind == "medusa":
        return MedusaHeads(hidden, n_heads, vocab_size)
    if kind == "eagle":
        return EagleLayer(hidden, vocab_size)
    raise ValueError(f"unknown heads kind {kind!r}: use {' or '.join(KINDS)}")


def save_heads(path: str | Path, heads: Heads) -> None:
    from safetensors.torch import save_file

    tensors = {f"module.{k}": v.detach().contiguous() for k, v in heads.module.state_dict().items()}
    tensors["vocab_ids"] = torch.from_numpy(heads.vocab.ids)
    meta = {**heads.meta, "kind": heads.kind, "config": heads.module.config(), "n_vocab": heads.vocab.n_vocab}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)  # a crash mid-write never leaves a truncated heads file


def load_heads(path: str | Path) -> Heads:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        from ..errors import ModelFileError

        raise ModelFileError(f"heads file {path} does not exist (make one with `verispec train-heads`)")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    if meta.get("kind") not in KINDS:
        from ..errors import ModelFileError

        raise ModelFileError(f"{path} is not a verispec heads file (no '{META_KEY}' metadata)")
    tensors = load_file(str(path))
    module = build_module(meta["kind"], **meta["config"])
    module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
    vocab = DraftVocab(tensors["vocab_ids"].numpy(), int(meta["n_vocab"]))
    return Heads(meta["kind"], module.eval(), vocab, meta)


def new_heads(kind: str, runner, vocab: DraftVocab, hidden: int, n_heads: int = 4, meta: dict | None = None) -> Heads:
    """Fresh heads for `runner`'s target, initialised from its LM head (and embedding) rows."""
    from .weights import target_rows

    module = build_module(kind, hidden, len(vocab), n_heads)
    lm_rows, embed_rows = target_rows(runner, vocab.ids)
    module.init_from_target(torch.from_numpy(lm_rows), torch.from_numpy(embed_rows))
    return Heads(kind, module, vocab, dict(meta or {}))


def heads_fit(heads: Heads, runner) -> None:
    """Refuse heads trained on another target: the hidden size and vocabulary must match."""
    from ..errors import TokenizerMismatch

    hidden = getattr(runner, "n_embd", None) or getattr(getattr(runner, "model", None), "config", None) and runner.model.config.hidden_size
    if hidden and heads.module.hidden != int(hidden):
        raise TokenizerMismatch(f"heads of hidden size {heads.module.hidden} do not fit {runner.name} (hidden size {hidden})")
    if heads.vocab.n_vocab != runner.n_vocab or int(np.max(heads.vocab.ids)) >= runner.n_vocab:
        raise TokenizerMismatch(f"heads trained for a vocabulary of {heads.vocab.n_vocab} tokens; {runner.name} has {runner.n_vocab}")
