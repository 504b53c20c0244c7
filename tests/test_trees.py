"""Grown token trees (dynamic and static), the cascade drafter, prefix mode and relaxed acceptance.

The target here is TableRunner, whose logits are an exact function of the context, so greedy
equality must hold token for token; the real-model versions of these checks are in test_engine.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.toy import TableRunner
from verispec.draft_length import TreeBudgetChooser
from verispec.drafters.base import Candidates, Draft, Drafter
from verispec.drafters.cascade import CascadeDrafter
from verispec.drafters.draft_model import ModelDrafter
from verispec.drafters.ngram import NgramDrafter
from verispec.drafters.tree_growth import TreeShape, grow_tree
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.errors import InvalidParameter
from verispec.token_tree import leaf_sequences, nodes_within_leaves, tree_depths
from verispec.sampling import SamplingParams

VOCAB = 12


class NoisyTable(TableRunner):
    """A draft that mostly agrees with TableRunner(seed): the same table plus noise from another seed."""

    def __init__(self, seed: int = 0, noise: float = 0.8) -> None:
        super().__init__(VOCAB, seed, name="noisy-draft")
        self._noise = TableRunner(VOCAB, seed + 1000)
        self._noise_scale = noise

    def logits(self, context):
        return super().logits(context) + self._noise_scale * self._noise.logits(context)


class FixedExpander(Drafter):
    """Expands every node into tokens 1..width with probabilities 0.5, 0.25, ... (for shape tests)."""

    name = "fixed"

    def __init__(self) -> None:
        self.calls = 0

    def propose(self, context, k):
        return Draft([1] * k)

    def expand(self, context, width):
        self.calls += 1
        probs = 0.5 ** np.arange(1, width + 1)
        return Candidates(list(range(1, width + 1)), probs, self.name)


def run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], Stats]:
    stats = Stats()
    return [t for step in engine.generate(prompt, params, stats) for t in step], stats


def test_tree_shape_parsing():
    assert TreeShape.parse("dynamic").kind == "dynamic"
    shape = TreeShape.parse("static:4,2,2,1")
    assert shape.branching == (4, 2, 2, 1) and shape.full_size() == 4 + 8 + 16 + 16
    for bad in ("static:", "static:0,2", "static:a", "wide", "static:" + ",".join(["2"] * 17)):
        with pytest.raises(InvalidParameter):
            TreeShape.parse(bad)
    with pytest.raises(InvalidParameter):
        SpeculativeConfig(tree="bushy")
    with pytest.raises(InvalidParameter):
        SpeculativeConfig(acceptance="relaxed:1.5")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=30), st.integers(1, 6))
def test_a_tree_cut_to_its_leaves_is_its_longest_leading_run_within_them(raw, max_leaves):
    parents = [-1] + [p % (i + 1) for i, p in enumerate(raw)]  # each node's parent precedes it

    def leaves(m: int) -> int:  # among the first m nodes: those without a child
        return m - len({p for p in parents[1:m]})

    n = nodes_within_leaves(parents, max_leaves)
    assert 1 <= n <= len(parents) and leaves(n) <= max_leaves
    assert n == len(parents) or leaves(n + 1) > max_leaves
    assert max(max(ids) for ids in leaf_sequences(parents[:n])) == leaves(n)  # the sequence ids llama.cpp needs


def test_a_runner_holding_few_leaves_gets_trees_cut_to_them_and_output_stays_plain():
    """A wide static tree on a target that holds 2 leaf sequences (a llama.cpp pool's share per slot)."""
    target = TableRunner(VOCAB, 3)
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, VOCAB, 12)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    plain, _ = run(Engine(target), prompt, params)
    seen = []
    forward = target.forward

    def spy(tokens, parents=None, all_logits=True):
        if parents is not None:
            seen.append(max(max(ids) for ids in leaf_sequences(parents)))
        return forward(tokens, parents, all_logits)

    target.forward, target.max_tree_leaves = spy, 2
    spec = SpeculativeConfig(draft="x", tree="static:3,3,2", tree_budget=20)
    out, stats = run(Engine(target, ModelDrafter(NoisyTable(3)), spec), prompt, params)
    assert out == plain and stats.drafted > 0
    assert seen and max(seen) == 2  # cut, and to no fewer leaves than it may hold


