"""verispec bench: prompt files, method names, the losslessness check, and one end-to-end run on SmolLM2-135M
with a planted lossy method that the mismatch counter must flag."""

import json

import pytest
from typer.testing import CliRunner

from verispec.bench import lossless
from verispec.bench.methods import parse_methods
from verispec.prompts import HUMANEVAL_INSTRUCTION, load_prompts
from verispec.errors import InvalidParameter, PromptError


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# -- losslessness -------------------------------------------------------------------------------


def test_first_divergence():
    assert lossless.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert lossless.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert lossless.first_divergence([1, 2, 3], [1, 2]) == 2  # one run stopped (EOS) earlier
    assert lossless.first_divergence([], []) is None


NOISE = 1e-3  # a measured pass-shape noise, as the bench passes it


def test_divergence_at_a_near_tie_is_explained():
    d = lossless.compare([[5, 6, 7]], [[3.0, 1e-5, 2.0]], [[5, 9, 7]], NOISE)
    assert d == lossless.Divergence(turn=0, index=1, ar_margin=1e-5, tie=True)
    assert lossless.count([d, None]) == (1, 0)


def test_divergence_with_a_large_margin_is_unexplained():
    d = lossless.compare([[5, 6, 7]], [[3.0, 4.5, 2.0]], [[5, 9, 7]], NOISE)
    assert d is not None and not d.tie and d.ar_margin == 4.5
    assert lossless.count([d, None, None]) == (1, 1)
    # The tolerance is a parameter: a looser one would call the same divergence a tie.
    assert lossless.compare([[5, 6, 7]], [[3.0, 4.5, 2.0]], [[5, 9, 7]], tolerance=10.0).tie


def test_divergence_in_a_later_turn_and_without_a_margin():
    ar, margins = [[1, 2], [3, 4, 5]], [[9.0, 9.0], [9.0, 9.0, 9.0, 9.0]]
    assert lossless.compare(ar, margins, [[1, 2], [3, 4, 5]], NOISE) is None
    d = lossless.compare(ar, margins, [[1, 2], [3, 4, 5, 6]], NOISE)
    assert (d.turn, d.index, d.tie) == (1, 3, False)  # margin of ar's EOS step, recorded past its tokens
    d = lossless.compare(ar, [[9.0, 9.0], []], [[1, 2], [3, 0]], NOISE)
    assert d.ar_margin is None and not d.tie  # an unrecorded margin is never a tie


def test_with_bit_exact_passes_even_a_tiny_margin_is_unexplained():
    # The exact verify mode measures a noise of 0: no divergence can be excused as a tie.
    d = lossless.compare([[5, 6, 7]], [[3.0, 1e-7, 2.0]], [[5, 9, 7]], 0.0)
    assert d is not None and not d.tie


# -- prompts and methods ------------------------------------------------------------------------


def test_prompt_formats(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it shorter."]},
        {"prompt": "Translate: hello", "category": "translation", "id": "t1"},
        {"question_id": "he", "category": "code", "humaneval": "HumanEval/0"},
    ])
    prompts = load_prompts(path)
    assert [(p.id, p.category, len(p.turns)) for p in prompts] == [("81", "writing", 2), ("t1", "translation", 1), ("he", "code", 1)]
    assert prompts[2].turns[0].startswith(HUMANEVAL_INSTRUCTION.split("{")[0]) and "def has_close_elements" in prompts[2].turns[0]
    assert [p.id for p in load_prompts(path, categories=["code", "writing"])] == ["81", "he"]
    assert [p.id for p in load_prompts(path, limit=1)] == ["81"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"category": "x"}', "needs 'turns'"),
    ('{"turns": []}', "non-empty list"),
    ('{"humaneval": "HumanEval/99999"}', "unknown HumanEval task"),
])
def test_bad_prompt_files(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PromptError, match=message):
        load_prompts(path)


def test_builtin_prompts():
    prompts = load_prompts("builtin")
    categories = {p.category for p in prompts}
    assert {"code", "code-edit", "chat", "translation", "summarisation", "qa"} <= categories
    assert sum(p.category == "code" for p in prompts) >= 8
    assert any(len(p.turns) > 1 for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)


def test_method_names():
    methods = parse_methods("ngram,draft-k3,auto", draft="some-draft")
    assert [(m.name, m.draft, m.fixed_k) for m in methods] == [
        ("ar", None, None), ("ngram", "ngram", None), ("draft-k3", "some-draft", 3), ("auto", "auto", None)]
    assert methods[2].config().draft_tokens == 3 and methods[0].config().draft is None
    with pytest.raises(InvalidParameter, match="unknown bench method"):
        parse_methods("ar,tree", draft="x")


