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

CUDA runs bf16 on the full packs. On CPU (fp32, small packs, labelled ``cpu`` in every row and case)
only the reference and the torch paths run: the Triton kernels would run in the interpreter, which is
no performance number. ``python -m fastvl.bench.attention [--quick] [--out DIR] [--case REGEX]``
writes DIR/attention.json and DIR/attention.png (bench/results/<device>/ by default; with --case the
files are named after the filter, so that a GPU run can be split into commands of a few minutes).
"""
import argparse
import importlib.util
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastvl
from fastvl import _native
from fastvl.ops import kernel_module
from fastvl.reference.apply_rope_2d import rope_2d_angles
from fastvl.testing import rel_err

from .common import (
    bar_plot, default_out, device_name, environment, measured, peak_memory_mb, print_skipped, save_results, slug,
    time_ms,
)

OP = "varlen_attention+rope_2d"
THETA = 10000.0
MODELS = {  # heads, head_dim, merge size of the position order
    "qwen2vl-vit": (16, 80, 2),
    "siglip-so400m": (16, 72, 1),
}
# (h, w) patch grids of the images of one pack
PACKS_CUDA = {
    "1k": [(24, 24), (16, 28)],
    "4k": [(36, 52), (32, 32), (20, 28), (12, 16)],
    "16k": [(92, 92), (64, 64), (40, 56), (28, 40), (16, 16), (12, 20)],
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
        self.heads, self.head_dim, merge = MODELS[model]
        self.lengths = [h * w for h, w in grids]
        self.tokens, self.max_len = sum(self.lengths), max(self.lengths)
        self.pos = fastvl.vision_positions(torch.tensor([[1, h, w] for h, w in grids]), merge).to(device)
        self.cu = fastvl.layout.cu_seqlens(self.lengths, device)
        angles = rope_2d_angles(self.pos, self.head_dim, THETA)
        emb = torch.cat([angles, angles], dim=-1)[:, None, :]  # transformers' layout: [h | w | h | w]
        self.cos, self.sin = emb.cos(), emb.sin()
        self.block_mask = None  # FlexAttention's, built on first use

    @property
    def name(self):
        bf16_cpu = self.dtype == torch.bfloat16 and torch.device(self.device).type == "cpu"
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


def _needs_cuda(what):
    return lambda device: None if device.type == "cuda" else f"{what}: CUDA only"


def _needs_module(module, what):
    def check(device):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        return _needs_cuda(what)(device)
    return check


def _native_cpu(device):
    if device.type != "cpu":
        return "native CPU backend: CPU tensors only"
    return None if _native.available() else f"fastvl._C is not built ({_native.ERROR})"


@dataclass
class Impl:
    name: str
    fn: object
    unavailable: object = lambda device: None  # device -> reason it cannot run there, or None
    backend: str | None = None  # the fastvl backend it runs under
    kernels: tuple = ()  # fastvl kernels it is meant to time


IMPLS = [
    Impl("reference", lambda q, k, v, c: fastvl.varlen_attention(q, k, v, c.cu, rope_pos=c.pos, rope_theta=THETA),
         backend="reference"),
    Impl("fastvl-fused", _fastvl_fused, _needs_cuda("Triton kernels (the interpreter is no performance number)"),
         "triton", ("varlen_attention",)),
    Impl("fastvl-unfused", _fastvl_unfused, _needs_cuda("Triton kernels (the interpreter is no performance number)"),
         "triton", ("apply_rope_2d", "varlen_attention")),
    Impl("fastvl-native", _fastvl_fused, _native_cpu, "native", ("varlen_attention",)),
    Impl("hf-sdpa-loop", _hf_sdpa_loop),
    Impl("torch-varlen", _torch_varlen, _needs_module("torch.nn.attention.varlen", "varlen_attn (flash attention)")),
    Impl("flex", _flex, _needs_cuda("compiled FlexAttention")),
    Impl("flash-attn", _flash_attn, _needs_module("flash_attn", "flash-attn")),
    Impl("xformers", _xformers, _needs_module("xformers", "xformers memory-efficient attention")),
]
BASELINE = "hf-sdpa-loop"  # ``speedup`` of every row is against it (fwd+bwd)
FUSED, UNFUSED = "fastvl-fused", ("fastvl-unfused", "torch-varlen", "flex", "flash-attn", "xformers")


def backend_used(impl, case):
    """What fastvl ran for ``impl``: its backend, or 'reference' where a kernel is missing; None for no fastvl op."""
    if impl.backend in (None, "reference"):
        return impl.backend
    probe = torch.empty(0, device=case.device, dtype=case.dtype)
    with fastvl.use_backend(impl.backend):
        missing = [name for name in impl.kernels if kernel_module(name, probe) is None]
    return "reference" if missing else impl.backend


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


def measure(impl, case, warmup, repeat):
    """(timings and peak memory, forward output) of ``impl`` on ``case``."""
    fwd, fwd_bwd = steps(impl, case)
    out = fwd()
    row = {
        "fwd_ms": time_ms(fwd, case.device, warmup, repeat), "fwd_bwd_ms": time_ms(fwd_bwd, case.device, warmup, repeat),
        "peak_mb_fwd": peak_memory_mb(fwd, case.device), "peak_mb": peak_memory_mb(fwd_bwd, case.device),
    }
    return row, out


def run(device, quick, only=None):
    """One row per (case, implementation) measured on ``device``, and one row with the reason (key
    ``skipped``, no timings) per implementation that cannot run there or failed on a case."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    warmup, repeat = (1, 2) if quick else (3, 10) if cuda else (1, 3)
    label = device_name(device)
    dtype = None
    runnable = [impl for impl in IMPLS if impl.unavailable(device) is None]
    rows = []
    for case in cases(str(device), quick, only):
        dtype = str(case.dtype).replace("torch.", "")
        common = {"suite": "attention", "op": OP, "case": case.name + ("" if cuda else " [cpu]"), "device": label,
                  "dtype": dtype}
        case_rows, expected = [], None
        for impl in runnable:  # the reference first: the others are compared with its output
            try:
                timing, out = measure(impl, case, warmup, repeat)
            except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported, the others still run
                rows.append({**common, "impl": impl.name, "skipped": f"failed: {type(exc).__name__}: {exc}"[:300]})
                timing = out = None
            if out is not None:
                expected = out if impl.name == "reference" else expected
                flop = case.flop_fwd
                case_rows.append({
                    **common, "impl": impl.name, "backend": backend_used(impl, case), "model": case.model,
                    "pack": case.pack, "heads": case.heads, "head_dim": case.head_dim, "grids": case.grids,
                    "tokens": case.tokens, "gflop": flop / 1e9, **timing,
                    "rel_err": None if expected is None else rel_err(out, expected),
                    "tflops": flop / timing["fwd_ms"] / 1e9, "tflops_fwd_bwd": 3.5 * flop / timing["fwd_bwd_ms"] / 1e9,
                })
            del out
            if cuda:
                torch.cuda.empty_cache()
        _speedups(case_rows)
        rows += case_rows
    rows += [{"suite": "attention", "op": OP, "case": "all", "impl": impl.name, "device": label, "dtype": dtype,
              "skipped": impl.unavailable(device)} for impl in IMPLS if impl not in runnable]
    return rows


