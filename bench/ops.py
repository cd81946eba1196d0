"""Every public op at real model shapes: analytic FLOPs and bytes, and timings per available backend.

On CUDA (bf16) the full shapes run on the Triton and reference backends. On CPU (fp32) the
Triton kernels only run in the interpreter, which is no performance number: the reference is
timed, on packs scaled down to keep the run short (the case label says which).
``python -m fastvl.bench.ops [--quick] [--out DIR]`` prints its table and writes DIR/ops.json and DIR/ops.png.
"""
import re
import sys

import torch

import fastvl

from . import common
from .common import NATIVE_ONLY, TRITON_ONLY, Registry, is_cuda

SUITE = "ops"
TITLE = "every public op at model shapes on each fastvl backend: forward and forward+backward, analytic FLOPs and bytes"
COLUMNS = (("op", "op"), ("case", "case"), ("impl", "impl"), ("gflop", "GFLOP"), ("mbytes", "MB"),
           ("fwd_ms", "fwd (min-max)"), ("fwd_bwd_ms", "fwd+bwd (min-max)"), ("tflops", "fwd TFLOP/s"),
           ("gbps", "fwd GB/s"), ("peak_mb", "peak MiB"), ("vs", "vs"), ("speedup", "fwd+bwd speedup"))
IMPLS = Registry()  # fastvl backends the ops are timed on; one ``register`` line adds one
IMPLS.register("triton", backend="triton", unavailable=TRITON_ONLY)
IMPLS.register("native", backend="native", unavailable=NATIVE_ONLY)
IMPLS.register("reference", backend="reference")

SHAPES = {  # pack: (h, w) patch grids of mixed-resolution images; merge: patch_merge tokens, width in, out;
    # sap: SigLIP crops of 27x27, width; deepstack: LLM rows, width
    "cuda": dict(pack=[(64, 92), (48, 64), (40, 56), (36, 36), (28, 40), (20, 28), (16, 16), (12, 20)],  # ~16k
                 merge=(16384, 1280, 1536), sap=(5, 1152), deepstack=(4096, 1536)),
    "cpu": dict(pack=[(32, 48), (28, 28), (20, 24), (12, 16)], merge=(1024, 1280, 1536), sap=(5, 1152),
                deepstack=(4096, 1536)),
    "quick": dict(pack=[(8, 12), (6, 6)], merge=(64, 64, 96), sap=(1, 96), deepstack=(256, 64)),
}


def _grids(pack):
    return torch.tensor([[1, h, w] for h, w in pack])


def _bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _steps(fwd, inputs, backend):
    """(forward without autograd, forward+backward through the sum of its output) of ``fwd()`` under ``backend``."""
    def no_grad():
        with torch.no_grad(), fastvl.use_backend(backend):
            return fwd()

    def step():
        for t in inputs:
            t.grad = None
        with fastvl.use_backend(backend):
            fwd().float().sum().backward()

    return no_grad, step


