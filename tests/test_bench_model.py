"""Whole-model and vision-tower training suites, quick on a CPU: rows, token counts, FLOP directions, ratios."""
import math
import statistics

from fastvl import _native
from fastvl.bench import common, model, vit_train

MEASURED = {"tflops", "prefill_ms", "prefill_ms_min", "prefill_ms_max", "decode_tok_s", "decode_ms", "peak_mb",
            "image_tokens", "prompt_tokens", "backend"}
BACKEND = "native" if _native.available() else "reference"  # what a CPU user's model runs on


def _by_impl(rows):
    return {r["impl"]: r for r in common.measured(rows)}


def test_flashsloth_family_follows_the_paper():
    rows = model.run("cpu", quick=True, only="flashsloth")
    by = _by_impl(rows)
    assert set(by) == {"uncompressed", "sap+embq", "hd sap+embq"}, [r.get("skipped") for r in rows]
    assert {k: by[k]["image_tokens"] for k in by} == {"uncompressed": 729, "sap+embq": 81, "hd sap+embq": 405}
    for r in by.values():
        assert MEASURED <= r.keys() and r["peak_mb"] is None and r["backend"] == BACKEND
        assert r["scale"] == "scaled" and r["vs"] == "uncompressed" and r["decode_tok_s"] > 0
        assert math.isclose(r["flops_ratio"], r["tflops"] / by["uncompressed"]["tflops"])
    # SAP 729 -> 81 cuts the LLM's work; HD pays 5 ViT crops for its 405 tokens
    assert by["sap+embq"]["flops_ratio"] < 1 < by["hd sap+embq"]["flops_ratio"]


def test_patching_hf_qwen2_vl_keeps_its_flops():
    """Attention is counted on both paths (CPU SDPA in stock, the fastvl op when patched): equal FLOPs."""
    by = _by_impl(model.run("cpu", quick=True, only="qwen2-vl (stock|fastvl.patch$)"))
    assert set(by) == {"stock", "fastvl.patch"}
    assert by["stock"]["tflops"] == by["fastvl.patch"]["tflops"] > 0
    assert by["fastvl.patch"]["vs"] == "stock" and by["stock"]["image_tokens"] == 64


def test_vit_train_step_rows():
    rows = vit_train.run("cpu", quick=True)
    by = _by_impl(rows)
    native = _native.available()
    assert set(by) == {"hf-sdpa", "fastvl"} | ({"fastvl-native"} if native else set())
    for r in by.values():
        assert r["tokens"] == 132 and r["step_ms_n"] >= 3 and r["fwd_ms_n"] >= 3 and r["peak_mb"] is None
        # medians of per-round ratios: each forward against transformers' of the same round
        rounds = [hf / t for hf, t in zip(by["hf-sdpa"]["fwd_ms_times"], r["fwd_ms_times"], strict=True)]
        assert r["vs"] == "hf-sdpa" and math.isclose(r["fwd_speedup"], statistics.median(rounds))
        assert r["fwd_speedup_min"] == min(rounds) and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert math.isclose(r["tokens_s"], 132 / r["step_ms"] * 1e3)
    assert by["fastvl"]["backend"] == "reference" and by["hf-sdpa"]["backend"] is None
    assert not native or by["fastvl-native"]["backend"] == "native"
    # the step target (the memory target needs a GPU), and the native forward's where it ran
    assert len(vit_train.summary(rows)) == 1 + native
