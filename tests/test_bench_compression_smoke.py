"""The compression benchmark suite runs on CPU in quick mode: rows, keys, module paths, JSON and plot."""
import json
import math

import torch

from fastvl import _native, reference
from fastvl.bench import compression
from fastvl.testing import assert_close, generator, randn

TIMED = {"suite", "op", "case", "impl", "backend", "device", "dtype", "gflop", "mbytes", "fwd_ms", "fwd_bwd_ms",
         "tflops", "gbps", "copy_gbps", "copy_frac", "peak_mb", "rel_err", "vs", "speedup"}


def test_quick_cpu_run(tmp_path):
    assert compression.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "compression.json").read_text())
    assert payload["environment"]["device"].startswith("cpu") and payload["environment"]["commit"]
    rows = compression.measured(payload["rows"])
    assert {(r["op"], r["impl"]) for r in rows} == {
        ("patch_merge", "reference"), ("patch_merge", "torch-module"), ("patch_merge", "torch-linears"),
        ("spatial_attention_pool", "reference"), ("spatial_attention_pool", "torch-module"),
        ("deepstack_add", "reference"), ("deepstack_add", "torch-index-put"), ("deepstack_add", "torch-index-add"),
    } | ({(op, "fastvl-native") for op in compression.BUILDERS} if _native.available() else set())
    for r in rows:
        assert TIMED <= r.keys(), TIMED - r.keys()
        assert r["case"].endswith("[cpu]")
        assert r["dtype"] == "float32" and r["peak_mb"] is None and r["copy_gbps"] > 0
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert math.isclose(r["gbps"], r["mbytes"] / r["fwd_ms"])  # MB/ms = GB/s
        # the torch module paths compute what the ops compute; a floor row computes only part of it
        if r["impl"] in compression.FLOORS:
            assert r["rel_err"] is None and r["vs"] == "torch-module" and r["speedup"] > 0
        else:
            assert r["rel_err"] < 1e-5, f"{r['op']} {r['impl']} disagrees with the reference: {r['rel_err']}"
    (skipped,) = [r for r in payload["rows"] if "skipped" in r]
    assert skipped["impl"] == "fastvl" and "CUDA" in skipped["skipped"]
    assert (tmp_path / "compression.png").exists()


def test_hf_patch_merger_is_the_reference():
    module = compression.HFPatchMerger(6, 10, 4, 2).double()
    x = randn(12, 6, dtype=torch.float64, gen=generator(0))
    p = dict(module.named_parameters())
    expected = reference.patch_merge(x, p["ln_q.weight"], p["ln_q.bias"], p["mlp.0.weight"], p["mlp.0.bias"],
                                     p["mlp.2.weight"], p["mlp.2.bias"])
    assert_close(module(x), expected, torch.float64)


def test_part_rows_run(triton_backend):
    """The CUDA-only part timings (GEMMs vs torch.matmul, norm passes vs copy bandwidth) run in the interpreter."""
    (case,) = [c for c in compression.cases("cpu", quick=True) if c.op == "patch_merge"]
    rows = compression._part_rows(case, {"suite": "compression"}, 1.0, "cpu", compression.common.Budget(0, 1))
    assert len(rows) == 4 and all(r["fwd_ms"] > 0 for r in rows)
    assert all(r["vs_cublas"] > 0 for r in rows[:2]) and all(r["copy_frac"] > 0 for r in rows[2:])
