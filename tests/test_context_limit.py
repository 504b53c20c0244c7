"""A request that fills the context stops with finish_reason "context", plain or speculative.

The target is a TableRunner with a small n_ctx that, like a real KV cache, refuses a forward pass
past n_ctx. The prompt is 6 tokens and max_tokens is far beyond the context, so only the context
can end the request.
"""

import pytest

from tests.toy import TableRunner
from verispec.drafters.draft_model import ModelDrafter
from verispec.drafters.ngram import NgramDrafter
from verispec.engine import Engine, SpeculativeConfig, Stats
from verispec.sampling import SamplingParams

VOCAB = 12
PROMPT = [1, 2, 3, 4, 5, 6]
PARAMS = SamplingParams(max_tokens=1000, ignore_eos=True)


class BoundedTable(TableRunner):
    """A TableRunner whose cache holds n_ctx tokens; `peak` is the most it ever held, tree passes included."""

    def __init__(self, n_ctx: int) -> None:
        super().__init__(VOCAB, seed=0)
        self.n_ctx = n_ctx
        self.peak = 0

    def forward(self, tokens, parents=None, all_logits=True):
        held = len(self.context) + len(tokens)
        if held > self.n_ctx:
            raise AssertionError(f"a pass over {held} tokens in a context of {self.n_ctx}")
        self.peak = max(self.peak, held)
        return super().forward(tokens, parents, all_logits)


def oracle() -> ModelDrafter:
    return ModelDrafter(TableRunner(VOCAB, seed=0, name="oracle"))  # the target's own table: every draft passes


CASES = {
    "plain": lambda: (None, None),
    "ngram K=4": lambda: (NgramDrafter(1, 3), SpeculativeConfig(draft="x", draft_tokens=4)),
    "oracle K=4": lambda: (oracle(), SpeculativeConfig(draft="x", draft_tokens=4)),
    "oracle static tree": lambda: (oracle(), SpeculativeConfig(draft="x", tree="static:3,2,1", tree_budget=12)),
}


def run(case: str, n_ctx: int) -> tuple[list[int], Stats, BoundedTable]:
    target = BoundedTable(n_ctx)
    drafter, spec = CASES[case]()
    stats = Stats()
    out = [t for step in Engine(target, drafter, spec).generate(PROMPT, PARAMS, stats) for t in step]
    return out, stats, target


@pytest.mark.parametrize("n_ctx", [20, 23])
@pytest.mark.parametrize("case", list(CASES))
def test_a_full_context_ends_the_request_with_finish_reason_context(case, n_ctx):
    out, stats, target = run(case, n_ctx)
    assert stats.finish_reason == "context"
    assert target.peak <= n_ctx and target.n_past <= n_ctx
    assert len(out) == stats.generated
    assert len(PROMPT) + len(out) >= n_ctx, "stopped before the context was full"


def test_plain_decoding_writes_exactly_the_context():
    for n_ctx in (20, 23):
        out, stats, target = run("plain", n_ctx)
        assert len(PROMPT) + len(out) == n_ctx and target.peak == n_ctx - 1


@pytest.mark.parametrize("n_ctx", [20, 23])
@pytest.mark.parametrize("case", [
    "ngram K=4",
    "oracle K=4",
    "oracle static tree",
])
def test_speculation_at_the_context_limit_writes_what_plain_decoding_writes(case, n_ctx):
    plain, _, _ = run("plain", n_ctx)
    out, _, _ = run(case, n_ctx)
    assert out == plain
