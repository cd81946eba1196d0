"""A whole Qwen2-VL-2B-sized vision tower, forward and training step: transformers against the same tower under
fastvl.patch.

One step = forward of ``Qwen2VisionTransformerPretrainedModel`` (32 blocks, 1280 wide, 16 heads of 80, the
2x2 merger to 1536) over a pack of mixed-resolution images, then backward from a fixed random gradient of the
merged tokens into every weight (gradients set to None before each step). Implementations:

- ``hf-<attention>``: transformers with its best attention available (flash_attention_2 when flash-attn is
  installed on a GPU, else sdpa: one SDPA call per image);
- ``fastvl``: a copy of the module sharing its weights, after ``fastvl.patch``: varlen attention with the 2D
  RoPE inside and patch_merge (the Triton kernels on a GPU, their PyTorch reference on a CPU);
- ``fastvl-native``: the same on the native CPU backend (CPU only).

Columns: ``fwd_ms`` the forward alone (no autograd, median), ``fwd_speedup`` its ratio vs the transformers row;
``step_ms`` (median, min-max), ``tokens_s`` = patches per second, ``peak_mb`` the GPU memory above the
weights that the step allocates at its peak (activations, gradients, workspaces), speedup and memory ratio vs
the transformers row. GPU: bf16, real sizes, ~16k patches (DESIGN target: >= 1.5x at <= 0.7x the memory).
CPU: fp32, the real block widths (1280 wide, 16 heads of 80, merger to 1536) with 2 of the 32 blocks, ~1.2k patches
(DESIGN target: the native forward >= 1.15x transformers').
"""
import copy
import re
import sys

import torch

import fastvl

from . import common
from .common import NATIVE_ONLY, Registry, is_cuda

SUITE = "vit-train"
TITLE = ("Qwen2-VL-2B-sized vision tower on a mixed-resolution pack: forward, and training step (forward + backward "
         "into every weight)")
COLUMNS = (("case", "case"), ("impl", "impl"), ("backend", "fastvl ops"), ("tokens", "patches"),
           ("fwd_ms", "fwd (min-max)"), ("step_ms", "step (min-max)"), ("tokens_s", "tokens/s"), ("peak_mb", "peak MiB"),
           ("vs", "vs"), ("fwd_speedup", "fwd speedup"), ("speedup", "step speedup"), ("mem_ratio", "mem ratio"))
TARGET_SPEEDUP, TARGET_MEMORY = 1.5, 0.7
TARGET_CPU_FORWARD = 1.15  # the native backend's forward vs transformers' on a CPU

