"""Medusa / EAGLE heads: training lowers the loss, head-drafted trees keep greedy equality, and a
saved heads file reloads to identical proposals. Tiny toy models, plus one SmolLM2 llama.cpp check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.toy import tiny_runner
from verispec.drafters.heads import HeadsDrafter
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.heads import data as distill
from verispec.heads.file import load_heads, new_heads, save_heads
from verispec.heads.train import TrainConfig, evaluate, train
from verispec.heads.vocab import DraftVocab
from verispec.sampling import SamplingParams

PROMPTS = ["def add(a, b):", "Hello there, how", "for i in range(10):", "The quick brown fox", "import numpy as np",
           "class Stack:", "while True:", "x = [1, 2, 3]"]
KINDS = ["medusa", "eagle"]


@pytest.fixture(scope="module")
def toy():
    """A tiny Llama whose greedy output is learnable, and its self-distillation data."""
    torch.set_num_threads(1)
    runner = tiny_runner(seed=3, scale=4.0)
    data = distill.generate(runner, PROMPTS, None, budget=10_000, max_new_tokens=48, meta={"target": runner.name})
    return runner, data


def _heads(kind: str, runner, data, vocab_size: int = 64):
    vocab = DraftVocab.most_frequent(data.tokens, runner.n_vocab, vocab_size)
    return new_heads(kind, runner, vocab, runner.model.config.hidden_size, n_heads=3)


def test_distill_data_rows_are_the_targets_greedy_tokens(toy):
    runner, data = toy
    assert data.n_sequences == len(PROMPTS) and len(data) > 100
    head = runner.model.lm_head.weight.detach().numpy()
    picked = np.argmax(data.hidden.astype(np.float32) @ head.T, axis=1)
    assert (picked == data.tokens).mean() > 0.98  # float16 storage may flip a rare near-tie


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss(toy, kind, tmp_path):
    runner, data = toy
    heads = _heads(kind, runner, data)
    before = evaluate(heads, data)
    state = train(heads, data, TrainConfig(steps=120, batch=32, lr=3e-3, warmup=10, checkpoint_every=1000))
    after = evaluate(heads, data)
    first, last = np.mean(state.losses[:10]), np.mean(state.losses[-10:])
    assert last < 0.7 * first, (first, last)
    assert after["top1"][0] > before["top1"][0]
    assert after["chain_accepted_length"] > before["chain_accepted_length"]


def test_resume_from_a_checkpoint_continues_exactly(toy, tmp_path):
    runner, data = toy
    cfg = TrainConfig(steps=20, batch=16, lr=3e-3, warmup=5, checkpoint_every=10)
    straight = _heads("medusa", runner, data)
    full = train(straight, data, cfg)
    ckpt = tmp_path / "ckpt.safetensors"

    class Interrupted(Exception):
        pass

    def stop_at_12(state, loss):
        if state.step == 12:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(_heads("medusa", runner, data), data, cfg, ckpt, on_step=stop_at_12)
    resumed = _heads("medusa", runner, data)
    state = train(resumed, data, cfg, ckpt)  # picks up at the step-10 checkpoint
    assert state.step == 20 and len(state.losses) == 20
    np.testing.assert_allclose(state.losses, full.losses, rtol=1e-5)
    for a, b in zip(straight.module.state_dict().values(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def trained(toy):
    runner, data = toy
    out = {}
    for kind in KINDS:
        heads = _heads(kind, runner, data)
        train(heads, data, TrainConfig(steps=150, batch=32, lr=3e-3, warmup=10, checkpoint_every=1000))
        out[kind] = heads
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_saved_and_reloaded_heads_give_identical_proposals(toy, trained, kind, tmp_path):
    runner, data = toy
    heads = trained[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_heads(path, heads)
    again = load_heads(path)
    assert again.kind == kind and np.array_equal(again.vocab.ids, heads.vocab.ids)
    a, b = HeadsDrafter(heads, runner), HeadsDrafter(again, runner)
    proposals = 0
    for row in range(0, len(data), 7):
        h = torch.from_numpy(data.hidden[row].astype(np.float32))
        a._h = b._h = h
        root = int(data.tokens[row])
        assert a.propose_branches([root], 3, 3) == b.propose_branches([root], 3, 3)
        proposals += 1
    assert proposals > 10
    with pytest.raises(Exception):
        load_heads(tmp_path / "missing.safetensors")


def _decode(runner, drafter, prompt, spec, params):
    stats = Stats()
    tokens = [t for step in Engine(runner, drafter, spec).generate(prompt, params, stats) for t in step]
    return tokens, stats


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("width", [1, 3])
def test_head_drafted_trees_keep_greedy_equality(toy, trained, kind, width):
    runner, _ = toy
    drafter = HeadsDrafter(trained[kind], runner)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    accepted = 0
    for text in PROMPTS[:4] + ["print('unseen prompt')"]:
        prompt = runner.tokenizer.encode(text)
        runner.keep_hidden = False
        plain, _ = _decode(runner, None, prompt, SpeculativeConfig(), params)
        runner.keep_hidden = True
        spec, stats = _decode(runner, drafter, prompt, SpeculativeConfig(draft="heads", draft_tokens=3, tree_width=width), params)
        assert spec == plain
        assert stats.drafted > 0
        accepted += stats.accepted
    assert accepted > 0  # the heads learned something the target confirms


def test_heads_refuse_another_target(trained):
    from verispec.errors import TokenizerMismatch
    from verispec.heads.file import heads_fit

    other = tiny_runner(seed=1, hidden=32)
    with pytest.raises(TokenizerMismatch):
        heads_fit(trained["medusa"], other)


@pytest.mark.real
def test_llamacpp_hidden_states_and_heads_keep_greedy_equality(smol_source, tmp_path):
    """On llama.cpp: hidden states times the LM head give the logits' argmax, keeping them changes no
    logit, and medusa heads trained a few steps on SmolLM2 keep plain greedy output."""
    from verispec.heads.weights import target_rows
    from verispec.runners.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(smol_source, n_ctx=1024, n_threads=1)
    try:
        prompts = ["def fibonacci(n):", "Write a haiku about the sea."]
        data = distill.generate(runner, prompts, None, budget=400, max_new_tokens=48, meta={"target": runner.name})
        vocab = DraftVocab.most_frequent(data.tokens, runner.n_vocab, 256)
        lm_rows, _ = target_rows(runner, np.arange(runner.n_vocab))
        picked = np.argmax(data.hidden.astype(np.float32) @ lm_rows.T, axis=1)
        assert (picked == data.tokens).mean() > 0.95
        heads = new_heads("medusa", runner, vocab, runner.n_embd, n_heads=2)
        train(heads, data, TrainConfig(steps=30, batch=32, lr=3e-3, warmup=5, checkpoint_every=1000))
        drafter = HeadsDrafter(heads, runner)
        params = SamplingParams(max_tokens=32, ignore_eos=True)
        for text in prompts:
            prompt = distill.prompt_tokens(runner, text)
            runner.keep_hidden = False
            plain, _ = _decode(runner, None, prompt, SpeculativeConfig(), params)
            runner.keep_hidden = True
            for width in (1, 2):
                out, stats = _decode(runner, drafter, prompt, SpeculativeConfig(draft="medusa", draft_tokens=2, tree_width=width), params)
                assert out == plain
                assert stats.drafted > 0
    finally:
        runner.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tree", ["dynamic", "static:3,2,1"])
def test_grown_trees_from_heads_keep_greedy_equality(toy, trained, kind, tree):
    """Trees grown node by node from expand() (EAGLE-2 dynamic trees, Medusa-style static shapes)."""
    import dataclasses

    if "tree" not in {f.name for f in dataclasses.fields(SpeculativeConfig)}:
        pytest.skip("this engine has no grown trees")
    runner, _ = toy
    drafter = HeadsDrafter(trained[kind], runner)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    accepted = 0
    for text in PROMPTS[:3]:
        prompt = runner.tokenizer.encode(text)
        runner.keep_hidden = False
        plain, _ = _decode(runner, None, prompt, SpeculativeConfig(), params)
        runner.keep_hidden = True
        out, stats = _decode(runner, drafter, prompt, SpeculativeConfig(draft="heads", tree=tree, tree_budget=6), params)
        assert out == plain
        accepted += stats.accepted
    assert accepted > 0
