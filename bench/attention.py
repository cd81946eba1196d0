"""Varlen attention with 2D RoPE on packs of mixed-resolution images: fastvl against the usual baselines.

For each case (model x pack) and implementation: forward and forward+backward latency, achieved
TFLOP/s (attention forward = 4 * sum(L_i^2) * H * D, backward 2.5x that), peak memory, error
against the fastvl reference, and speedups against every other implementation of the same run.

Implementations (each rotates q and k by the same 2D RoPE, then attends within each image):
- ``fastvl-fused``: ``varlen_attention(..., rope_pos=pos)``, the rotation inside the attention kernel;
- ``fastvl-unfused``: ``apply_rope_2d`` on q and k, then ``varlen_attention``;
- ``reference``: fastvl's plain-PyTorch reference (fp32 math, one image at a time);
- ``hf-sdpa-loop``: transformers' Qwen2-VL vision attention without flash-attn: rotate-half rotary in
  torch, then one SDPA call per image;
- ``torch-varlen``: ``torch.nn.attention.varlen.varlen_attn`` + torch rotary;
- ``flex``: compiled FlexAttention with a document mask + torch rotary;
- ``flash-attn``, ``xformers``: their varlen attention + torch rotary, when installed.
The torch rotary's cos/sin tables and the FlexAttention block mask are built once per pack outside
the timings (a model shares them across its layers); fastvl computes its angles inside every call.

CUDA runs bf16 on the full packs (and a pack of 64 images of 256 tokens, and head_dim 128 on the 16k pack:
the DESIGN targets). On CPU (fp32 and one bf16 case, small packs, labelled ``cpu`` in every row and case) the native backend
(``fastvl-native``), the reference and the torch paths run: the Triton kernels would run in the interpreter,
which is no performance number.
``python -m fastvl.bench.attention [--quick] [--out DIR] [--case REGEX]`` writes DIR/attention.json and
DIR/attention.png.
"""
import re
import sys

import torch
import torch.nn.functional as F

import fastvl
from fastvl.reference.apply_rope_2d import rope_2d_angles
from fastvl.testing import rel_err

from . import common
from .common import NATIVE_ONLY, TRITON_ONLY, Registry, is_cuda, measured, needs_cuda, needs_module

SUITE = "attention"
OP = "varlen_attention+rope_2d"
TITLE = ("varlen attention + 2D RoPE over packs of mixed-resolution images: forward and forward+backward "
         "(TFLOP/s: 4*sum(L^2)*H*D forward, 2.5x backward)")
COLUMNS = (("case", "case"), ("impl", "impl"), ("backend", "fastvl ops"), ("fwd_ms", "fwd (min-max)"),
           ("fwd_bwd_ms", "fwd+bwd (min-max)"), ("tflops", "fwd TFLOP/s"), ("tflops_fwd_bwd", "fwd+bwd TFLOP/s"),
           ("peak_mb", "peak MiB"), ("rel_err", "err vs ref"), ("vs", "vs"), ("speedup", "fwd+bwd speedup"))
THETA = 10000.0
MODELS = {  # heads, head_dim, merge size of the position order
    "qwen2vl-vit": (16, 80, 2),
    "siglip-so400m": (16, 72, 1),
}
HEAD_DIM_128 = {"d128": (16, 128, 2)}  # CUDA: the forward-efficiency target at head_dim 128
# (h, w) patch grids of the images of one pack
PACKS_CUDA = {
    "1k": [(24, 24), (16, 28)],
    "4k": [(36, 52), (32, 32), (20, 28), (12, 16)],
    "16k": [(92, 92), (64, 64), (40, 56), (28, 40), (16, 16), (12, 20)],
    "64x256": [(16, 16)] * 64,  # many small images
}
PACKS_CPU = {
    "cpu-200": [(8, 12), (6, 10), (4, 6), (2, 2)],
    "cpu-1k": [(24, 32), (16, 20), (10, 14)],
    "cpu-2k": [(32, 32), (28, 28), (16, 24), (12, 12)],  # Qwen2-VL ViT: 4 images of 144-1024 patches
}
PACKS_QUICK = {"cpu-quick": [(6, 8), (4, 6), (2, 2)]}
# FlashSloth's HD input: 5 crops of 27x27 SigLIP patches per image, 4 images
SIGLIP_HD = {"hd-4x5x27x27": [(27, 27)] * 20}