def test_static_tree_has_the_requested_branching():
    tree = grow_tree(FixedExpander(), [7, 8, 9], TreeShape.parse("static:3,2,1"), budget=64, expansions=0)
    depths = tree_depths(tree.parents)
    assert tree.tokens[0] == 9 and tree.parents[0] == -1
    assert [int((depths == d).sum()) for d in range(4)] == [1, 3, 6, 6]
    kids = tree.children()
    assert all(len(kids[n]) == (3, 2, 1, 0)[depths[n]] for n in range(len(tree)))
    assert tree.tokens[1:4] == [1, 1, 1]  # the most probable chain comes first: runners keep it in place


def test_static_tree_respects_the_budget():
    tree = grow_tree(FixedExpander(), [5], TreeShape.parse("static:4,4,4"), budget=10, expansions=0)
    assert len(tree) == 11


def test_dynamic_tree_keeps_the_most_probable_nodes():
    drafter = FixedExpander()
    tree = grow_tree(drafter, [3], TreeShape("dynamic", width=3), budget=6, expansions=10)
    assert len(tree) == 7 and drafter.calls <= 10
    # cumulative probabilities: 1 -> .5, 2 -> .25, 1,1 -> .25, 3 -> .125, 1,2 -> .125, 2,1 -> .125, 1,1,1 -> .125
    paths = set()
    for node in range(1, len(tree)):
        path, n = [], node
        while n > 0:
            path.append(tree.tokens[n])
            n = tree.parents[n]
        paths.add(tuple(path[::-1]))
    assert {(1,), (2,), (1, 1)} <= paths
    assert all(p[:-1] in paths or len(p) == 1 for p in paths)  # ancestors are always included
    assert tree.tokens[1:3] == [1, 1] and tree.parents[1:3] == [0, 1]  # the most probable chain first


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=30), min_size=1, max_size=6), st.integers(1, 6))
def test_ngram_index_follows_any_sequence_of_contexts(contexts, k):
    """Reusing one drafter across diverging contexts proposes exactly what a fresh drafter would."""
    reused = NgramDrafter(1, 3)
    for context in contexts:
        assert reused.propose(context, k).tokens == NgramDrafter(1, 3).propose(context, k).tokens
        assert reused.expand(context, 3).tokens == NgramDrafter(1, 3).expand(context, 3).tokens


def test_ngram_expand_ranks_the_latest_longest_match_first():
    ctx = [1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3]
    cands = NgramDrafter(1, 3).expand(ctx, 4)
    assert cands.tokens[0] == 9  # "1 2 3" was followed by 9: the longest match wins
    assert set(cands.tokens) >= {9, 7}
    assert np.all(np.diff(cands.probs) <= 0) and cands.probs.sum() <= 1.0 + 1e-9


def drafters_under_test(seed: int):
    target = TableRunner(VOCAB, seed)
    model = lambda: ModelDrafter(NoisyTable(seed))  # noqa: E731
    return target, {
        "ngram dynamic": (NgramDrafter(1, 3), SpeculativeConfig(draft="x", tree="dynamic")),
        "model dynamic b8": (model(), SpeculativeConfig(draft="x", tree="dynamic", tree_budget=8)),
        "model static": (model(), SpeculativeConfig(draft="x", tree="static:3,2,1", tree_budget=12)),
        "cascade chain": (CascadeDrafter([NgramDrafter(1, 3), model()], VOCAB), SpeculativeConfig(draft="x", draft_tokens=5)),
        "cascade dynamic": (CascadeDrafter([NgramDrafter(1, 3), model()], VOCAB),
                            SpeculativeConfig(draft="x", tree="dynamic", tree_budget=10)),
        "cascade prefix": (CascadeDrafter([NgramDrafter(1, 3), model()], VOCAB),
                           SpeculativeConfig(draft="x", draft_tokens=4, acceptance="prefix")),
        "relaxed tau=1": (model(), SpeculativeConfig(draft="x", draft_tokens=4, acceptance="relaxed:1.0")),
    }


