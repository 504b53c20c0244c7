"""Greedy speculative decoding equals plain greedy decoding, token for token, on each runner.

llama.cpp scores in exact chunks, so any divergence there is a bug. On transformers, passes over
several tokens may differ from single-token passes by ~1e-5, so a divergence is a numerical tie
only if the plain run's top-2 logit margin at the first diverging token is below TORCH_TIE.
"""

import copy

import numpy as np
import pytest

from tests.prompts import PROMPTS
from tests.toy import TEST_DEVICE, TableRunner, tiny_llama, tiny_runner, ByteTokenizer
from verispec.drafters.base import Draft, Drafter
from verispec.drafters.draft_model import ModelDrafter
from verispec.drafters.ngram import NgramDrafter
from verispec.draft_length import CarriedCosts, DraftLengthChooser
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.runners.torch import TorchRunner
from verispec.sampling import SamplingParams

TORCH_TIE = 1e-3


def run(engine: Engine, prompt: list[int], params: SamplingParams, record: bool = False) -> tuple[list[int], Stats]:
    stats = Stats()
    tokens = [t for step in engine.generate(prompt, params, stats, record_margins=record) for t in step]
    return tokens, stats


def divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_same_or_tie(plain: list[int], margins: list[float], other: list[int], tie: float, label: str) -> None:
    i = divergence(plain, other)
    if i is None:
        return
    assert tie > 0 and i < len(margins) and margins[i] < tie, f"{label}: diverges at token {i} with margin {margins[i] if i < len(margins) else None}"


# Every lossless drafter and mode, each pinned (fixed K or tree budget) so that it drafts.
QWEN_CONFIGS = (
    SpeculativeConfig(draft="ngram", draft_tokens=4),
    SpeculativeConfig(draft="qwen2.5-coder-0.5b", draft_tokens=4),
    SpeculativeConfig(draft="ngram", draft_tokens=4, tree_width=3),
    SpeculativeConfig(draft="qwen2.5-coder-0.5b", draft_tokens=3, tree_width=2),
    SpeculativeConfig(draft="qwen2.5-coder-0.5b", tree="dynamic", tree_budget=6),
    SpeculativeConfig(draft="ngram", tree="static:3,2,1", tree_budget=6),
    SpeculativeConfig(draft="cascade:ngram,qwen2.5-coder-0.5b", draft_tokens=4),
    SpeculativeConfig(draft="cascade:ngram,qwen2.5-coder-0.5b", draft_tokens=3, acceptance="prefix"),
)


@pytest.fixture(scope="module")
def qwen_drafted():
    """Per config: tokens drafted and accepted over all prompts (each config must draft somewhere)."""
    return {i: [0, 0] for i in range(len(QWEN_CONFIGS))}


# An edit of given code (where n-gram drafts find matches, so every config drafts and has drafts accepted); prose
# and long contexts are in test_long_context.py (the Qwen pair past 1,000 tokens, most of these configs).
@pytest.mark.parametrize("prompt", [PROMPTS[2]])
def test_greedy_equality_llamacpp_qwen_pair(qwen_pair, qwen_drafted, prompt):
    model = qwen_pair
    tokens = model.prompt_tokens(prompt, chat=True)
    params = SamplingParams(max_tokens=24)
    plain, _ = run(model.engine(SpeculativeConfig()), tokens, params)
    for i, spec in enumerate(QWEN_CONFIGS):
        out, stats = run(model.engine(spec), tokens, params)
        assert out == plain, f"{spec} diverges at {divergence(plain, out)}"
        qwen_drafted[i][0] += stats.drafted
        qwen_drafted[i][1] += stats.accepted
        if spec.draft != "ngram":  # a model drafter drafts at every step of a pinned config
            assert stats.drafted > 0, spec


def test_every_qwen_config_drafted_and_had_drafts_accepted(qwen_drafted):
    assert all(drafted > 0 and accepted > 0 for drafted, accepted in qwen_drafted.values()), {
        str(QWEN_CONFIGS[i]): v for i, v in qwen_drafted.items()}


@pytest.fixture(scope="module")
def smol_torch_pair(smol_torch):
    """SmolLM2 on transformers, with a draft that is a noisy copy of it (same vocabulary, imperfect)."""
    import torch

    draft_model = copy.deepcopy(smol_torch.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device) * p.std() * 0.3)
    draft = TorchRunner(draft_model, smol_torch.tokenizer, "smol-noisy", n_ctx=2048, device=str(smol_torch.device))
    return smol_torch, draft