class Case:
    """One pack of images for one model: its positions, offsets and (for the torch baselines) rotary tables."""

    def __init__(self, model, pack, grids, device, dtype):
        self.model, self.pack, self.grids, self.device, self.dtype = model, pack, grids, device, dtype
        self.heads, self.head_dim, merge = {**MODELS, **HEAD_DIM_128}[model]
        self.lengths = [h * w for h, w in grids]
        self.tokens, self.max_len = sum(self.lengths), max(self.lengths)
        self.pos = fastvl.vision_positions(torch.tensor([[1, h, w] for h, w in grids]), merge).to(device)
        self.cu = torch.tensor([0, *torch.tensor(self.lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        angles = rope_2d_angles(self.pos, self.head_dim, THETA)
        emb = torch.cat([angles, angles], dim=-1)[:, None, :]  # transformers' layout: [h | w | h | w]
        self.cos, self.sin = emb.cos(), emb.sin()
        self.block_mask = None  # FlexAttention's, built on first use

    @property
    def name(self):
        bf16_cpu = self.dtype == torch.bfloat16 and not is_cuda(self.device)
        return (f"{self.model} H={self.heads} D={self.head_dim}, {self.pack} ({len(self.grids)} images, {self.tokens} tok)"
                + (" bf16" if bf16_cpu else ""))

    @property
    def flop_fwd(self):
        return 4 * sum(n * n for n in self.lengths) * self.heads * self.head_dim

    def inputs(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        q, k, v, dout = (torch.randn(self.tokens, self.heads, self.head_dim, generator=gen)
                         .to(device=self.device, dtype=self.dtype) for _ in range(4))
        return [t.requires_grad_() for t in (q, k, v)], dout


def cases(device, quick, only=None):
    """The cases of a run; ``only``: a regular expression on the case names."""
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    packs = PACKS_QUICK if quick else PACKS_CUDA if cuda else PACKS_CPU
    found = [Case(model, name, grids, device, dtype) for model in MODELS for name, grids in packs.items()]
    if not cuda and not quick:  # the native backend's bf16 (fp32 math) against the HF path's
        found.append(Case("qwen2vl-vit", "cpu-2k", PACKS_CPU["cpu-2k"], device, torch.bfloat16))
    if cuda and not quick:
        found += [Case("siglip-so400m", name, grids, device, dtype) for name, grids in SIGLIP_HD.items()]
        found += [Case(model, "16k", PACKS_CUDA["16k"], device, dtype) for model in HEAD_DIM_128]
    return [case for case in found if only is None or re.search(only, case.name)]


# ------------------------------------------------------------------ implementations
def torch_rotary(x, case):
    """transformers' apply_rotary_pos_emb_vision on one tensor: rotate-half in fp32, back to x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * case.cos + torch.cat([-x2, x1], dim=-1) * case.sin).to(x.dtype)


def _fastvl_fused(q, k, v, case):
    return fastvl.varlen_attention(q, k, v, case.cu, max_seqlen_q=case.max_len, rope_pos=case.pos, rope_theta=THETA)


def _fastvl_unfused(q, k, v, case):
    q, k = fastvl.apply_rope_2d(q, case.pos, THETA), fastvl.apply_rope_2d(k, case.pos, THETA)
    return fastvl.varlen_attention(q, k, v, case.cu, max_seqlen_q=case.max_len)


def _hf_sdpa_loop(q, k, v, case):
    q, k = torch_rotary(q, case), torch_rotary(k, case)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
    outs = [F.scaled_dot_product_attention(qi, ki, vi).transpose(1, 2)
            for qi, ki, vi in zip(*(t.split(case.lengths, dim=2) for t in (q, k, v)))]
    return torch.cat(outs, dim=1)[0]


def _torch_varlen(q, k, v, case):
    from torch.nn.attention.varlen import varlen_attn

    q, k = torch_rotary(q, case), torch_rotary(k, case)
    return varlen_attn(q, k, v, case.cu, case.cu, case.max_len, case.max_len)


_compiled_flex = None


def _flex(q, k, v, case):
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        # one graph per pack and per grad mode: more than dynamo's default recompile limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    if case.block_mask is None:
        doc = torch.repeat_interleave(torch.arange(len(case.lengths), device=case.device),
                                      torch.tensor(case.lengths, device=case.device))

        def same_image(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        case.block_mask = create_block_mask(same_image, None, None, case.tokens, case.tokens, device=case.device)
    q, k = torch_rotary(q, case), torch_rotary(k, case)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return _compiled_flex(q, k, v, block_mask=case.block_mask)[0].transpose(0, 1)


def _flash_attn(q, k, v, case):
    from flash_attn import flash_attn_varlen_func

    q, k = torch_rotary(q, case), torch_rotary(k, case)
    return flash_attn_varlen_func(q, k, v, case.cu, case.cu, case.max_len, case.max_len)


def _xformers(q, k, v, case):
    from xformers.ops import fmha

    q, k = torch_rotary(q, case), torch_rotary(k, case)
    bias = fmha.BlockDiagonalMask.from_seqlens(case.lengths)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


IMPLS = Registry()  # fn(q, k, v, case) -> out; the reference first: the others are compared with its output
IMPLS.register("reference", lambda q, k, v, c: fastvl.varlen_attention(q, k, v, c.cu, rope_pos=c.pos, rope_theta=THETA),
               backend="reference")
IMPLS.register("fastvl-fused", _fastvl_fused, backend="triton", unavailable=TRITON_ONLY)
IMPLS.register("fastvl-unfused", _fastvl_unfused, backend="triton", unavailable=TRITON_ONLY)
IMPLS.register("fastvl-native", _fastvl_fused, backend="native", unavailable=NATIVE_ONLY)
IMPLS.register("hf-sdpa-loop", _hf_sdpa_loop)
IMPLS.register("torch-varlen", _torch_varlen,
               unavailable=needs_module("torch.nn.attention.varlen", "varlen_attn (flash attention)"))
IMPLS.register("flex", _flex, unavailable=needs_cuda("compiled FlexAttention"))
IMPLS.register("flash-attn", _flash_attn, unavailable=needs_module("flash_attn", "flash-attn"))
IMPLS.register("xformers", _xformers, unavailable=needs_module("xformers", "xformers memory-efficient attention"))
BASELINE = "hf-sdpa-loop"  # ``speedup`` of every row is against it (fwd+bwd)
FUSED, UNFUSED = "fastvl-fused", ("fastvl-unfused", "torch-varlen", "flex", "flash-attn", "xformers")


def backend_used(impl, case):
    """The fastvl backend ``impl`` runs its ops on ('triton' on CUDA tensors), None for no fastvl op."""
    if impl.backend is None:
        return None
    return "reference" if impl.backend == "triton" and not is_cuda(case.device) else impl.backend


def steps(impl, case, seed=0):
    """(forward, forward+backward) closures of ``impl`` on the inputs of ``case`` (the same for every impl)."""
    (q, k, v), dout = case.inputs(seed)

    def fwd():
        with torch.no_grad(), fastvl.use_backend(impl.backend):
            return impl.fn(q, k, v, case)

    def fwd_bwd():
        with fastvl.use_backend(impl.backend):
            return torch.autograd.grad(impl.fn(q, k, v, case), (q, k, v), dout)

    return fwd, fwd_bwd


def measure_case(case, impls, plan, base, peak, bar):
    """The rows of ``impls`` on ``case``: their forward and forward+backward timed in the same rounds (each
    forward+backward runs once before anything is timed), or the reason one failed."""
    rows, timed_steps, errors, expected = [], {}, {}, None
    for impl in impls:
        try:
            fwd, fwd_bwd = steps(impl, case)
            out = fwd()
            fwd_bwd()
        except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported, the others still run
            rows.append(common.failed_row(base, impl.name, exc))
            common.emit(bar, rows[-1], rows[-1]["skipped"])
            continue
        expected = out if impl.name == "reference" else expected
        errors[impl.name] = None if expected is None else rel_err(out, expected)
        timed_steps[impl.name] = {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}
    timed = common.measure_rows(timed_steps, case.device, plan)
    flop, found = case.flop_fwd, []
    for impl in impls:
        if impl.name in timed:
            timing, fns = timed[impl.name], timed_steps[impl.name]
            found.append({
                **base, "impl": impl.name, "backend": backend_used(impl, case), "model": case.model,
                "pack": case.pack, "heads": case.heads, "head_dim": case.head_dim, "grids": case.grids,
                "tokens": case.tokens, "gflop": flop / 1e9, **timing,
                "peak_mb_fwd": common.peak_memory_mb(fns["fwd_ms"], case.device),
                "peak_mb": common.peak_memory_mb(fns["fwd_bwd_ms"], case.device), "rel_err": errors[impl.name],
                "tflops": flop / timing["fwd_ms"] / 1e9, "tflops_fwd_bwd": 3.5 * flop / timing["fwd_bwd_ms"] / 1e9,
                "matmul_tflops": peak,
            })
    _speedups(found)
    for row in found:
        common.emit(bar, row, f"fwd {common.fmt_time(row['fwd_ms'])}, fwd+bwd {common.fmt_time(row['fwd_bwd_ms'])}")
    return rows + found


def run(device, quick, only=None):
    """One row per (case, implementation) measured on ``device``, and one row with the reason (key
    ``skipped``, no timings) per implementation that cannot run there or failed on a case."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    plan = common.budget(device, quick)
    label = common.device_name(device)
    runnable = IMPLS.runnable(device)
    rows = []
    work = cases(str(device), quick, only)
    peak = common.matmul_tflops(device, plan) if cuda and any(c.head_dim == 128 for c in work) else None
    bar = common.progress(work, SUITE)
    for case in bar:
        bar.set_postfix_str(f"{case.model} {case.pack}")
        base = {"suite": SUITE, "op": OP, "case": case.name + ("" if cuda else " [cpu]"), "device": label,
                "dtype": common.dtype_name(case.dtype)}
        rows += measure_case(case, runnable, plan, base, peak, bar)
        if cuda:
            torch.cuda.empty_cache()
    return rows + common.skipped_rows(IMPLS, device, {"suite": SUITE, "op": OP, "device": label})


def _speedups(rows):
    """Per row: ``speedup_vs`` every other implementation of the case (fwd and fwd+bwd), ``speedup`` vs BASELINE's
    fwd+bwd; medians (and ranges) of per-round ratios."""
    for r in rows:
        r["speedup_vs"] = {o["impl"]: {**common.ratio(o, r, "fwd_ms", "fwd"),
                                       **common.ratio(o, r, "fwd_bwd_ms", "fwd_bwd")} for o in rows if o is not r}
    common.speedups(rows, BASELINE, "fwd_bwd_ms")


def targets(rows):
    """Per case: fastvl-fused fwd+bwd against the fastest unfused path and the HF sdpa loop (the targets)."""
    found, rows = [], measured(rows)
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["impl"]: r for r in rows if r["case"] == case}
        if FUSED not in by:
            continue
        fused = by[FUSED]["speedup_vs"]
        unfused = [(by[n]["fwd_bwd_ms"], n) for n in UNFUSED if n in by]
        entry = {"case": case, "fused_backend": by[FUSED]["backend"]}
        if unfused:
            _, best = min(unfused)
            entry.update(best_unfused=best, vs_best_unfused=fused[best]["fwd_bwd"])
        if BASELINE in by:
            entry["vs_hf_sdpa_loop"] = fused[BASELINE]["fwd_bwd"]
        found.append(entry)
    return found


def summary(rows):
    """fastvl-fused fwd+bwd per case against the targets: >= 1.3x the best unfused path, >= 1.3x the HF sdpa
    loop on a mixed pack and >= 5x on 64 small images; forward at head_dim 128 >= 55% of the matmul peak."""
    lines = []
    for t in targets(rows):
        name = f"attention {t['case']}: {FUSED} ({t['fused_backend']}) fwd+bwd"
        if "vs_best_unfused" in t:
            lines.append(common.target(f"{name} vs the best unfused path ({t['best_unfused']})", t["vs_best_unfused"], 1.3))
        if "vs_hf_sdpa_loop" in t:
            lines.append(common.target(f"{name} vs {BASELINE}", t["vs_hf_sdpa_loop"], 5.0 if "64x256" in t["case"] else 1.3))
    for r in measured(rows):
        if r["impl"] == FUSED and r["head_dim"] == 128 and r.get("matmul_tflops"):
            lines.append(common.target(f"attention {r['case']}: {FUSED} forward TFLOP/s / bf16 matmul peak "
                                       f"({common.sig3(r['matmul_tflops'])} TFLOP/s)", r["tflops"] / r["matmul_tflops"], 0.55))
    return lines


def plot(rows, path):
    """Grouped bars of forward and forward+backward TFLOP/s per case; False when matplotlib is missing."""
    panels = (("tflops", "forward"), ("tflops_fwd_bwd", "forward + backward"))
    return common.bar_plot(measured(rows), path, panels, "TFLOP/s", OP)


def main(argv=None):
    from . import suite_main

    return suite_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