def test_tree_cascade_and_lossy_method_names():
    methods = {m.name: m for m in parse_methods("draft-dyn-b8,ngram-s4.2.2.1,cascade-prefix,draft-relaxed0.5", draft="d")}
    dyn = methods["draft-dyn-b8"].config()
    assert (dyn.draft, dyn.tree, dyn.tree_budget) == ("d", "dynamic", 8)
    assert methods["ngram-s4.2.2.1"].config().tree == "static:4,2,2,1"
    cascade = methods["cascade-prefix"].config()
    assert (cascade.draft, cascade.acceptance) == ("cascade:ngram,d", "prefix") and not methods["cascade-prefix"].lossy
    assert methods["draft-relaxed0.5"].config().acceptance == "relaxed:0.5" and methods["draft-relaxed0.5"].lossy
    with pytest.raises(InvalidParameter):
        parse_methods("draft-relaxed3", draft="d")
    with pytest.raises(InvalidParameter):
        parse_methods("draft-s0.2", draft="d")


def test_verify_cost_curve(smol_llama):
    from verispec.bench.verify_cost import verify_cost_curve

    times = verify_cost_curve(smol_llama, ks=(1, 4), reps=1)
    assert set(times) == {1, 4} and all(t > 0 for t in times.values())
    assert smol_llama.n_past == 0


def test_verify_cost_ratios_are_relative_to_the_smallest_k_measured():
    from verispec.bench.verify_cost import ratios

    # K=1 not measured: the base is K=2, and the dict order of the input does not matter
    assert ratios({8: 0.5, 2: 0.1, 4: 0.25}) == pytest.approx({2: 1.0, 4: 2.5, 8: 5.0})
    assert ratios({1: 0.04, 3: 0.05, 16: 0.2}) == pytest.approx({1: 1.0, 3: 1.25, 16: 5.0})


def test_load_cells_sum_the_draft_work_of_their_requests():
    from verispec.bench.load import Cell, RequestResult, markdown

    cell = Cell(4, "on", 10.0, [RequestResult(1.0, 0.2, 40, 1.5, 30, 1.25, 0.5),
                                RequestResult(2.0, 0.3, 60, 1.0, 7, 0.85, 0.0)])
    row = cell.row()
    assert (row["drafted"], row["draft_seconds"], row["draft_prefill_seconds"]) == (37, 2.1, 0.5)
    assert row["mean_accepted_length"] == 1.25  # the existing keys stay
    assert markdown([cell], "").splitlines()[-1].endswith("| 1.25 | 37 (2.1 + 0.5 s) | 0 (0) | - |")


def test_load_cells_count_outputs_unlike_the_same_modes_solo_outputs():
    from verispec.bench.load import Cell, compare_with_solo, markdown

    cells = [Cell(1, "off", 1.0, texts={0: "a", 1: "b"}), Cell(1, "llama-server", 1.0, texts={0: "a", 1: "b"}),
             Cell(4, "off", 1.0, texts={0: "a", 1: "b"}), Cell(4, "llama-server", 1.0, texts={0: "a", 1: "c"}),
             Cell(1, "generate", 1.0, texts={0: "x", 1: "b"})]  # the library engine: compared with the server's off
    compare_with_solo(cells)
    assert [c.differ_from_solo for c in cells] == [None, None, 0, 1, 1]
    assert markdown(cells[3:4], "").splitlines()[-1].endswith("| 1 |")


def test_the_load_bench_compares_a_lone_server_request_with_the_library_engine():
    from verispec.bench.load import Cell, RequestResult, compare_with_solo, engine_ratio_markdown

    def cell(mode: str, itl: float, ttft: float, text: str) -> Cell:
        return Cell(1, mode, 1.0, [RequestResult(ttft, itl, 10, 1.0)], texts={0: text})

    cells = [cell("off", 0.070, 1.0, "a"), cell("on", 0.070, 1.0, "a"), cell("generate", 0.068, 0.9, "b")]
    compare_with_solo(cells)
    assert "decodes at 0.97x `verispec generate` (ITL p50 70.0 against 68.0 ms)" in engine_ratio_markdown(cells)
    assert "1 of 1 outputs differ" in engine_ratio_markdown(cells)
    assert engine_ratio_markdown(cells[:2]) == ""


# -- end to end ---------------------------------------------------------------------------------

LOSSY = "ngram-k4"  # the planted lossy method: its outputs are altered after decoding
TREES = "draft-dyn-b0,draft-dyn-b4,cascade-prefix,draft-relaxed0.5"


