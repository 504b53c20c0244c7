"""scripts/device_check.py, the one-shot GPU check, runs end to end at tiny scale on the CPU (CI has no GPU)."""

import importlib.util
from pathlib import Path


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_device_check_measures_every_row_at_tiny_scale():
    check = _script()
    result = check.check_dtype("tiny", "cpu", "fp32", new_tokens=16, repeats=1)
    assert set(result["verify"]) == set(check.VERIFY_KS) and result["verify"][1]["ratio"] == 1.0
    assert all(row["wall_ms"] > 0 for row in result["verify"].values())
    for name in ("ngram", "draft"):
        assert result[name]["drafted"] > 0, name  # pinned K: both drafters drafted
        assert result[name]["first_divergence"] is None, name  # fp32 on the CPU: greedy equals plain
    assert result["seeded"]["equal"] and result["seeded"]["drafted"] > 0
    assert result["host_sampling_ms_top_p"] > 0 and result["draft_over_target_one_row"] > 0
