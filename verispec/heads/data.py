"""Self-distillation data: the target's own greedy answers to training prompts, with its hidden states.

For each prompt, row j of a sequence holds the target's hidden state H_j and the token g_j that
its LM head picked from it (H_0 is the last prompt position). Medusa head k on H_j learns
g_{j+1+k}; the EAGLE layer learns (H_j, g_j) -> H_{j+1}.

Generating costs one target pass per token, so the data is cached in a safetensors file, saved as
it grows, and a second run continues where the first stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..prompts import BUILTIN, BUILTIN_PATH, load_prompts
from ..models.chat import chat_tokens

TRAIN_PROMPTS = Path(__file__).parent / "train_prompts.jsonl"
META_KEY = "verispec.distill"


@dataclass
class DistillData:
    tokens: np.ndarray  # (N,) int32: g_j
    hidden: np.ndarray  # (N, hidden) float16: H_j
    starts: np.ndarray  # (S + 1,) int64: sequence s is rows starts[s]:starts[s+1]
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, hidden: int, meta: dict) -> "DistillData":
        return cls(np.zeros(0, np.int32), np.zeros((0, hidden), np.float16), np.zeros(1, np.int64), meta)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_sequences(self) -> int:
        return len(self.starts) - 1

    def sequence_end(self) -> np.ndarray:
        """For each row, the index one past the end of its sequence."""
        return np.repeat(self.starts[1:], np.diff(self.starts))

    def append(self, tokens: list[int], hidden: np.ndarray) -> None:
        self.tokens = np.concatenate([self.tokens, np.asarray(tokens, np.int32)])
        self.hidden = np.concatenate([self.hidden, hidden.astype(np.float16)])
        self.starts = np.append(self.starts, len(self.tokens))

    def split(self, held_out: float) -> tuple["DistillData", "DistillData"]:
        """The last `held_out` share of sequences (at least one, if there are two) for evaluation."""
        n_eval = min(self.n_sequences - 1, max(1, round(self.n_sequences * held_out))) if self.n_sequences > 1 else 0
        cut = self.n_sequences - n_eval
        return self._slice(0, cut), self._slice(cut, self.n_sequences)

    def _slice(self, a: int, b: int) -> "DistillData":
        lo, hi = self.starts[a], self.starts[b]
        return DistillData(self.tokens[lo:hi], self.hidden[lo:hi], self.starts[a : b + 1] - lo, self.meta)

    def save(self, path: str | Path) -> None:
        import torch
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"tokens": torch.from_numpy(self.tokens), "hidden": torch.from_numpy(self.hidden),
                   "starts": torch.from_numpy(self.starts)}
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(self.meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "DistillData":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            return cls(f.get_tensor("tokens"), f.get_tensor("hidden"), f.get_tensor("starts"), meta)


def training_prompts(source: str = BUILTIN) -> list[str]:
    """First user turns of the training prompts. 'builtin' = verispec/heads/train_prompts.jsonl: HumanEval
    tasks the bench does not use plus prose prompts, none of them a bench prompt."""
    prompts = load_prompts(TRAIN_PROMPTS if source == BUILTIN else source)
    if source == BUILTIN:
        bench = {p.turns[0] for p in load_prompts(BUILTIN_PATH)}
        prompts = [p for p in prompts if p.turns[0] not in bench]
    return [p.turns[0] for p in prompts]


def prompt_tokens(runner, text: str) -> list[int]:
    return chat_tokens(runner.tokenizer, [{"role": "user", "content": text}])


def greedy_sequence(runner, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """The target's greedy answer (EOS included) and the hidden state that produced each token."""
    runner.keep_hidden = True
    runner.reset()
    logits = runner.forward(prompt, all_logits=False)[-1]
    room = max(0, min(max_new_tokens, runner.n_ctx - len(prompt) - 1))
    tokens: list[int] = []
    hidden = np.empty((room, runner.hidden_states().shape[1]), dtype=np.float32)
    for i in range(room):
        hidden[i] = runner.hidden_states()[-1]
        token = int(np.argmax(logits))
        tokens.append(token)
        if token in runner.tokenizer.eos_ids or i + 1 == room:
            break
        logits = runner.forward([token])[-1]
    return tokens, hidden[: len(tokens)]


def generate(runner, prompts: list[str], path: str | Path | None, budget: int, max_new_tokens: int,
             meta: dict, on_progress: Callable[[int, int], None] | None = None, save_every: float = 30.0) -> DistillData:
    """Grow the cached data at `path` to `budget` tokens (or the end of `prompts`), saving as it goes."""
    data = _resume(path, meta)
    if data is None:
        data = DistillData.empty(_hidden_size(runner), {**meta, "prompts_done": 0})
    last_save = time.monotonic()
    done = int(data.meta.get("prompts_done", 0))
    if on_progress:
        on_progress(min(len(data), budget), budget)
    while len(data) < budget and done < len(prompts):
        tokens, hidden = greedy_sequence(runner, prompt_tokens(runner, prompts[done]), max_new_tokens)
        done += 1
        if tokens:
            data.append(tokens, hidden)
        data.meta["prompts_done"] = done
        if on_progress:
            on_progress(min(len(data), budget), budget)
        if path and time.monotonic() - last_save > save_every:
            data.save(path)
            last_save = time.monotonic()
    runner.keep_hidden = False
    if path:
        data.save(path)
    return data


def _resume(path, meta: dict) -> DistillData | None:
    if not path or not Path(path).is_file():
        return None
    data = DistillData.load(path)
    same = all(data.meta.get(k) == meta.get(k) for k in ("target", "prompts", "max_new_tokens"))
    if not same:
        raise ValueError(f"{path} holds data for {data.meta}, not {meta}; pass another --data-cache or delete it")
    return data


def _hidden_size(runner) -> int:
    n = getattr(runner, "n_embd", None)
    return int(n) if n else int(runner.model.config.hidden_size)