@pytest.fixture(scope="module")
def torch_drafted():
    return [0, 0]  # drafted, accepted by the noisy draft model over all prompts


@pytest.mark.parametrize("prompt", [PROMPTS[i] for i in (0, 5)])  # each writes 16 tokens before EOS
def test_greedy_equality_torch_smollm2(smol_torch_pair, torch_drafted, prompt):
    target, draft = smol_torch_pair
    tokens = target.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=16)
    plain, plain_stats = run(Engine(target), tokens, params, record=True)
    for drafter, spec in ((NgramDrafter(), SpeculativeConfig(draft="x", draft_tokens=4)),
                          (ModelDrafter(draft), SpeculativeConfig(draft="x", draft_tokens=4)),
                          (ModelDrafter(draft), SpeculativeConfig(draft="x", draft_tokens=3, tree_width=2)),
                          (ModelDrafter(draft), SpeculativeConfig(draft="x", tree="dynamic", tree_budget=6)),
                          (NgramDrafter(), SpeculativeConfig(draft="x", tree="static:3,2,1", tree_budget=9))):
        out, stats = run(Engine(target, drafter, spec), tokens, params)
        assert_same_or_tie(plain, plain_stats.margins, out, TORCH_TIE, f"{drafter.name} {spec}")
        if isinstance(drafter, ModelDrafter):  # a pinned model drafter drafts at every step
            assert stats.drafted > 0, f"{drafter.name} {spec}"
            torch_drafted[0] += stats.drafted
            torch_drafted[1] += stats.accepted


def test_the_noisy_torch_draft_had_drafts_accepted(torch_drafted):
    assert torch_drafted[0] > 0 and torch_drafted[1] > 0, torch_drafted


def _noisy_pair(seed: int) -> tuple[TorchRunner, TorchRunner]:
    """A tiny target and a draft that is the target with noise on its weights: it agrees often, not always."""
    import torch

    target_model = tiny_llama(seed, scale=30)
    draft_model = copy.deepcopy(target_model)
    with torch.no_grad():
        for p in draft_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    target = TorchRunner(target_model.to(TEST_DEVICE), ByteTokenizer(), "t", 512, device=TEST_DEVICE)
    draft = TorchRunner(draft_model.to(TEST_DEVICE), ByteTokenizer(), "d", 512, device=TEST_DEVICE)
    return target, draft


def test_tiny_model_greedy_equality_with_partial_acceptance():
    target, draft = _noisy_pair(0)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    prompt = target.tokenizer.encode("abc abc abc")
    plain, stats_plain = run(Engine(target), prompt, params, record=True)
    out, stats = run(Engine(target, ModelDrafter(draft), SpeculativeConfig(draft="d", draft_tokens=5)), prompt, params)
    assert_same_or_tie(plain, stats_plain.margins, out, TORCH_TIE, "tiny")
    assert 0 < stats.accepted < stats.drafted  # some accepted, some rejected: both paths exercised
    assert stats.target_passes < len(plain)  # fewer target passes than tokens
    assert sum(stats.accepted_lengths) == stats.generated - 1  # the first token comes from the prefill


def test_stats_and_limits():
    target = tiny_runner(0, scale=30)
    params = SamplingParams(max_tokens=17, ignore_eos=True)
    prompt = target.tokenizer.encode("hello hello hello")
    out, stats = run(Engine(target, NgramDrafter(), SpeculativeConfig(draft="ngram", draft_tokens=6)), prompt, params)
    assert len(out) == 17 == stats.generated
    assert stats.finish_reason == "length"
    assert sum(stats.drafted_at_position) == stats.drafted
    assert all(a <= d for a, d in zip(stats.accepted_at_position, stats.drafted_at_position))


