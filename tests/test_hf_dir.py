"""`--model` also takes a Hugging Face model directory (runs on the transformers runner)."""

import pytest
from typer.testing import CliRunner

from tests.toy import tiny_llama
from verispec import SamplingParams, SpeculativeConfig, load
from verispec.cli import app


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-hf")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, speculative decoding is lossless"] * 50, vocab_size=300,
                            special_tokens=["<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    tokenizer.save_pretrained(directory)
    model = tiny_llama(0, vocab=300, scale=20)
    model.config.bos_token_id, model.config.eos_token_id = 0, 1
    model.save_pretrained(directory)
    return directory


def test_load_a_hugging_face_directory(hf_dir):
    model = load(str(hf_dir))
    assert model.backend == "torch"
    plain = model.generate("hello world", SamplingParams(max_tokens=12, ignore_eos=True))
    spec = model.generate("hello world", SamplingParams(max_tokens=12, ignore_eos=True),
                          spec=SpeculativeConfig(draft="ngram", draft_tokens=3))
    assert len(plain.tokens) == 12 and spec.tokens == plain.tokens
    assert model.prompt_tokens("hi", chat=True)


def test_cli_generate_on_a_hugging_face_directory(hf_dir):
    result = CliRunner().invoke(app, ["generate", "--model", str(hf_dir), "-p", "hello", "-n", "5"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output
