"""The Python API: load(), generate(), stream(), chat templates and stop strings."""

import pytest

from tests.toy import ByteTokenizer
from verispec import SamplingParams, SpeculativeConfig, load
from verispec.api import TextAssembler
from verispec.errors import PromptError
from verispec.models.chat import gguf_chat_template, render_chat


@pytest.fixture(scope="module")
def smol(smol_source):
    model = load("smollm2-135m", n_ctx=1024)
    yield model
    model.close()


def test_generate_returns_text_tokens_and_stats(smol):
    out = smol.generate("The capital of France is", SamplingParams(max_tokens=12))
    assert out.text and len(out.tokens) == out.stats.generated <= 12
    assert out.stats.tokens_per_second > 0 and out.stats.prefill_seconds > 0


def test_stream_concatenates_to_generate(smol):
    params = SamplingParams(max_tokens=20)
    chunks = list(smol.stream("List three colors:", params, spec=SpeculativeConfig(draft="ngram")))
    assert "".join(c.text for c in chunks) == smol.generate("List three colors:", params).text
    assert len(chunks) > 1


def test_chat_uses_the_models_template(smol, smol_source):
    tokens = smol.prompt_tokens("Hello!", chat=True)
    text = smol.tokenizer.decode(tokens)
    assert "Hello!" in text
    assert len(tokens) > len(smol.prompt_tokens("Hello!"))
    # The prompt built independently of render_chat: the template as stored in the GGUF file (llama.cpp
    # hands the runner its own copy), rendered by plain Jinja with Hugging Face's settings.
    from jinja2 import Environment

    messages = [{"role": "user", "content": "Say hi."}]
    rendered = Environment(trim_blocks=True, lstrip_blocks=True).from_string(gguf_chat_template(smol_source.path)).render(
        messages=messages, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>user\nSay hi.<|im_end|>\n"
                                                                             "<|im_start|>assistant\n")
    expected = smol.tokenizer.encode(rendered)
    assert smol.prompt_tokens(messages=messages) == expected
    out = smol.generate(messages=messages, params=SamplingParams(max_tokens=8))
    assert out.stats.prompt_tokens == len(expected)


def test_stop_strings_cut_the_text(smol):
    params = SamplingParams(max_tokens=40)
    full = smol.generate("Count: 1, 2, 3,", params).text
    assert "," in full
    stop = full[full.index(",") : full.index(",") + 1]
    cut = smol.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=40, stop=[stop]))
    assert cut.text == full[: full.index(",")] and cut.finish_reason == "stop"


def test_text_assembler_holds_back_partial_stop_strings():
    tok = ByteTokenizer()
    asm = TextAssembler(tok, ["STOP"])
    out = asm.add(tok.encode("hello ST", add_special=False))
    assert out == "hello "
    out += asm.add(tok.encode("OP world", add_special=False))
    assert asm.stopped and out == "hello "


def test_text_assembler_waits_for_complete_utf8():
    tok = ByteTokenizer()
    asm = TextAssembler(tok, [])
    euro = tok.encode("€", add_special=False)
    assert asm.add(euro[:2]) == ""
    assert asm.add(euro[2:]) == "€"


def test_render_chat_errors():
    with pytest.raises(PromptError):
        render_chat(None, [{"role": "user", "content": "x"}])
    with pytest.raises(PromptError):
        render_chat("{{ messages }}", [{"role": "user"}])


def test_text_assembler_decodes_a_window_not_the_whole_output():
    """Each add decodes the last few tokens only (a step's cost does not grow with the output), and the text is the
    whole decode's, multi-byte characters split across adds included."""
    tok = ByteTokenizer()
    calls: list[int] = []
    decode = tok.decode
    tok.decode = lambda tokens: calls.append(len(tokens)) or decode(tokens)
    text = "naïve €uro 😀 " * 50
    ids = tok.encode(text, add_special=False)
    asm, out = TextAssembler(tok, ["NEVER"]), ""
    for i in range(0, len(ids), 3):
        out += asm.add(ids[i : i + 3])
    out += asm.flush()
    assert out == text
    assert max(calls) <= 12  # the last add and those a split 4-byte character spans, not the ~900 tokens so far


def test_text_assembler_stops_at_the_earliest_stop_string_across_adds():
    tok = ByteTokenizer()
    asm = TextAssembler(tok, ["world", "lo w"])
    out = asm.add(tok.encode("hel", add_special=False)) + asm.add(tok.encode("lo wor", add_special=False))
    assert asm.stopped and out == "hel"
    asm = TextAssembler(tok, ["€"])
    euro = tok.encode("a€b", add_special=False)
    assert asm.add(euro[:2]) == "" and not asm.stopped  # "a" waits with the incomplete character's bytes
    assert asm.add(euro[2:]) == "a" and asm.stopped
    tail = TextAssembler(tok, [])
    assert tail.add(tok.encode("€", add_special=False)[:2]) == "" and tail.flush() == "\ufffd"


@pytest.mark.parametrize("template", ["{{ messages[0].content / 2 }}", "{{ messages[3].content.upper() }}",
                                      "{{ messages.__class__.__subclasses__() }}",
                                      "{{ 1 // 0 }}"])
def test_render_chat_turns_any_template_error_into_a_prompt_error(template):
    """A template's own failure (undefined values, a sandbox refusal, arithmetic) is about these messages: a PromptError
    the server answers with a 400, as raise_exception() is, not a 500."""
    with pytest.raises(PromptError, match="chat template"):
        render_chat(template, [{"role": "user", "content": "x"}])
