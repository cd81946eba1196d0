"""The attention benchmark suite runs on CPU in quick mode: rows, keys, skips, JSON and plot."""
import json
import math

import torch

from fastvl import _native, reference
from fastvl.bench import attention
from fastvl.testing import assert_close, generator, randn

TIMED = {"suite", "op", "case", "impl", "backend", "device", "dtype", "model", "tokens", "gflop", "fwd_ms",
         "fwd_ms_min", "fwd_ms_max", "fwd_ms_iqr", "fwd_ms_n", "fwd_bwd_ms", "tflops", "tflops_fwd_bwd", "peak_mb",
         "rel_err", "vs", "speedup", "speedup_vs"}


def test_quick_cpu_run(tmp_path):
    assert attention.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "attention.json").read_text())
    rows = payload["rows"]
    assert payload["environment"]["device"].startswith("cpu") and payload["environment"]["commit"]
    timed = attention.measured(rows)
    impls = ("reference", "hf-sdpa-loop") + (("fastvl-native",) if _native.available() else ())
    assert {(r["model"], r["impl"]) for r in timed} == {(m, i) for m in attention.MODELS for i in impls}
    for r in timed:
        assert TIMED <= r.keys(), TIMED - r.keys()
        assert r["case"].endswith("[cpu]") and r["dtype"] == "float32" and r["backend"] in ("reference", "native", None)
        assert 0 < r["fwd_ms_min"] <= r["fwd_ms"] <= r["fwd_ms_max"] and r["fwd_ms_n"] >= 3
        assert r["fwd_bwd_ms"] > 0 and r["peak_mb"] is None and r["vs"] == "hf-sdpa-loop"
        assert math.isclose(r["tflops_fwd_bwd"], 3.5 * r["gflop"] / r["fwd_bwd_ms"])  # GFLOP/ms = TFLOP/s
        assert r["rel_err"] < 1e-5, f"{r['impl']} disagrees with the reference: {r['rel_err']}"
        assert set(r["speedup_vs"]) == set(impls) - {r["impl"]}
    # the Triton kernels are never timed through the interpreter; every other skip says why
    skipped = {r["impl"]: r["skipped"] for r in rows if "skipped" in r}
    assert {"fastvl-fused", "fastvl-unfused", "flex"} <= skipped.keys() and all(skipped.values())
    assert payload["summary"] == []  # no fused row on CPU
    assert (tmp_path / "attention.png").exists()


def test_hf_rotary_matches_rope_2d():
    """The baselines' rotate-half rotary (transformers' layout, fp32 tables) is the op's rotation."""
    case = attention.Case("siglip-so400m", "t", [(3, 5), (2, 2)], "cpu", torch.float64)
    x = randn(case.tokens, 2, case.head_dim, dtype=torch.float64, gen=generator(0))
    assert_close(attention.torch_rotary(x, case), reference.apply_rope_2d(x, case.pos), torch.float32)


def test_failing_implementation_is_reported(monkeypatch):
    def broken(q, k, v, case):
        raise RuntimeError("out of memory")

    impls = attention.Registry(attention.IMPLS[:1])
    impls.register("broken", broken)
    monkeypatch.setattr(attention, "IMPLS", impls)
    rows = attention.run("cpu", quick=True, only="qwen")
    assert [r["impl"] for r in attention.measured(rows)] == ["reference"]
    (failed,) = [r for r in rows if "skipped" in r]
    assert failed["impl"] == "broken" and "RuntimeError: out of memory" in failed["skipped"]