def _cases(device, dtype, shapes, gen):
    """(op, case, flop_fwd, bytes_fwd, fwd, leaves) per op."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    pack = shapes["pack"]
    grid = _grids(pack)
    tokens = int(grid.prod(-1).sum())
    pos = fastvl.vision_positions(grid).to(device)
    lengths = grid.prod(-1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device=device, dtype=torch.int32)
    longest = int(lengths.max())
    label = f"{len(pack)} images, {tokens} patches"
    out = []
    for name, heads, dim in (("Qwen2-VL ViT", 16, 80), ("SigLIP", 16, 72)):
        q, k, v = (rand(tokens, heads, dim) for _ in range(3))
        flop = 4 * int((lengths ** 2).sum()) * heads * dim
        out.append(("varlen_attention+rope", f"{name} H={heads} D={dim}, {label}", flop, _bytes(q, k, v, q) + _bytes(pos),
                    lambda q=q, k=k, v=v: fastvl.varlen_attention(q, k, v, cu, max_seqlen_q=longest, rope_pos=pos),
                    [q, k, v]))
    x = rand(tokens, 16, 80)
    out.append(("apply_rope_2d", f"H=16 D=80, {label}", 0, 2 * _bytes(x), lambda: fastvl.apply_rope_2d(x, pos), [x]))
    # Qwen2-VL-2B merger (1280 -> 5120 -> 1536) over 2x2 windows
    merge_tokens, c, width = shapes["merge"]
    m = 2
    xm = rand(merge_tokens, c)
    w1, w2 = rand(4 * c, 4 * c, scale=(4 * c) ** -0.5), rand(width, 4 * c, scale=(4 * c) ** -0.5)
    ln_w, ln_b, b1, b2 = rand(c), rand(c), rand(4 * c), rand(width)
    rows = merge_tokens // (m * m)
    out.append(("patch_merge", f"{c}->{width}, {merge_tokens} patches", 2 * rows * 4 * c * (4 * c + width),
                _bytes(xm, w1, w2) + rows * width * xm.element_size(),
                lambda: fastvl.patch_merge(xm, ln_w, ln_b, w1, b1, w2, b2, m), [xm, w1, w2]))
    # FlashSloth SAP: SigLIP-so400m 27x27 crops (5-crop HD), C=1152
    crops, cs = shapes["sap"]
    grid_hw = torch.tensor([[27, 27]] * crops)
    xs = rand(crops * 729, cs)
    s1, sb1, s2, sb2 = rand(cs, cs, scale=cs ** -0.5), rand(cs), rand(1, cs, scale=cs ** -0.5), rand(1)
    out.append(("spatial_attention_pool", f"{crops} x 27x27, C={cs}, window 3", 2 * xs.shape[0] * cs * (cs + 1),
                _bytes(xs, s1) + crops * 81 * cs * xs.element_size(),
                lambda: fastvl.spatial_attention_pool(xs, grid_hw, s1, sb1, s2, sb2), [xs, s1]))
    llm_rows, width = shapes["deepstack"]
    hidden = rand(llm_rows, width)
    index = torch.randperm(hidden.shape[0], generator=gen)[: hidden.shape[0] // 2].to(device)
    stacked = rand(index.numel(), width)
    out.append(("deepstack_add", f"LLM width {width}, {index.numel()} of {hidden.shape[0]} rows", 0,
                2 * _bytes(stacked) + _bytes(stacked), lambda: fastvl.deepstack_add(hidden, index, stacked),
                [hidden, stacked]))
    return out


def run(device, quick, only=None):
    cuda = is_cuda(device)
    dtype = common.bench_dtype(device)
    plan = common.budget(device, quick)
    label = common.device_name(device)
    rows = []
    work = [c for c in _cases(device, dtype, SHAPES["quick" if quick else "cuda" if cuda else "cpu"],
                                   torch.Generator().manual_seed(0))
            if only is None or re.search(only, f"{c[0]} {c[1]}")]
    bar = common.progress(work, SUITE)
    for op, case, flop, nbytes, fwd, leaves in bar:
        case += "" if cuda else " [cpu]"
        bar.set_postfix_str(op)
        base = {"suite": SUITE, "op": op, "case": case, "device": label, "dtype": common.dtype_name(dtype)}
        steps = {}
        for impl in IMPLS.runnable(device):
            no_grad, step = _steps(fwd, leaves, impl.backend)
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - reported, the other backends still run
                rows.append(common.failed_row(base, impl.name, exc))
                continue
            steps[impl.name] = {"fwd_ms": no_grad, "fwd_bwd_ms": step}
        timed = common.measure_rows(steps, device, plan)
        case_rows = []
        for impl in IMPLS.runnable(device):
            if impl.name in timed:
                t = timed[impl.name]
                case_rows.append({**base, "impl": impl.name, "backend": impl.backend, "gflop": flop / 1e9,
                                  "mbytes": nbytes / 1e6, **t,
                                  "peak_mb": common.peak_memory_mb(steps[impl.name]["fwd_bwd_ms"], device),
                                  "tflops": flop / t["fwd_ms"] / 1e9 if flop else None,
                                  "gbps": nbytes / t["fwd_ms"] / 1e6})
        common.speedups(case_rows, "reference", "fwd_bwd_ms")
        for row in case_rows:
            common.emit(bar, row, f"fwd {common.fmt_time(row['fwd_ms'])}, fwd+bwd {common.fmt_time(row['fwd_bwd_ms'])}")
        rows += case_rows
    return rows + common.skipped_rows(IMPLS, device, {"suite": SUITE, "op": "all", "device": label})


def plot(rows, path):
    panels = (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward + backward"))
    found = [dict(r, case=f"{r['op']}\n{r['case']}") for r in common.measured(rows)]
    return common.bar_plot(found, path, panels, "ms", "fastvl ops", log=True)


def main(argv=None):
    from . import suite_main

    return suite_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
