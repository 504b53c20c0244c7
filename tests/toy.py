"""Tiny models the tests build themselves: a random Llama in transformers and a byte tokenizer."""

from __future__ import annotations

import os
from collections.abc import Sequence

from verispec.runners.base import Tokenizer

BYTE_OFFSET = 3  # ids 0..2 are <pad>, <bos>, <eos>
# VERISPEC_TEST_DEVICE=cuda runs the torch runner tests and the torch greedy-equality tests on a GPU (CI has none:
# cpu). They stay in fp32 there unless VERISPEC_TEST_DTYPE says otherwise, so their tie tolerances still hold.
TEST_DEVICE = os.environ.get("VERISPEC_TEST_DEVICE", "cpu")
TEST_DTYPE = os.environ.get("VERISPEC_TEST_DTYPE", "fp32")


class ByteTokenizer(Tokenizer):
    bos_id = 1
    eos_ids = frozenset({2})
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    bos_text = ""
    eos_text = ""

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return ([1] if add_special else []) + [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t - BYTE_OFFSET for t in tokens if t >= BYTE_OFFSET).decode("utf-8", "replace")

    def vocab_strings(self) -> list[str]:
        return ["<pad>", "<bos>", "<eos>"] + [f"<{b}>" for b in range(256)]

    def token_bytes(self, token: int) -> bytes:
        return bytes([token - BYTE_OFFSET]) if token >= BYTE_OFFSET else b""


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 259, scale: float = 1.0):
    """A random LlamaForCausalLM; `scale` sharpens its logits so greedy decoding is not all ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model.float().eval()


def tiny_runner(seed: int = 0, fixed_shapes: bool = False, **kwargs):
    """fixed_shapes: the runner pads passes to its ROW_BUCKETS and attends over its whole cache under a mask
    (what CUDA graphs replay; uncompiled here)."""
    from verispec.runners.torch import TorchRunner

    return TorchRunner(tiny_llama(seed, **kwargs).to(TEST_DEVICE), ByteTokenizer(), f"tiny-{seed}", n_ctx=512,
                       device=TEST_DEVICE, fixed_shapes=fixed_shapes)


class TableRunner:
    """A numpy 'model' over a small vocabulary: logits are a fixed function of the context.

    Implements the Runner interface (chain and tree) so the real Engine runs on it; its exact
    next-token distributions are known, which is what the distribution tests need.
    """

    def __init__(self, vocab: int = 6, seed: int = 0, sharpness: float = 1.5, name: str = "table") -> None:
        import numpy as np

        self.n_vocab = vocab
        self.n_ctx = 1 << 20
        self.name = name
        self.tokenizer = ByteTokenizer()
        self.tokenizer.eos_ids = frozenset()
        self._rng_seed = seed
        self._sharpness = sharpness
        self._np = np
        self.context: list[int] = []
        self.n_past = 0
        self._pending: list[list[int]] | None = None
        self._cache: dict = {}

    def logits(self, context) -> "np.ndarray":
        key = tuple(context[-2:])
        row = self._cache.get(key)
        if row is None:
            seed = hash((self._rng_seed, key)) & 0xFFFFFFFF
            row = self._cache[key] = self._np.random.default_rng(seed).normal(size=self.n_vocab) * self._sharpness
        return row

    def forward_native(self, tokens, parents=None, all_logits=True):
        """Host arrays; DeviceTableRunner hands the same logits over as torch tensors."""
        return self.forward(tokens, parents, all_logits)

    def forward(self, tokens, parents=None, all_logits=True):
        np = self._np
        if parents is None:
            rows = []
            for t in tokens:
                self.context.append(t)
                rows.append(self.logits(self.context))
            self.n_past = len(self.context)
            out = np.stack(rows)
            return out if all_logits else out[-1:]
        paths = []
        for i, t in enumerate(tokens):
            paths.append((paths[parents[i]] if parents[i] >= 0 else []) + [t])
        self._pending = paths
        return np.stack([self.logits(self.context + p) for p in paths])

    def keep_path(self, path) -> None:
        self.context.extend(self._pending[path[-1]] if path else [])
        self.n_past = len(self.context)
        self._pending = None

    def rollback(self, n_past: int) -> None:
        self._pending = None
        del self.context[n_past:]
        self.n_past = len(self.context)

    def reset(self) -> None:
        self.rollback(0)

    def check_fits(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class DeviceTableRunner(TableRunner):
    """A TableRunner whose logits come as torch tensors on TEST_DEVICE, so the engine verifies them with
    verify/device.py there: the same known distributions put the device implementation through the same tests
    as the numpy one (on a GPU with VERISPEC_TEST_DEVICE=cuda)."""

    logits_on_device = True

    def forward_native(self, tokens, parents=None, all_logits=True):
        import torch

        return torch.from_numpy(self.forward(tokens, parents, all_logits).copy()).to(TEST_DEVICE)