def test_eos_ends_generation_and_is_not_emitted():
    target = tiny_runner(0, scale=30)
    prompt = target.tokenizer.encode("hi")
    plain, _ = run(Engine(target), prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    target.tokenizer.eos_ids = frozenset({plain[5]})
    try:
        out, stats = run(Engine(target), prompt, SamplingParams(max_tokens=30))
    finally:
        target.tokenizer.eos_ids = frozenset({2})
    assert plain[5] not in out and stats.finish_reason == "stop"
    assert out == plain[: plain.index(plain[5])]


def test_seeded_sampling_is_reproducible():
    target = tiny_runner(0, scale=3)
    prompt = target.tokenizer.encode("seed")
    params = SamplingParams(max_tokens=25, temperature=0.9, top_p=0.95, seed=123, ignore_eos=True)
    engine = Engine(target, NgramDrafter(1, 3), SpeculativeConfig(draft="ngram", draft_tokens=3))
    assert run(engine, prompt, params)[0] == run(engine, prompt, params)[0]


@pytest.mark.parametrize("params", [dict(temperature=0.9), dict(temperature=1.3, top_k=12), dict(temperature=0.8, top_p=0.9)])
def test_seeded_sampling_does_not_depend_on_drafting(params):
    """A seeded request writes what plain decoding with that seed writes, whatever is drafted and how much.

    The draft length follows measured timings, so without this the same seed gave different text
    from one request to the next (it did, on the server).
    """
    target = TableRunner(40, seed=5, sharpness=2.0)
    prompt = [1, 2, 3, 4]
    params = SamplingParams(max_tokens=60, seed=11, ignore_eos=True, **params)
    plain, _ = run(Engine(target), prompt, params)
    draft = lambda: ModelDrafter(TableRunner(40, seed=5, sharpness=1.5, name="draft"), max_tokens=8)  # noqa: E731
    configs = [(NgramDrafter(1, 2), SpeculativeConfig(draft="ngram", draft_tokens=k)) for k in (1, 3, 6)]
    configs += [(draft(), SpeculativeConfig(draft="d", draft_tokens=k)) for k in (1, 2, 5)]
    configs += [(draft(), SpeculativeConfig(draft="d")), (draft(), SpeculativeConfig(draft="d", draft_tokens=3, tree_width=3)),
                (draft(), SpeculativeConfig(draft="d", tree="dynamic", tree_budget=6))]
    accepted = 0
    for drafter, config in configs:
        out, stats = run(Engine(target, drafter, config), prompt, params)
        assert out == plain, f"{config} diverges at {divergence(plain, out)}"
        accepted += stats.accepted
    assert accepted > 0
    assert run(Engine(target), prompt, SamplingParams(**{**params.__dict__, "seed": 12}))[0] != plain


def test_eos_inside_the_last_step_still_respects_max_tokens():
    """A step may accept several tokens and then EOS; the output must still stop at max_tokens."""
    target = tiny_runner(0, scale=30)
    prompt = target.tokenizer.encode("hello hello hello")
    plain, _ = run(Engine(target), prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    target.tokenizer.eos_ids = frozenset({plain[12]})
    try:
        for max_tokens in (8, 10, 11, 12):
            first_eos = plain.index(plain[12])
            engine = Engine(target, NgramDrafter(1, 3), SpeculativeConfig(draft="ngram", draft_tokens=6))
            out, stats = run(engine, prompt, SamplingParams(max_tokens=max_tokens))
            assert len(out) == min(max_tokens, first_eos) == stats.generated
    finally:
        target.tokenizer.eos_ids = frozenset({2})



class _CountingDrafter(Drafter):
    """A costly drafter that counts its prefills and proposes a fixed token."""

    costly = True
    name = "counting"

    def __init__(self) -> None:
        self.prefills = 0

    def prefill(self, prompt) -> None:
        self.prefills += 1

    def propose(self, context, k: int) -> Draft:
        return Draft([5] * k, None, self.name)


def _learned_not_to_draft(carried: CarriedCosts) -> None:
    """One request's worth of measurements: passes cost 1 s per token, drafts 0.5 s, and nothing is accepted."""
    chooser = DraftLengthChooser(k_max=8, probe_every=None)
    for n in (1, 2, 3):
        chooser.record_verify(n, float(n))
    chooser.record_draft(2, 1.0)
    for _ in range(20):
        chooser.record_acceptance(2, 0)
    carried.absorb(chooser)


def test_measured_costs_carry_to_the_next_request_and_every_eighth_request_re_explores():
    carried = CarriedCosts(explore_every=8)
    _learned_not_to_draft(carried)
    seeded = []
    for _ in range(8):
        chooser = DraftLengthChooser(k_max=8, probe_every=None)
        carried.seed(chooser)
        seeded.append(chooser)
    assert all(not c.would_draft() and c.choose() == 0 for c in seeded[:7])
    assert seeded[7].acceptance == DraftLengthChooser().acceptance and seeded[7].verify_seconds[1] == 1.0


def test_one_odd_request_moves_the_carried_prior_only_partway():
    carried = CarriedCosts(carry_weight=0.5)
    _learned_not_to_draft(carried)
    learned = carried.acceptance
    lucky = DraftLengthChooser(k_max=8, probe_every=None)
    lucky.acceptance = 0.99  # a request whose drafter guessed everything
    lucky.record_verify(1, 3.0)
    carried.absorb(lucky)
    assert carried.acceptance == pytest.approx((learned + 0.99) / 2)
    seeded = DraftLengthChooser(k_max=8, probe_every=None)
    carried.seed(seeded)
    assert seeded.verify_seconds[1] == pytest.approx(2.0) and seeded.verify_seconds[3] == 3.0


class _CatchingUpDrafter(Drafter):
    """A costly drafter that sits out calls 3-17 (as a scheduler's cap of 0 makes it) and then, like a
    draft model, pays 50 ms for each context token it has fallen behind beyond a normal step's two."""

    costly = True
    name = "catching-up"

    def __init__(self) -> None:
        self.calls = self.seen = 0

    def prefill(self, prompt) -> None:
        self.seen = len(prompt)

    def propose(self, context, k: int) -> Draft:
        import time

        self.calls += 1
        if 3 <= self.calls <= 17:
            return Draft([], None, self.name)
        time.sleep(0.05 * max(0, len(context) - self.seen - 2))
        self.seen = len(context) + k
        return Draft([5] * k, None, self.name)


def test_a_draft_models_catch_up_after_steps_without_drafting_is_not_its_per_token_cost():
    from tests.toy import TableRunner

    class Watched(Engine):
        """Keeps every per-token draft cost its chooser held (an EMA forgets an outlier a few steps on)."""

        def _chooser(self):
            chooser = super()._chooser()
            learn, self.learned = chooser.record_draft, []

            def record_draft(n_drafted: int, seconds: float) -> None:
                learn(n_drafted, seconds)
                self.learned.append(chooser.draft_seconds_per_token or 0.0)

            chooser.record_draft = record_draft
            return chooser

    drafter = _CatchingUpDrafter()
    engine = Watched(TableRunner(vocab=12), drafter, SpeculativeConfig(draft="catching-up", draft_tokens=2))
    out, stats = run(engine, [1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True))
    assert drafter.calls > 20 and stats.draft_seconds > 0.5  # it caught up on ~15 tokens, and that is counted
    assert 0 < max(engine.learned) < 0.02  # but never taken for the cost of a drafted token


def test_a_step_after_one_without_drafting_does_not_teach_the_draft_cost():
    chooser = DraftLengthChooser()
    chooser.record_draft(2, 0.2)
    chooser.record_draft(0, 0.0)  # the draft model sat this step out
    chooser.record_draft(1, 5.0)  # so this one caught up first
    assert chooser.draft_seconds_per_token == pytest.approx(0.1)
    chooser.record_draft(2, 0.3)
    assert chooser.draft_seconds_per_token == pytest.approx(0.7 * 0.1 + 0.3 * 0.15)


def test_a_costly_drafter_that_does_not_pay_is_not_even_prefilled():
    from tests.toy import TableRunner

    carried = CarriedCosts()
    _learned_not_to_draft(carried)
    drafter = _CountingDrafter()
    engine = Engine(TableRunner(vocab=12), drafter, SpeculativeConfig(draft="counting"), carried)
    out, stats = run(engine, [1, 2, 3], SamplingParams(max_tokens=12, ignore_eos=True))
    assert len(out) == 12 and stats.drafted == 0 and drafter.prefills == 0
    fresh = Engine(TableRunner(vocab=12), drafter, SpeculativeConfig(draft="counting"))
    run(fresh, [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    assert drafter.prefills == 1  # with nothing measured yet it drafts, so it prefills


def test_torch_greedy_equality_past_256_tokens_of_context():
    """The torch runner's preallocated cache and device verification stay exact at long contexts: a ~400-token
    prompt (a tiny model with 512 positions), pinned n-gram and draft-model speculation, 64 new tokens."""
    target, draft = _noisy_pair(5)
    prompt = target.tokenizer.encode("def area(width, height):\n    return width * height\n" * 9)[:400]
    assert len(prompt) > 256
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    plain, plain_stats = run(Engine(target), prompt, params, record=True)
    for drafter, k in ((NgramDrafter(), 4), (ModelDrafter(draft), 3)):
        out, stats = run(Engine(target, drafter, SpeculativeConfig(draft="x", draft_tokens=k)), prompt, params)
        assert_same_or_tie(plain, plain_stats.margins, out, TORCH_TIE, drafter.name)
        assert stats.drafted > 0, drafter.name