@pytest.mark.parametrize("seed", range(20))
def test_greedy_equality_for_trees_cascades_and_prefixes(seed):
    target, cases = drafters_under_test(seed)
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(0, VOCAB, 12)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain, _ = run(Engine(target), prompt, params)
    for label, (drafter, spec) in cases.items():
        out, stats = run(Engine(target, drafter, spec), prompt, params)
        assert out == plain, f"{label} diverges"
        steps = stats.accepted_lengths  # tokens per target pass; the first of the 40 came from the prefill
        assert sum(steps[:-1]) < 39 <= sum(steps), f"{label}: passes went on after max_tokens was reached"
        assert all(1 <= n <= d + 1 for n, d in zip(steps, stats.draft_lengths)), f"{label} accepted undrafted tokens"


class CountingTable(NoisyTable):
    """A draft model that counts its passes."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.passes = 0

    def forward(self, tokens, parents=None, all_logits=True):
        self.passes += 1
        return super().forward(tokens, parents, all_logits)


@pytest.mark.parametrize("label", ["model dynamic b8", "model static", "cascade chain", "cascade dynamic", "cascade prefix"])
def test_every_draft_model_pass_of_trees_and_cascades_is_yielded_by_the_step(label):
    """A grown tree's expansions, a branch tree's chain and a cascade's model level run their draft-model passes
    as DraftPasses yielded by Engine.steps, so that the server's stepper fuses them with other requests' passes
    (one draft decode per round, stepper.Stepper._draft): after the prompt, no pass runs behind the stepper's
    back. Driven here the way the stepper drives it, the output is plain decoding's."""
    from verispec.drafters.base import DraftPass
    from verispec.engine import Forward

    target = TableRunner(VOCAB, 4)
    draft_runner = CountingTable(4)
    drafter = ModelDrafter(draft_runner)
    if label.startswith("cascade"):
        drafter = CascadeDrafter([NgramDrafter(3, 3), drafter], VOCAB)  # trigrams: the model level drafts too
    spec = drafters_under_test(4)[1][label][1]
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, VOCAB, 12)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    steps, out, yielded = Engine(target, drafter, spec).steps(prompt, params), [], 0
    event = next(steps)  # the prompt's pass; the draft model has prefilled the prompt on the way
    passes_before = draft_runner.passes
    while True:
        if isinstance(event, Forward):
            reply = target.forward(event.tokens, event.parents, event.all_logits)
        elif isinstance(event, DraftPass):
            yielded += 1
            reply = event.run()
        else:
            out += event
            reply = None
        try:
            event = steps.send(reply)
        except StopIteration:
            break
    assert yielded > 0
    assert draft_runner.passes - passes_before == yielded
    assert out == run(Engine(target), prompt, params)[0]


@pytest.mark.parametrize("seed", range(3))
def test_a_perfect_draft_is_accepted_whole_at_every_step(seed):
    """A drafter that is the target itself: every greedy step keeps its whole chain, or the tree's deepest path."""
    target = TableRunner(VOCAB, seed)
    prompt = [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, 12)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain, _ = run(Engine(target), prompt, params)
    for spec, per_step in ((SpeculativeConfig(draft="x", draft_tokens=4), 5),  # 4 drafts + the bonus
                           (SpeculativeConfig(draft="x", tree="static:3,2,1", tree_budget=12), 4)):  # depth 3 + bonus
        out, stats = run(Engine(target, ModelDrafter(TableRunner(VOCAB, seed, name="oracle")), spec), prompt, params)
        assert out == plain
        passes = -(-39 // per_step)  # the fewest passes that reach 40 tokens after the prefill's one
        assert stats.accepted_lengths == [per_step] * passes, spec


def test_trees_accept_more_per_pass_than_chance():
    target, cases = drafters_under_test(3)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4]
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    _, stats = run(Engine(target, *cases["model static"]), prompt, params)
    assert stats.mean_accepted_length > 1.5 and stats.target_passes < 40
    assert max(stats.draft_lengths) <= 12


