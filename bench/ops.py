"""Every public op at real model shapes: analytic FLOPs and bytes, and timings per available backend.

On CUDA (bf16) the full shapes run on the Triton and reference backends. On CPU (fp32) the
Triton kernels only run in the interpreter, which is no performance number: the native backend
(when built) and the reference are timed, on packs scaled down to keep the run short (the case
label says which).
"""
import torch

import fastvl
from fastvl import _native

from .common import peak_memory_mb, time_ms

# (h, w) patch grids of a pack of mixed-resolution images for a native-resolution ViT
PACK_FULL = [(64, 92), (48, 64), (40, 56), (36, 36), (28, 40), (20, 28), (16, 16), (12, 20)]  # ~16k patches
PACK_CPU = [(32, 48), (28, 28), (20, 24), (12, 16)]  # ~3k patches
PACK_QUICK = [(8, 12), (6, 6)]


def _grids(pack):
    return torch.tensor([[1, h, w] for h, w in pack])


def _bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure(fwd, inputs, device, repeat):
    """(fwd_ms, fwd_bwd_ms, peak_mb) of ``fwd()``; backward through the sum of its output."""
    def step():
        for t in inputs:
            t.grad = None
        fwd().float().sum().backward()

    with torch.no_grad():
        fwd_ms = time_ms(fwd, device, warmup=1, repeat=repeat)
    return fwd_ms, time_ms(step, device, warmup=1, repeat=repeat), peak_memory_mb(step, device)


def _cases(device, dtype, pack, merge_tokens, gen):
    """(op, case, flop_fwd, bytes_fwd, fwd, leaves) per op."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    grid = _grids(pack)
    tokens = int(grid.prod(-1).sum())
    pos = fastvl.vision_positions(grid).to(device)
    lengths = grid.prod(-1)
    cu = fastvl.layout.cu_seqlens(lengths, device)
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
    # Qwen2-VL-2B merger: 1280 -> 5120 -> 1536 over 2x2 windows
    c, m = 1280, 2
    xm = rand(merge_tokens, c)
    w1, w2 = rand(4 * c, 4 * c, scale=(4 * c) ** -0.5), rand(1536, 4 * c, scale=(4 * c) ** -0.5)
    ln_w, ln_b, b1, b2 = rand(c), rand(c), rand(4 * c), rand(1536)
    rows = merge_tokens // (m * m)
    out.append(("patch_merge", f"Qwen2-VL-2B 1280->1536, {merge_tokens} patches", 2 * rows * 4 * c * (4 * c + 1536),
                _bytes(xm, w1, w2) + rows * 1536 * xm.element_size(),
                lambda: fastvl.patch_merge(xm, ln_w, ln_b, w1, b1, w2, b2, m), [xm, w1, w2]))
    # FlashSloth SAP: SigLIP-so400m 27x27 crops, 5-crop HD
    grid_hw = torch.tensor([[27, 27]] * 5)
    xs = rand(5 * 729, 1152)
    s1, sb1, s2, sb2 = rand(1152, 1152, scale=1152 ** -0.5), rand(1152), rand(1, 1152, scale=1152 ** -0.5), rand(1)
    out.append(("spatial_attention_pool", "SigLIP 5 x 27x27, C=1152, window 3", 2 * xs.shape[0] * 1152 * 1153,
                _bytes(xs, s1) + 5 * 81 * 1152 * xs.element_size(),
                lambda: fastvl.spatial_attention_pool(xs, grid_hw, s1, sb1, s2, sb2), [xs, s1]))
    hidden = rand(4 * 1024, 1536)
    index = torch.randperm(hidden.shape[0], generator=gen)[: hidden.shape[0] // 2].to(device)
    stacked = rand(index.numel(), 1536)
    out.append(("deepstack_add", f"LLM width 1536, {index.numel()} of {hidden.shape[0]} rows", 0,
                2 * _bytes(stacked) + _bytes(stacked), lambda: fastvl.deepstack_add(hidden, index, stacked),
                [hidden, stacked]))
    return out


def run(device, quick):
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    pack = PACK_QUICK if quick else PACK_FULL if cuda else PACK_CPU
    merge_tokens = 64 if quick else 16384 if cuda else 1024
    backends = ("triton", "reference") if cuda else ("native", "reference") if _native.available() else ("reference",)
    repeat = 2 if quick else 20 if cuda else 3
    rows = []
    for op, case, flop, nbytes, fwd, leaves in _cases(device, dtype, pack, merge_tokens, torch.Generator().manual_seed(0)):
        for backend in backends:
            with fastvl.use_backend(backend):
                fwd_ms, fwd_bwd_ms, peak = _measure(fwd, leaves, device, repeat)
            rows.append({
                "suite": "ops", "op": op, "case": case, "impl": f"{backend} {str(dtype).replace('torch.', '')}",
                "gflop": flop / 1e9, "mbytes": nbytes / 1e6, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                "tflops": flop / fwd_ms / 1e9 if flop else None, "gbps": nbytes / fwd_ms / 1e6, "peak_mb": peak,
            })
    return rows
