"""The training-step suite runs on CPU in quick mode: the packing case, the three step rows, JSON and plot."""
import json
import math

from fastvl import _native
from fastvl.bench import common, train


def test_quick_cpu_run(tmp_path):
    assert train.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "train.json").read_text())
    rows = common.measured(payload["rows"])
    fill = {r["impl"]: r for r in rows if r["case"].startswith("packing")}
    assert set(fill) == {"padded B=8", "packed N=4096", "packed N=8192", "packed N=16384"}
    assert fill["padded B=8"]["padding_pct"] > 10
    for r in fill.values():
        assert r["samples"] == 2000 and "step_ms" not in r
        if r["impl"].startswith("packed"):
            assert r["padding_pct"] == 0 and 0 <= r["unfilled_pct"] < train.TARGET_PADDING_PCT
    steps = {r["impl"]: r for r in rows if r["case"].startswith("step")}
    assert set(steps) == {"hf-sdpa", "fastvl-padded", "fastvl-packed"}, [r.get("skipped") for r in payload["rows"]]
    tokens = {r["tokens"] for r in steps.values()}
    assert len(tokens) == 1
    for r in steps.values():
        assert r["case"].endswith("[cpu, scaled]") and r["vs"] == "hf-sdpa" and r["peak_mb"] is None
        assert r["backend"] == (None if r["impl"] == "hf-sdpa" else "native" if _native.available() else "reference")
        assert math.isclose(r["tokens_s"], r["tokens"] / r["step_ms"] * 1e3) and r["images_s"] > 0
        assert 0 < r["mfu"] < math.inf  # below 1 on an idle machine; a loaded one can time the peak low
    assert steps["fastvl-packed"]["padding_pct"] == 0 < steps["fastvl-padded"]["padding_pct"]
    assert steps["fastvl-packed"]["micro_batches"] <= steps["fastvl-padded"]["micro_batches"]
    assert (tmp_path / "train.png").exists()


def test_packing_helpers():
    lengths = [5, 3, 8, 2, 6, 1]
    assert math.isclose(train.padded_fraction(lengths, 2), 1 - 25 / (2 * 5 + 2 * 8 + 2 * 6))
    batches = train.pack(lengths, 8)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 8 for b in batches) and len(batches) == 4  # 25 tokens in 8s
    sample = (30, (4, 6))
    assert train.llm_tokens(sample) == 30 + 6 + 2 and train.llm_tokens((30, None)) == 30