def _speedups(rows):
    by = {r["impl"]: r for r in rows}
    for r in rows:
        r["speedup_vs"] = {
            other: {"fwd": o["fwd_ms"] / r["fwd_ms"], "fwd_bwd": o["fwd_bwd_ms"] / r["fwd_bwd_ms"]}
            for other, o in by.items() if other != r["impl"]
        }
        if BASELINE in by:
            r["speedup"] = by[BASELINE]["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def summary(rows):
    """Per case: fastvl-fused fwd+bwd against the fastest unfused path and the HF sdpa loop (the targets)."""
    found, rows = [], measured(rows)
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["impl"]: r for r in rows if r["case"] == case}
        if FUSED not in by:
            continue
        fused = by[FUSED]["fwd_bwd_ms"]
        unfused = [(by[n]["fwd_bwd_ms"], n) for n in UNFUSED if n in by]
        entry = {"case": case, "fused_backend": by[FUSED]["backend"]}
        if unfused:
            best_ms, best = min(unfused)
            entry.update(best_unfused=best, vs_best_unfused=best_ms / fused)
        if BASELINE in by:
            entry["vs_hf_sdpa_loop"] = by[BASELINE]["fwd_bwd_ms"] / fused
        found.append(entry)
    return found


def plot(rows, path):
    """Grouped bars of forward and forward+backward TFLOP/s per case; False when matplotlib is missing."""
    panels = (("tflops", "forward"), ("tflops_fwd_bwd", "forward + backward"))
    return bar_plot(measured(rows), path, panels, "TFLOP/s", OP)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastvl.bench.attention", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small pack per model, few repeats")
    parser.add_argument("--out", help="output folder (default: bench/results/<device>/)")
    parser.add_argument("--case", help="regular expression: only the cases whose name matches (e.g. '16k')")
    args = parser.parse_args(argv)
    from . import print_table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(device, args.quick, args.case)
    print_table(rows)
    found = summary(rows)
    for s in found:
        print(f"{s['case']}: {FUSED} ({s['fused_backend']}) fwd+bwd speedup "
              f"{s.get('vs_best_unfused', float('nan')):.2f}x over {s.get('best_unfused', '-')}, "
              f"{s.get('vs_hf_sdpa_loop', float('nan')):.2f}x over {BASELINE}")
    print_skipped(rows)
    stem = "attention" + (f"-{slug(args.case)}" if args.case else "")  # partial runs do not overwrite each other
    keys = ("model", "pack", "heads", "head_dim", "grids", "tokens", "dtype")
    shapes = list({r["case"]: {k: r[k] for k in keys} for r in measured(rows)}.values())
    save_results(args.out or default_out(device), stem,
                 {"environment": environment(device), "suite": "attention", "quick": args.quick,
                  "case_filter": args.case, "shapes": shapes, "summary": found, "rows": rows},
                 lambda path: plot(rows, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
