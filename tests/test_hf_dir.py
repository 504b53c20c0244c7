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


def test_dtype_is_chosen_per_device_and_bad_names_are_refused(hf_dir):
    import torch

    from verispec.errors import InvalidParameter
    from verispec.runners.torch import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    assert load(str(hf_dir)).target.dtype == torch.float32
    with pytest.raises(InvalidParameter, match="dtype"):
        load(str(hf_dir), dtype="int3")


def test_a_device_this_machine_lacks_is_refused_before_loading(hf_dir):
    import torch

    from verispec.errors import InvalidParameter

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InvalidParameter, match="--device cuda: torch sees 0 CUDA device"):
        load(str(hf_dir), backend="torch", device="cuda")
    with pytest.raises(InvalidParameter, match="device must be"):
        load(str(hf_dir), backend="torch", device="tpu")


def test_weights_that_do_not_fit_the_gpu_are_refused_with_their_sizes(hf_dir):
    import torch

    from verispec.models.files import resolve
    from verispec.errors import InvalidParameter
    from verispec.runners.torch import check_weights_fit, parameter_count

    source = resolve(str(hf_dir))
    params = parameter_count(source)
    assert params == sum(p.numel() for p in load(str(hf_dir)).target.model.parameters())
    check_weights_fit(source, torch.bfloat16, "cuda", available=2 * params)  # fits exactly
    with pytest.raises(InvalidParameter, match=r"needs 0\.00 GiB .* in fp32 but cuda has 0\.00 GiB free"):
        check_weights_fit(source, torch.float32, "cuda", available=4 * params - 1)


def test_bf16_on_the_torch_runner_drafts_and_keeps_greedy_equality(hf_dir):
    """--dtype bf16 reaches the target and its draft model; on this tiny, sharp model (logit margins far
    above bf16's rounding) speculative output equals plain output."""
    import torch

    model = load(str(hf_dir), dtype="bf16")
    assert model.target.dtype == torch.bfloat16
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    plain = model.generate("hello world", params)
    spec = model.generate("hello world", params, spec=SpeculativeConfig(draft=str(hf_dir), draft_tokens=3))
    assert spec.stats.drafted > 0 and spec.stats.accepted > 0  # the model drafting for itself, in bf16 too
    assert spec.tokens == plain.tokens


def test_llama_cpp_refuses_a_dtype():
    from verispec.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="torch backend"):
        load("smollm2-135m", dtype="bf16")


@pytest.mark.parametrize("backend", [["--backend", "torch"], []], ids=["--backend torch", "auto"])
def test_bench_runs_the_torch_backend_like_llama_cpp(hf_dir, tmp_path, backend):
    """`verispec bench --backend torch --dtype fp32`: the same report, methods side by side, noise measured on
    the torch runner, and no llama.cpp-only parts (derived GGUF formats, the llama-server reference)."""
    import json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "h", "category": "code-edit", "prompt": "hello world, hello world"}) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", "--target", str(hf_dir), *backend, "--dtype", "fp32",
                                      "--methods", "ar,ngram-k3", "--prompts", str(prompts), "--max-new-tokens", "8",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["summary"]] == ["ar", "ngram-k3"]
    assert "as-run" in results["noise"] and results["formats"] == []
    assert "on the torch (fp32 on cpu) runner" in (out / "report.md").read_text()
