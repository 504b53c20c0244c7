"""The OpenAI fields agents use, over HTTP with the `openai` client, on a toy torch model served from its paged
pool: logprobs / top_logprobs on both endpoints, logit_bias, presence and frequency penalties and min_p, each
writing with speculation what it writes without, and the library's plain run's numbers."""

import math

import openai
import pytest

from tests.test_server import _serving
from tests.toy import BYTE_OFFSET, ByteTokenizer, tiny_llama
from verispec.api import Model
from verispec.engine import SpeculativeConfig
from verispec.runners.torch import TorchRunner
from verispec.sampling import SamplingParams

PROMPT = "abc abc abc abc abc"
PLAIN = {"draft": "none"}
DRAFTED = {"draft": "ngram", "draft_tokens": 4}


@pytest.fixture(scope="module")
def served():
    from verispec.serve import ServeConfig

    base = Model(TorchRunner(tiny_llama(0, scale=30), ByteTokenizer(), "tiny", n_ctx=512), "torch")
    with _serving(base, ServeConfig(model="tiny", max_batch=2, ctx=256, kv_pool=512, api_key="k")) as running:
        yield running


def complete(served, speculative: dict, **fields):
    extra = {"speculative": speculative, **fields.pop("extra", {})}
    out = served.client("k").completions.create(model="tiny", prompt=PROMPT, max_tokens=40, extra_body=extra,
                                                 **{"temperature": 0, **fields})
    return out.choices[0], out.model_extra["speculative"]


def chat(served, speculative: dict, **fields):
    extra = {"speculative": speculative, **fields.pop("extra", {})}
    out = served.client("k").chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                      max_tokens=40, extra_body=extra, **{"temperature": 0, **fields})
    return out.choices[0], out.model_extra["speculative"]


def spell(token: int) -> str:
    return ByteTokenizer().token_bytes(token).decode("utf-8", "replace")


def library(served, **params):
    """The library's plain run of the same completion (no pool, no drafting): tokens and logprobs."""
    completion = served.base.generate(PROMPT, SamplingParams(max_tokens=40, **params),
                                      spec=SpeculativeConfig(draft=None))
    return completion.tokens, completion.stats.logprobs


def test_completion_logprobs_equal_the_plain_run_with_and_without_drafting(served):
    tokens, expected = library(served, logprobs=3)
    results = [complete(served, spec, logprobs=3) for spec in (PLAIN, DRAFTED)]
    assert results[1][1]["accepted"] > 0
    for choice, _ in results:
        got = choice.logprobs
        assert got.tokens == [spell(t) for t in tokens]
        for logprob, top, entry in zip(got.token_logprobs, got.top_logprobs, expected, strict=True):
            assert logprob == pytest.approx(entry.logprob, abs=1e-4)
            assert set(top) == {spell(t) for t, _ in entry.top} and max(top.values()) >= logprob - 1e-9
        assert got.text_offset == list(range(len(tokens)))  # one character per byte token here
    assert results[0][0].logprobs.token_logprobs == pytest.approx(results[1][0].logprobs.token_logprobs, abs=1e-4)


def test_chat_logprobs_equal_with_and_without_drafting_and_stream_as_whole(served):
    plain, _ = chat(served, PLAIN, logprobs=True, top_logprobs=5)
    drafted, spec = chat(served, DRAFTED, logprobs=True, top_logprobs=5)
    assert spec["accepted"] > 0 and plain.message.content == drafted.message.content
    entries = plain.logprobs.content
    assert "".join(e.token for e in entries) == plain.message.content
    assert all(len(e.top_logprobs) == 5 and bytes(e.bytes).decode("utf-8", "replace") == e.token for e in entries)
    assert all(len(e.bytes) == 1 for e in entries)  # a byte per token here
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-9 and e.logprob <= 0 for e in entries)
    assert [e.logprob for e in drafted.logprobs.content] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    stream = served.client("k").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=0, stream=True,
        logprobs=True, top_logprobs=5, extra_body={"speculative": DRAFTED})
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)


def test_no_logprobs_unless_asked(served):
    assert complete(served, PLAIN)[0].logprobs is None
    assert chat(served, PLAIN)[0].logprobs is None
    assert chat(served, PLAIN, logprobs=True)[0].logprobs.content[0].top_logprobs == []


EDITS = {
    "logit_bias": dict(logit_bias={str(ord("r") + BYTE_OFFSET): -100, str(ord("Z") + BYTE_OFFSET): -100}),
    "presence_penalty": dict(presence_penalty=0.5),
    "frequency_penalty": dict(frequency_penalty=0.5),
    "min_p": dict(extra={"min_p": 0.2}, temperature=0.8, seed=5),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_each_edit_writes_with_drafting_what_it_writes_without(served, edit):
    plain, _ = complete(served, PLAIN, **EDITS[edit])
    drafted, spec = complete(served, DRAFTED, **EDITS[edit])
    assert drafted.text == plain.text and spec["accepted"] > 0
    if edit != "min_p":
        assert plain.text != complete(served, PLAIN)[0].text
    if edit == "logit_bias":
        assert "r" not in plain.text and "Z" not in plain.text


@pytest.mark.parametrize("fields,param", [
    (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={"999": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(extra={"min_p": 1.5}), "min_p"),
    (dict(logprobs=21), "logprobs")])
def test_out_of_range_fields_get_400_naming_them(served, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        complete(served, PLAIN, **fields)
    assert err.value.body["param"] == param


def test_top_logprobs_without_logprobs_is_400(served):
    with pytest.raises(openai.BadRequestError) as err:
        chat(served, PLAIN, top_logprobs=3)
    assert err.value.body["param"] == "top_logprobs"


def test_logprobs_are_finite_json_under_a_bias_of_minus_100(served):
    choice, _ = chat(served, PLAIN, logprobs=True, top_logprobs=20,
                     logit_bias={str(t): -100 for t in range(BYTE_OFFSET, BYTE_OFFSET + 40)})
    assert all(math.isfinite(e.logprob) and all(math.isfinite(t.logprob) for t in e.top_logprobs)
               for e in choice.logprobs.content)