@pytest.mark.real
def test_bench_end_to_end_flags_a_planted_lossy_method(smol_source, tmp_path, monkeypatch):
    import verispec.bench.run as bench_run
    from verispec.cli import app

    monkeypatch.setenv("VERISPEC_CACHE", str(tmp_path / "no-tools"))  # llama.cpp's programs: not built here
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    honest_turn = bench_run.engine_turn

    def engine_turn(model, spec, params):
        generate = honest_turn(model, spec, params)
        if (spec.draft, spec.draft_tokens) != ("ngram", 4):
            return generate

        def lossy(text, tokens):
            turn = generate(text, tokens)
            turn.tokens = [(t + 1) % model.target.n_vocab for t in turn.tokens]
            return turn

        return lossy

    monkeypatch.setattr(bench_run, "engine_turn", engine_turn)
    # Derived formats go to the session's folder (conftest.derived_models), not the real model cache.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"question_id": "edit", "category": "code-edit", "turns": [
            "Add type hints to this function:\n\ndef add(a, b):\n    return a + b\n", "Now add a docstring."]},
        {"prompt": "Translate to French: good morning, my friend.", "category": "translation"},
        {"prompt": "What is the capital of France?", "category": "qa"},
    ])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "--target", "smollm2-135m", "--draft", "smollm2-135m", "--methods", f"ar,ngram,ngram-k2,{LOSSY},draft-k2,{TREES}",
        "--prompts", str(prompts), "--max-new-tokens", "16", "--ctx", "1024", "--out", str(out),
        "--peers", "llamacpp-pld,llama-speculative", "--llama-cpp-bin", str(tmp_path / "no-such-dir"),
        "--formats", "q8_0", "--no-reference",
    ])
    assert result.exit_code == 0, result.output

    results = json.loads((out / "results.json").read_text())
    assert {"records", "summary", "environment"} <= set(results)
    assert len(results["records"]) == 3 * 9
    for rec in results["records"]:
        assert {"prompt_id", "category", "method", "tokens", "wall_seconds", "decode_seconds", "drafted", "accepted",
                "accepted_lengths", "draft_lengths", "tokens_per_s"} <= set(rec)
    assert sum(len(r["output_tokens"]) for r in results["records"] if r["prompt_id"] == "edit" and r["method"] == "ar") == 2
    summary = {r["method"]: r for r in results["summary"]}
    assert list(summary) == ["ar", "ngram", "ngram-k2", LOSSY, "draft-k2", *TREES.split(",")]
    for row in summary.values():
        assert {"method", "tokens_per_s", "speedup", "acceptance_rate", "mean_accepted_length", "mismatches",
                "unexplained_mismatches"} <= set(row)
        assert row["tokens_per_s"] > 0
    assert summary["ar"]["speedup"] == pytest.approx(1.0)
    assert summary["draft-k2"]["bound_speedup"] > 0 and summary["draft-k2"]["acceptance_per_token"] > 0.9
    assert summary["draft-k2"]["drafted"] > 0 and summary["draft-k2"]["acceptance_rate"] > 0.9  # its own draft
    for name in ("ngram", "ngram-k2", "draft-k2", "draft-dyn-b0", "draft-dyn-b4", "cascade-prefix"):  # lossless methods
        assert summary[name]["unexplained_mismatches"] == 0, results["records"]
    assert summary[LOSSY]["mismatches"] == 3
    assert summary[LOSSY]["unexplained_mismatches"] >= 1

    env = results["environment"]
    assert env["cpu"] and env["threads"] and env["versions"]["verispec"] and len(env["load_before"]) == 3
    assert set(results["verify_cost"]["ratio"]) == {"1", "2", "3", "4", "8", "16"}
    # The tie tolerance is the measured noise of the verify mode: 0 in exact mode, where rows are bit-identical
    # to one-row passes, at a short and at a long (past 512 cells) context. (SmolLM2's Q4_1 weights are not
    # repacked, so even its one unchunked pass reads 0; the Qwen target's does not: test_long_context.py.)
    noise = results["noise"]
    assert results["config"]["tie_tolerance"] == noise["exact"]["max"] == 0.0
    assert max(int(c) for c in noise["exact"]["by_context"]) > 512
    assert len(noise["one-pass"]["by_context"]) == 2
    assert results["llama_cpp"] is None and "## Against llama.cpp" in (out / "report.md").read_text()
    peers = {p["peer"]: p for p in results["peers"]}
    assert "skipped" in peers["llama-speculative"]
    pld = {r["variant"]: r for r in peers["llamacpp-pld"]["summary"]}
    assert pld["plain"]["tokens_per_s"] > 0 and pld["pld"]["speedup_vs_own_plain"] > 0

    (fmt,) = results["formats"]
    assert fmt["format"] == "q8_0" and fmt["label"] == "smollm2-135m:q8_0" and fmt["file_bytes"] > 0
    assert set(fmt["verify_cost"]["ratio"]) == set(fmt["verify_cost"]["single_pass_ratio"]) == {"1", "2", "3", "4", "8", "16"}
    assert fmt["sequences"] == 4 and fmt["positions"] >= 4 and fmt["top1_agreement"] >= 0.8  # 4 turns of ar

    report = (out / "report.md").read_text()
    assert "| smollm2-135m:q8_0 |" in report
    for heading in ("## Results", "## Per category", "## Verify cost", "## Verification-friendly formats",
                    "## Peak memory", "## Losslessness", "## Peers"):
        assert heading in report
    assert f"| {LOSSY} | 3 | 3 |" in report
    assert summary["draft-dyn-b4"]["nodes_per_pass"] > 2 and summary["draft-dyn-b0"]["nodes_per_pass"] <= 13
    assert set(summary["cascade-prefix"]["drafted_by_source"]) <= {"ngram", "smollm2-135m"}
    relaxed = summary["draft-relaxed0.5"]
    assert relaxed["lossy"] and relaxed["quality_vs_ar"]["prompts"] == 3 and 0 <= relaxed["quality_vs_ar"]["token_agreement"] <= 1
    assert "## Trees, cascades and prefixes" in report and "| draft-relaxed0.5 | " in report
    for png in ("speedup_by_category.png", "acceptance_by_position.png", "tokens_per_s_vs_k.png", "verify_cost.png",
                "tokens_per_s_vs_budget.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report


def test_llama_server_reference_counts_tokens_as_verispec_does(smol_source, smol_llama):
    """llama-server's `predicted_n` counts the EOS it sampled; the reference counts the tokens written, as
    verispec's own stats do, so a prompt that stops is not ~1/n faster on llama.cpp's side."""
    from verispec.bench.peers import LlamaServer, PeerContext, PeerUnavailable
    from verispec.models.chat import chat_tokens

    tok = smol_llama.tokenizer
    ctx = PeerContext(smol_source.path, None, 2, 1024, 0.0, 0, tok.eos_ids)
    peer = LlamaServer(ctx)
    try:
        peer.open()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        prompt = chat_tokens(tok, [{"role": "user", "content": "What is the capital of France? One word."}])
        turn = peer.turn_fn("plain", 48)("", prompt)
    finally:
        peer.close()
    assert 0 < len(turn.tokens) < 48, "the answer should stop before the limit, at an EOS"
    assert turn.extra["generated"] == len(turn.tokens)


def test_the_sessions_prompt_set_holds_the_agentic_categories_in_order():
    prompts = load_prompts("sessions")
    assert {p.category for p in prompts} == {"agentic-edit", "agentic-json", "agentic-sql", "agentic-rag"}
    edits = [p for p in prompts if p.category == "agentic-edit"]
    assert len(edits) >= 4 and all("def rgb_to_hsv" in p.turns[0] for p in edits)  # one real file, edited in turn
    assert [p.id for p in edits] == sorted(p.id for p in edits)


def test_suffix_method_names():
    methods = {m.name: m for m in parse_methods("suffix,suffix-k8,suffix+draft,suffix-dyn-b16", draft="d")}
    assert methods["suffix"].draft == "suffix" and methods["suffix-k8"].config().draft_tokens == 8
    assert methods["suffix+draft"].draft == "cascade:suffix,d" and methods["suffix-dyn-b16"].config().tree == "dynamic"


def test_bench_sessions_give_each_suffix_method_its_own_warm_history():
    """Prompts run in order, every method on each: a suffix method drafts from its own earlier requests of the run,
    never from another method's answer to the same prompt (warm-ups keep histories of their own)."""
    from rich.console import Console

    from tests.toy import tiny_runner
    from verispec.api import Model
    from verispec.bench import run as bench_run
    from verispec.bench.run import BenchConfig
    from verispec.prompts import BenchPrompt
    from verispec.sampling import SamplingParams

    model = Model(tiny_runner(0, scale=8.0), "torch")
    prompts = [BenchPrompt(f"p{i}", "agentic-edit", ("Reply with the module: def f(x): return x",)) for i in range(2)]
    methods = parse_methods("suffix-k8,suffix-dyn-b8", draft="d")
    config = BenchConfig(max_new_tokens=24, draft_max=8)
    params = SamplingParams(max_tokens=24)
    bench_run._warm_up(model, prompts[0], methods[1], params, config)
    conversations, _ = bench_run._run_methods(model, prompts, methods, params, config, Console(quiet=True))
    store = model.suffix_store
    assert {key: index.documents for key, index in store._histories.items()} == {
        "warm-up suffix-k8": 1, "suffix-k8": 2, "suffix-dyn-b8": 2}
    for m in methods[1:]:  # after ar
        first, second = (conversations[(p.id, m.name)].turns[0] for p in prompts)
        assert first.tokens == second.tokens == conversations[(prompts[0].id, "ar")].turns[0].tokens
        assert second.stats.accepted > first.stats.accepted  # the second found the first in its method's history
    model.close()
