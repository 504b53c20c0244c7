"""`verispec demo`'s output from a fabricated bench result: a table that fits 80 columns with no name cut, the
'Why' line, and an exit status that fails when any row does."""

import copy
import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from verispec.bench.demo import failures, print_demo, why_line

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-q8_0"


def row(method: str, tokens_per_s: float, speedup: float, mismatches: int | None = 0) -> dict:
    return {"method": method, "prompts": 1, "tokens": 160, "tokens_per_s": tokens_per_s, "speedup": speedup,
            "acceptance_rate": 0.875, "drafted": 40 if method != "ar" else 0, "mean_accepted_length": 12.25,
            "mismatches": mismatches if method != "ar" else 0}


def record(method: str, divergence: dict | None = None) -> dict:
    return {"method": method, "target_passes": 50, "drafted_at_position": [10, 8], "drafted": 20, "accepted": 12,
            "divergence": divergence}


# Wide numbers everywhere (a fast GPU, a 10x speedup) and long model names: the widest table the demo makes.
RESULTS = {
    "config": {"max_new_tokens": 160, "draft": DRAFT, "reference": True},
    "target": {"name": TARGET},
    "summary": [row("ar", 1234.5, 1.0), row("ngram", 9876.5, 10.25), row("draft", 1500.0, 1.21), row("auto", 99.9, 0.99)],
    "llama_cpp": {"ratios": {m: {"speed": 10.5} for m in ("ar", "ngram", "draft", "auto")},
                  "records": {"demo": {"tokens_per_s": 1180.3}}},
    "verify_cost": {"ratio": {"1": 1.0, "2": 1.5, "3": 1.8, "4": 3.0, "8": 5.5, "16": 10.25}},
    "records": [record("ar"), record("ngram"), record("draft"), record("auto")],
}


def rendered(results: dict) -> tuple[str, list[str]]:
    out = Console(width=80, record=True, file=io.StringIO())
    failed = print_demo(results, out)
    return out.export_text(), failed


def test_the_demo_table_fits_80_columns_with_no_name_cut():
    text, failed = rendered(RESULTS)
    assert "…" not in text
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long
    for whole in (TARGET, DRAFT, "llama-server", "vs llama.cpp", "tok/pass", "same text", "9876.5", "10.25x"):
        assert whole in text
    assert not failed


def test_a_speculative_text_unlike_plain_decodings_fails_the_demo():
    results = copy.deepcopy(RESULTS)
    results["summary"][2]["mismatches"] = 1
    results["records"][2]["divergence"] = {"turn": 0, "index": 37, "ar_margin": 2.0, "tie": False}
    text, failed = rendered(results)
    assert failed == ["draft's text differs from plain decoding's from token 37"]
    assert "FAILED: draft's text differs" in text and " NO " in text


def test_a_method_with_no_tokens_or_a_missing_reference_fails_the_demo():
    results = copy.deepcopy(RESULTS)
    results["summary"][1].update(tokens=0, tokens_per_s=None, speedup=None)
    results["llama_cpp"] = None
    assert failures(results) == ["n-gram wrote no tokens", "the llama.cpp reference did not run (why: above the table)"]
    text, _ = rendered(results)
    assert "llama-server" in text  # the legend still says what the reference is
    results["config"]["reference"] = False  # --no-reference
    assert failures(results) == ["n-gram wrote no tokens"]


@pytest.mark.parametrize("mismatches, status", [(0, 0), (1, 1)])
def test_the_demo_command_exits_1_when_a_row_fails(monkeypatch, tmp_path, mismatches, status):
    import verispec.bench
    from verispec.cli import app

    results = copy.deepcopy(RESULTS)
    results["summary"][1]["mismatches"] = mismatches
    results["records"][1]["divergence"] = {"turn": 0, "index": 5, "ar_margin": 2.0, "tie": False} if mismatches else None
    monkeypatch.setattr(verispec.bench, "run_bench", lambda config, console: results)
    result = CliRunner().invoke(app, ["demo", "--max-tokens", "8", "--out", str(tmp_path)])
    assert result.exit_code == status, result.output


def test_the_demo_explains_its_best_mode_from_measured_costs():
    """The demo's 'Why' line: the drafting steps' kept tokens against the measured T(K+1)/T(1) of their K."""
    results = {
        "verify_cost": {"ratio": {"1": 1.0, "2": 1.5, "3": 1.8, "4": 3.0}},
        "summary": [{"method": "ar", "speedup": 1.0}, {"method": "ngram", "speedup": 1.1}],
        "records": [{"method": "ngram", "target_passes": 50, "drafted_at_position": [10, 8], "drafted": 20,
                     "accepted": 12}],
    }
    line = why_line(results)
    assert "one pass over 3 tokens costs 1.80x" in line  # K = 20 / 10 drafting steps = 2
    assert "n-gram drafted on 10 of its 50 steps" in line and "kept 2.20 tokens each" in line  # 1 + 12 / 10
    results["records"][0].update(drafted_at_position=[], drafted=0, accepted=0)
    assert "stayed at 0" in why_line(results)