def test_cascade_records_which_level_proposed_accepted_tokens():
    target = TableRunner(VOCAB, 5)
    cascade = CascadeDrafter([NgramDrafter(1, 3), ModelDrafter(NoisyTable(5))], VOCAB)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    _, stats = run(Engine(target, cascade, SpeculativeConfig(draft="x", draft_tokens=6)), prompt,
                   SamplingParams(max_tokens=60, ignore_eos=True))
    assert set(stats.drafted_by_source) == {"ngram", "noisy-draft"}
    assert sum(stats.drafted_by_source.values()) == stats.drafted
    assert sum(stats.accepted_by_source.values()) == stats.accepted
    assert all(stats.accepted_by_source.get(s, 0) <= n for s, n in stats.drafted_by_source.items())
    assert "accepted by level" in stats.summary()


def test_cascade_sampling_draft_rows_are_one_hot_for_ngram_tokens():
    cascade = CascadeDrafter([NgramDrafter(1, 2), ModelDrafter(NoisyTable(0))], VOCAB)
    cascade.begin([1, 2, 1], SamplingParams(temperature=0.8, seed=1), np.random.default_rng(1))
    draft = cascade.propose([1, 2, 1], 4)
    assert draft.sources[0] == "ngram" and draft.tokens[0] == 2
    assert draft.probs.shape == (len(draft.tokens), VOCAB)
    assert draft.probs[0, 2] == 1.0 and draft.probs[0].sum() == 1.0
    model_rows = [i for i, s in enumerate(draft.sources) if s != "ngram"]
    assert model_rows and all(abs(draft.probs[i].sum() - 1) < 1e-9 and draft.probs[i].max() < 1 for i in model_rows)


def test_relaxed_acceptance_is_lossy_and_accepts_more():
    """relaxed:TAU with a small TAU accepts near-misses: more tokens per pass, output departs from exact."""
    target = TableRunner(VOCAB, 7, sharpness=0.3)  # flat distributions: many near-ties
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    prompt = [1, 2, 3]
    plain, _ = run(Engine(target), prompt, params)
    _, exact = run(Engine(target, ModelDrafter(NoisyTable(7, noise=3.0)), SpeculativeConfig(draft="x", draft_tokens=4)), prompt, params)
    out, relaxed = run(Engine(target, ModelDrafter(NoisyTable(7, noise=3.0)),
                              SpeculativeConfig(draft="x", draft_tokens=4, acceptance="relaxed:0.3")), prompt, params)
    assert out != plain
    assert relaxed.acceptance_rate > exact.acceptance_rate


def test_budget_chooser_measures_every_budget_then_keeps_the_fastest():
    chooser = TreeBudgetChooser(budgets=(0, 4, 8), warmup=2, explore_every=10)
    rates = {0: 10.0, 4: 14.0, 8: 12.0}  # tokens per second of each arm
    picks = []
    for _ in range(40):
        budget = chooser.choose()
        picks.append(budget)
        chooser.record(budget, tokens=2, seconds=2 / rates[budget])
    assert picks[:6] == [0, 0, 4, 4, 8, 8]
    assert chooser.best() == 4
    assert picks[6:].count(4) >= 30 and set(picks[6:]) <= {0, 4, 8}


def test_budget_chooser_stops_warming_up_at_the_first_slower_budget():
    chooser = TreeBudgetChooser(budgets=(0, 4, 8, 16), warmup=1, explore_every=None)
    picks = []
    for _ in range(12):
        budget = chooser.choose()
        picks.append(budget)
        chooser.record(budget, tokens=1, seconds=0.05 * (1 + budget))
    assert picks == [0, 4] + [0] * 10  # 4 lost to 0: 8 and 16 are never tried, nor re-explored


def test_budget_chooser_turns_trees_off_when_they_do_not_pay():
    chooser = TreeBudgetChooser(budgets=(0, 4, 8, 16), warmup=1)
    for _ in range(30):
        budget = chooser.choose()
        chooser.record(budget, tokens=1 + budget // 8, seconds=0.05 * (1 + budget))  # linear verify cost, as on 2 cores
    assert chooser.best() == 0


def test_adaptive_budget_on_the_engine_picks_among_measured_budgets():
    target = TableRunner(VOCAB, 2)
    engine = Engine(target, NgramDrafter(1, 3), SpeculativeConfig(draft="ngram", tree="dynamic"))
    for seed in range(3):
        prompt = [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, 10)]
        run(engine, prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    assert {0, 4} <= set(engine.budget_chooser.tries) <= set(engine.budget_chooser.budgets)
