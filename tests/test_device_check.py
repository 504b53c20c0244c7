"""scripts/device_check.py, the one-shot GPU check, runs end to end in its --smoke mode on the CPU (CI has no GPU)."""

import importlib.util
import json
from pathlib import Path


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_device_check_smoke_run_measures_every_row(tmp_path, monkeypatch):
    """Both kinds of column, the plain one and the fixed-shape ('+graphs') one, come back whole."""
    check = _script()
    monkeypatch.setenv("OUT", str(tmp_path))
    check.main(["--smoke", "--dtypes", "fp32,fp32+graphs", "--new-tokens", "16", "--repeats", "1"])
    results = json.loads((tmp_path / "device_check.json").read_text())["results"]
    assert [r["dtype"] for r in results] == ["fp32", "fp32+graphs"]
    for result, ks in zip(results, (check.VERIFY_KS, check.GRAPH_VERIFY_KS)):
        assert "error" not in result, result.get("error")
        assert set(map(int, result["verify"])) == set(ks) and result["verify"]["1"]["ratio"] == 1.0
        assert all(row["wall_ms"] > 0 for row in result["verify"].values())
        for name in ("ngram", "draft"):
            assert result[name]["drafted"] > 0, name  # pinned K: both drafters drafted
            assert result[name]["first_divergence"] is None, name  # fp32 on the CPU: greedy equals plain
        assert result["seeded"]["equal"] and result["seeded"]["drafted"] > 0
        assert result["host_sampling_ms_top_p"] > 0 and result["draft_over_target_one_row"] > 0