# (h, w) patch grids of the images of one pack
PACKS = {
    "real": [(92, 92), (64, 64), (40, 56), (28, 40), (16, 16), (12, 20)],  # 16416 patches
    "cpu": [(24, 32), (16, 20), (10, 14)],  # 1228
    "quick": [(8, 12), (6, 6)],  # 132
}
TOWERS = {  # Qwen2VLConfig.vision_config
    "real": dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
    "cpu": dict(depth=2, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
    "quick": dict(depth=1, embed_dim=160, hidden_size=128, num_heads=2, mlp_ratio=2),
}


def hf_attention(device):
    """transformers' best attention implementation for this vision tower here."""
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_cuda(device) and is_flash_attn_2_available() else "sdpa"


def patched(tower):
    """``tower`` under ``fastvl.patch``, as a copy that shares its weights: every row is timed in the same rounds,
    so each needs a module of its own, and the weights are held once."""
    return fastvl.patch(copy.deepcopy(tower, {id(p): p for p in tower.parameters()}))


IMPLS = Registry()  # fn: the module to time, from transformers' tower
IMPLS.register("hf", lambda tower: tower)
IMPLS.register("fastvl", patched)
IMPLS.register("fastvl-native", patched, backend="native", unavailable=NATIVE_ONLY)


def build(scale, device, dtype):
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = Qwen2VLConfig(vision_config=TOWERS[scale]).vision_config
    torch.manual_seed(0)
    with torch.device(device):
        tower = Qwen2VisionTransformerPretrainedModel._from_config(
            config, attn_implementation=hf_attention(device), dtype=dtype)
    return tower.train()


def forward_fn(tower, pixels, grid, backend):
    def forward():
        with torch.no_grad(), fastvl.use_backend(backend):
            return tower(pixels, grid_thw=grid)
    return forward


def step_fn(tower, pixels, grid, dout, backend):
    def step():
        for p in tower.parameters():
            p.grad = None
        with fastvl.use_backend(backend):
            out = tower(pixels, grid_thw=grid)
            merged = getattr(out, "pooler_output", out)
            merged.backward(dout)
    return step


def run(device, quick, only=None):
    cuda = is_cuda(device)
    scale = "quick" if quick else "real" if cuda else "cpu"
    dtype = common.bench_dtype(device)
    plan = common.budget(device, quick)
    grids = PACKS[scale]
    tokens = sum(h * w for h, w in grids)
    case = f"{TOWERS[scale]['depth']} blocks x {TOWERS[scale]['embed_dim']}, {len(grids)} images, {tokens} patches"
    case += "" if cuda else " [cpu]"
    common_row = {"suite": SUITE, "case": case, "device": common.device_name(device), "dtype": common.dtype_name(dtype)}
    if only is not None and not re.search(only, case):
        return []
    gen = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, h, w] for h, w in grids], device=device)
    pixels = torch.randn(tokens, 3 * 2 * 14 * 14, generator=gen).to(device, dtype)
    tower = build(scale, device, dtype)
    dout = torch.randn(tokens // 4, TOWERS[scale]["hidden_size"], generator=gen).to(device, dtype)
    hf = f"hf-{hf_attention(device)}"
    rows, timed_steps, backends = [], {}, {}
    bar = common.progress(IMPLS.runnable(device), SUITE)
    for impl in bar:
        name = hf if impl.name == "hf" else impl.name
        bar.set_postfix_str(name)
        backend = impl.backend or common.default_backend(device)
        try:
            module = impl.fn(tower)
            fns = {"fwd_ms": forward_fn(module, pixels, grid, backend),
                   "step_ms": step_fn(module, pixels, grid, dout, backend)}
            for fn in fns.values():
                fn()  # a row that fails does so here, not in the rounds of all of them
        except Exception as exc:  # noqa: BLE001 - reported, the other implementations still run
            rows.append(common.failed_row(common_row, name, exc))
            common.emit(bar, rows[-1], rows[-1]["skipped"])
            continue
        timed_steps[name], backends[name] = fns, None if impl.name == "hf" else backend
    found = []
    for name, timing in common.measure_rows(timed_steps, device, plan).items():
        for p in tower.parameters():  # the step's gradients count in its peak, not before it
            p.grad = None
        found.append({**common_row, "impl": name, "tokens": tokens, **timing, "backend": backends[name],
                      "tokens_s": tokens / timing["step_ms"] * 1e3,
                      "peak_mb": common.peak_memory_mb(timed_steps[name]["step_ms"], device)})
    common.speedups(found, hf, "step_ms")
    common.speedups(found, hf, "fwd_ms", name="fwd_speedup")
    base = next((r for r in found if r["impl"] == hf), None)
    for r in found:
        if base and r["peak_mb"] is not None:
            r["mem_ratio"] = r["peak_mb"] / base["peak_mb"]
        common.emit(bar, r, f"{common.fmt_time(r['step_ms'])} per step, {common.sig3(r['tokens_s'])} tokens/s")
    return rows + found + common.skipped_rows(IMPLS, device, common_row)


def summary(rows):
    lines = []
    for r in common.measured(rows):
        if r["impl"] == "fastvl-native" and r.get("vs"):
            lines.append(common.target(f"vit-train {r['case']}: fastvl-native forward vs {r['vs']}", r["fwd_speedup"],
                                       TARGET_CPU_FORWARD))
        if r["impl"] == "fastvl" and r.get("vs"):
            lines.append(common.target(f"vit-train {r['case']}: fastvl tokens/s vs {r['vs']}", r["speedup"], TARGET_SPEEDUP))
            if r.get("mem_ratio") is not None:
                lines.append(common.target(f"vit-train {r['case']}: fastvl peak memory vs {r['vs']}", r["mem_ratio"],
                                           TARGET_MEMORY, at_most=True))
    return lines


def plot(rows, path):
    panels = (("tokens_s", "tokens/s"), ("peak_mb", "peak memory above the weights (MiB)"))
    return common.bar_plot(common.measured(rows), path, panels, {k: t for k, t in panels}, "ViT training step")


def main(argv=None):
    from . import suite_main

    return suite_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
