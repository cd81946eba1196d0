"""FlashSloth spatial attention pooling: fused score MLP, window softmax, weighted window sums.

Forward (two kernels; the [T, Hid] hidden activation never leaves registers):
  1. ``_score_kernel``: x @ W1^T on tensor cores; its epilogue applies b1 + ReLU and reduces the tile
     against w2 into per-token fp32 partial scores (one row per slab of Hid columns, summed after).
  2. ``_pool_kernel``: one program per block of windows x channel tile: window softmax of the scores
     and the weighted sum of the raw features.
Backward:
  1. ``_pool_backward_kernel``, over the same (window block, channel tile) grid: reads each window's dy
     tile once, writes the pooling term w * dy of dx and per-tile partial dots x . dy per token.
  2. ``_dscore_kernel``: sums the partial dots and applies the softmax gradient per window:
     dscore = w * (dot - sum_window(w * dot)).
  3. ``_mlp_backward_kernel`` recomputes the pre-activation GEMM to get the ReLU mask and writes
     dh = dscore * w2 * relu'(pre); cuBLAS then does the two plain GEMMs dx += dh @ W1 and
     dW1 = dh^T @ x, which have no epilogue to fuse.
Windows of any size: the pooling kernels walk a window's tokens one slot at a time (online softmax
statistics first), so nothing is sized by window * window; windows larger than an image hold its
tokens.

Backward recomputes pre = x @ W1^T rather than saving it: saving would write [T, Hid] in forward,
read it back in backward (2*T*Hid elements) and hold it in memory in between; recomputing
re-reads x (T*C elements, half that traffic when C == Hid as in FlashSloth's 1152 -> 1152 MLP)
for one more GEMM. Forward saves only the [T] fp32 scores. b2 shifts every score of a window
alike, so it changes neither the output nor any gradient (its own gradient is exactly 0).
"""
import torch
import triton
import triton.language as tl

from .common import autotune_configs, even_k, matmul_tile, quarters, size_class
from .registry import Spec, gated, launch_spec, prune_by_arch, signature


def _gemm_configs():
    """(BM, BN, BK, warps, stages) per architecture family: on sm_90 the 128 x 256 x 64 tile of two
    warpgroups (fastvl gate --perf: smaller ones are bound by shared-memory reads of the B tile), on sm_80
    128 x 128/256."""
    tiles = {90: [(128, 256, 64, 8, 3)], 80: [(128, 128, 32, 4, 4), (128, 256, 32, 8, 3), (128, 128, 64, 8, 3)]}
    return autotune_configs([({"BM": bm, "BN": bn, "BK": bk, "ARCH": arch}, w, s)
                             for arch, configs in tiles.items() for bm, bn, bk, w, s in configs],
                            {"BM": 64, "BN": 64, "BK": 32})


_GEMM_CONFIGS = _gemm_configs()
_MIN_BM = min(c.kwargs["BM"] for c in _GEMM_CONFIGS)
_MIN_BN = min(c.kwargs["BN"] for c in _GEMM_CONFIGS)


def _gemm_specs(fn):
    # SigLIP-so400m as launched: C = Hid = 1152, x and W1 rows of 1152; T varies. floor: the fraction of
    # tensor peak the performance model must allow
    fp32 = {name: "*fp32" for name in ("partial_ptr", "dscore_ptr", "dw2_ptr", "db1_ptr")}
    ints = {"N": 1152, "K": 1152, "stride_x": 1152, "stride_w": 1152}
    return [launch_spec(dt, fn, dt, {"EVEN_K": True}, ints, fp32, floor=0.8) for dt in ("fp16", "bf16")]


@triton.jit
def _xw1(x_ptr, w1_ptr, m0, n0, M, N, K, stride_x, stride_w, EVEN_K: tl.constexpr, BM: tl.constexpr,
         BN: tl.constexpr, BK: tl.constexpr):
    """fp32 tile x[m0..] @ W1[n0..]^T of tokens x [M, K], W1 [N, K]; rows past M and columns past N wrap
    around (callers mask them)."""
    return matmul_tile(x_ptr, w1_ptr, m0, n0, M, N, K, stride_x, 1, 1, stride_w, EVEN_K, BM, BN, BK)


@gated(specs=_gemm_specs, tensor_cores="wgmma")
@triton.autotune(_GEMM_CONFIGS, key=["size_class", "K", "N"], prune_configs_by={"early_config_prune": prune_by_arch})
@triton.heuristics({"EVEN_K": even_k})
@triton.jit
def _score_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, partial_ptr, M, N, K, stride_x, stride_w, size_class,
    EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ARCH: tl.constexpr = 0,
):
    """partial[pid_n, t] = sum over this tile's Hid columns n of w2[n] * relu(x[t] . W1[n] + b1[n]) for the
    M = T tokens, N = Hid, K = C; ARCH tags a config's architecture family."""
    m0, n0 = tl.program_id(0) * BM, tl.program_id(1) * BN
    acc = _xw1(x_ptr, w1_ptr, m0, n0, M, N, K, stride_x, stride_w, EVEN_K, BM, BN, BK)
    rn = n0 + tl.arange(0, BN)
    pre = acc + tl.load(b1_ptr + rn % N).to(tl.float32)[None, :]
    w2 = tl.load(w2_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    rm = m0 + tl.arange(0, BM)
    tl.store(partial_ptr + tl.program_id(1) * M + rm, tl.sum(tl.maximum(pre, 0.0) * w2[None, :], axis=1), mask=rm < M)


@gated(specs=_gemm_specs, tensor_cores="wgmma")
@triton.autotune(_GEMM_CONFIGS, key=["size_class", "K", "N"], prune_configs_by={"early_config_prune": prune_by_arch})
@triton.heuristics({"EVEN_K": even_k})
@triton.jit
def _mlp_backward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, dscore_ptr, dh_ptr, dw2_ptr, db1_ptr, M, N, K, stride_x, stride_w, size_class,
    EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ARCH: tl.constexpr = 0,
):
    """dh = dscore * w2 * (pre > 0) for this tile; its column sums of dscore * relu(pre) and of dh, row pid_m
    of the dw2 and db1 partials."""
    m0, n0 = tl.program_id(0) * BM, tl.program_id(1) * BN
    acc = _xw1(x_ptr, w1_ptr, m0, n0, M, N, K, stride_x, stride_w, EVEN_K, BM, BN, BK)
    q0, q1, q2, q3 = quarters(acc, BM, BN)
    row = tl.program_id(0) * N  # of the partials
    args = (m0, M, N, b1_ptr, w2_ptr, dscore_ptr, dh_ptr, dw2_ptr + row, db1_ptr + row)
    _mlp_epilogue(q0, n0, *args)
    _mlp_epilogue(q1, n0 + BN // 4, *args)
    _mlp_epilogue(q2, n0 + BN // 2, *args)
    _mlp_epilogue(q3, n0 + 3 * (BN // 4), *args)


@triton.jit
def _mlp_epilogue(acc, n0, m0, M, N, b1_ptr, w2_ptr, dscore_ptr, dh_ptr, dw2_ptr, db1_ptr):
    """_mlp_backward_kernel's epilogue on the x @ W1^T block at rows m0.., columns n0.."""
    rm = m0 + tl.arange(0, acc.shape[0])
    rn = n0 + tl.arange(0, acc.shape[1])
    pre = acc + tl.load(b1_ptr + rn % N).to(tl.float32)[None, :]
    w2 = tl.load(w2_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    ds = tl.load(dscore_ptr + rm, mask=rm < M, other=0.0)  # 0 past M: those rows add nothing
    dh = tl.where(pre > 0, ds[:, None] * w2[None, :], 0.0)
    tl.store(dh_ptr + m0.to(tl.int64) * N + (rm - m0)[:, None] * N + rn[None, :], dh.to(dh_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])
    tl.store(dw2_ptr + rn, tl.sum(ds[:, None] * tl.maximum(pre, 0.0), axis=0), mask=rn < N)
    tl.store(db1_ptr + rn, tl.sum(dh, axis=0), mask=rn < N)


@triton.jit
def _window_block(meta_ptr, NW, BW: tl.constexpr):
    """This program's block of windows: ids, live mask, first token, rows, cols and image width."""
    win = tl.program_id(0) * BW + tl.arange(0, BW)
    live = win < NW
    base = tl.load(meta_ptr + win * 4, mask=live, other=0)
    rows = tl.load(meta_ptr + win * 4 + 1, mask=live, other=0)
    cols = tl.load(meta_ptr + win * 4 + 2, mask=live, other=1)
    width = tl.load(meta_ptr + win * 4 + 3, mask=live, other=0)
    return win, live, base, rows, cols, width


# A window's tokens are walked one slot (di, dj) at a time, row-major, the slots of a block of windows
# side by side: no per-slot registers and no integer division, whatever the window size.
@triton.jit
def _slot(di, dj, base, rows, width):
    """Token at (di, dj) of each window and whether the window has it."""
    return (base + di * width + dj).to(tl.int64), di < rows


@triton.jit
def _next(di, dj, cols):
    """The slot after (di, dj)."""
    dj += 1
    return tl.where(dj == cols, di + 1, di), tl.where(dj == cols, 0, dj)


@triton.jit
def _window_softmax(score_ptr, base, rows, cols, width):
    """(peak, total) of each window: its largest score and the sum of exp(score - peak) over its tokens,
    online over the slots; slot (0, 0), which every live window has, starts the peak (so it stays finite)."""
    peak = tl.load(score_ptr + base)
    total = tl.full(peak.shape, 1.0, tl.float32)
    di, dj = _next(base * 0, base * 0, cols)
    for _ in range(1, tl.max(rows * cols)):
        tok, has = _slot(di, dj, base, rows, width)
        s = tl.load(score_ptr + tok, mask=has, other=float("-inf"))
        new = tl.maximum(peak, s)
        total = total * tl.exp(peak - new) + tl.exp(s - new)
        peak = new
        di, dj = _next(di, dj, cols)
    return peak, total


@triton.jit
def _slot_weight(score_ptr, tok, has, peak, total):
    """Softmax weight of each window's token ``tok`` (0 where the window has none)."""
    return tl.exp(tl.load(score_ptr + tok, mask=has, other=float("-inf")) - peak) / total


POOL_BLOCKS = {"BW": 4, "BC": 128}  # windows x channels per program: >= 189 programs at 27x27 and C = 1152
POOL_WARPS = 2  # 8 contiguous fp16/bf16 channels (16 bytes) a thread
DSCORE_BLOCK = 128  # windows per program of the score-gradient pass (one a thread)


def _pool_specs(fn, suffix="", **constexprs):
    # SigLIP-so400m: C = 1152, x and dy rows of 1152; floor: the fraction of DRAM bandwidth the model must allow
    types = {"score_ptr": "*fp32", "dots_ptr": "*fp32", "meta_ptr": "*i32"}
    ints = {name: 1152 for name in ("C", "stride_x", "stride_dy") if name in fn.arg_names}
    return [launch_spec(dt + suffix, fn, dt, {**POOL_BLOCKS, **constexprs}, ints, types,
                        options={"num_warps": POOL_WARPS}, floor=0.8) for dt in ("fp16", "bf16")]


def _pool_backward_specs(fn):
    return _pool_specs(fn, WRITE_DX=True) + _pool_specs(fn, " no dx", WRITE_DX=False)


@gated(specs=_pool_specs)
@triton.jit
def _pool_kernel(
    x_ptr, score_ptr, meta_ptr, out_ptr, NW, C, stride_x, BW: tl.constexpr, BC: tl.constexpr,
):
    """out[window, c tile] = sum over the window's tokens of softmax(score) * x."""
    win, live, base, rows, cols, width = _window_block(meta_ptr, NW, BW)
    peak, total = _window_softmax(score_ptr, base, rows, cols, width)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < C
    out = tl.zeros((BW, BC), dtype=tl.float32)
    di, dj = base * 0, base * 0
    for _ in range(0, tl.max(rows * cols)):
        tok, has = _slot(di, dj, base, rows, width)
        x = tl.load(x_ptr + tok[:, None] * stride_x + c[None, :], mask=has[:, None] & c_ok[None, :], other=0.0)
        out += _slot_weight(score_ptr, tok, has, peak, total)[:, None] * x.to(tl.float32)
        di, dj = _next(di, dj, cols)
    tl.store(out_ptr + win.to(tl.int64)[:, None] * C + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & c_ok[None, :])


@gated(specs=_pool_backward_specs)
@triton.jit
def _pool_backward_kernel(
    x_ptr, score_ptr, meta_ptr, dy_ptr, dx_ptr, dots_ptr, NW, T, C, stride_x, stride_dy,
    BW: tl.constexpr, BC: tl.constexpr, WRITE_DX: tl.constexpr,
):
    """For a channel tile: dots[tile, t] = x[t] . dy[window of t] over the tile's channels, and (WRITE_DX)
    dx = w * dy, the pooling term of dx (the score MLP's is added later). dy is read once per window."""
    win, live, base, rows, cols, width = _window_block(meta_ptr, NW, BW)
    peak, total = _window_softmax(score_ptr, base, rows, cols, width)
    tile = tl.program_id(1)
    c = tile * BC + tl.arange(0, BC)
    c_ok = c < C
    dy = tl.load(dy_ptr + win.to(tl.int64)[:, None] * stride_dy + c[None, :], mask=live[:, None] & c_ok[None, :],
                 other=0.0).to(tl.float32)
    di, dj = base * 0, base * 0
    for _ in range(0, tl.max(rows * cols)):
        tok, has = _slot(di, dj, base, rows, width)
        mask = has[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + tok[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dots_ptr + tile * T + tok, tl.sum(x * dy, axis=1), mask=has)
        if WRITE_DX:
            w = _slot_weight(score_ptr, tok, has, peak, total)
            tl.store(dx_ptr + tok[:, None] * C + c[None, :], (w[:, None] * dy).to(dx_ptr.dtype.element_ty), mask=mask)
        di, dj = _next(di, dj, cols)


@triton.jit
def _slot_dot(dots_ptr, tok, has, T, TILES):
    """x[t] . dy[window of t] over all channels: the channel tiles' partial dots summed."""
    dot = tl.zeros(tok.shape, dtype=tl.float32)
    for tile in range(TILES):
        dot += tl.load(dots_ptr + tile * T + tok, mask=has, other=0.0)
    return dot


@gated(specs=lambda fn: [Spec("fp32", signature(fn, "fp32", meta_ptr="*i32"), {"BW": DSCORE_BLOCK},
                              {"num_warps": 4}, floor=0.8)])
@triton.jit
def _dscore_kernel(score_ptr, meta_ptr, dots_ptr, dscore_ptr, NW, T, TILES, BW: tl.constexpr):
    """dscore = w * (dot - sum_window(w * dot)) per token, the gradient of the window softmax."""
    win, live, base, rows, cols, width = _window_block(meta_ptr, NW, BW)
    peak, total = _window_softmax(score_ptr, base, rows, cols, width)
    mean = tl.zeros((BW,), dtype=tl.float32)
    di, dj = base * 0, base * 0
    for _ in range(0, tl.max(rows * cols)):
        tok, has = _slot(di, dj, base, rows, width)
        mean += _slot_weight(score_ptr, tok, has, peak, total) * _slot_dot(dots_ptr, tok, has, T, TILES)
        di, dj = _next(di, dj, cols)
    di, dj = base * 0, base * 0
    for _ in range(0, tl.max(rows * cols)):
        tok, has = _slot(di, dj, base, rows, width)
        w = _slot_weight(score_ptr, tok, has, peak, total)
        tl.store(dscore_ptr + tok, w * (_slot_dot(dots_ptr, tok, has, T, TILES) - mean), mask=has)
        di, dj = _next(di, dj, cols)


def _window_meta(grid_hw, window, num_windows, device):
    """int32 [num_windows, 4]: first token, rows, cols (partial at the edges) and image width of every window."""
    g = grid_hw.to(device=device, dtype=torch.int64)
    h, w = g[:, 0], g[:, 1]
    cols = (w + window - 1) // window
    count = (h + window - 1) // window * cols
    first_window = count.cumsum(0) - count
    first_token = (h * w).cumsum(0) - h * w
    image = torch.repeat_interleave(torch.arange(len(g), device=device), count, output_size=num_windows)
    local = torch.arange(num_windows, device=device) - first_window[image]
    row0 = local // cols[image] * window
    col0 = local % cols[image] * window
    base = first_token[image] + row0 * w[image] + col0
    rows = (h[image] - row0).clamp(max=window)
    width = (w[image] - col0).clamp(max=window)
    return torch.stack([base, rows, width, w[image]], dim=1).to(torch.int32)



def _scores(x, w1, b1, w2):
    """Per-token fp32 scores without b2 (softmax does not see it)."""
    tokens, channels = x.shape
    hid = w1.shape[0]
    # a row of partial scores per BN Hid columns; BN is chosen at launch, so room for the smallest, zeroed
    partial = torch.zeros(triton.cdiv(hid, _MIN_BN), tokens, dtype=torch.float32, device=x.device)
    if hid:
        grid = lambda meta: (triton.cdiv(tokens, meta["BM"]), triton.cdiv(hid, meta["BN"]))  # noqa: E731
        _score_kernel[grid](x, w1, b1, w2, partial, tokens, hid, channels, x.stride(0), w1.stride(0),
                            size_class(tokens))
    return partial.sum(0)


def forward(x, grid_hw, w1, b1, w2, b2, window, num_windows):
    """Pooled windows [num_windows, C] and the fp32 scores [T] (saved for backward)."""
    tokens, channels = x.shape
    out = x.new_empty(num_windows, channels)
    if num_windows == 0:
        return out, x.new_empty(0, dtype=torch.float32)
    scores = _scores(x, w1, b1.contiguous(), w2.contiguous())
    meta = _window_meta(grid_hw, window, num_windows, x.device)
    grid = (triton.cdiv(num_windows, POOL_BLOCKS["BW"]), triton.cdiv(channels, POOL_BLOCKS["BC"]))
    _pool_kernel[grid](x, scores, meta, out, num_windows, channels, x.stride(0), **POOL_BLOCKS, num_warps=POOL_WARPS)
    return out, scores


def _score_grad(grad, x, scores, meta, num_windows, dx):
    """dscore [T] fp32 (the gradient of the window softmax), and the pooling term of dx when ``dx`` is not None."""
    tokens, channels = x.shape
    tiles = triton.cdiv(channels, POOL_BLOCKS["BC"])
    dots = torch.empty(tiles, tokens, dtype=torch.float32, device=x.device)
    _pool_backward_kernel[(triton.cdiv(num_windows, POOL_BLOCKS["BW"]), tiles)](
        x, scores, meta, grad, x if dx is None else dx, dots, num_windows, tokens, channels, x.stride(0),
        grad.stride(0), **POOL_BLOCKS, WRITE_DX=dx is not None, num_warps=POOL_WARPS)
    dscore = torch.empty(tokens, dtype=torch.float32, device=x.device)
    _dscore_kernel[(triton.cdiv(num_windows, DSCORE_BLOCK),)](
        scores, meta, dots, dscore, num_windows, tokens, tiles, BW=DSCORE_BLOCK, num_warps=4)
    return dscore


def backward(grad, x, grid_hw, w1, b1, w2, b2, window, num_windows, scores, need_dx):
    """Gradients of x (empty unless need_dx: a frozen tower skips its GEMM), w1, b1, w2, b2."""
    tokens, channels = x.shape
    hid = w1.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dscore = torch.zeros(tokens, dtype=torch.float32, device=x.device)
    if num_windows:
        meta = _window_meta(grid_hw, window, num_windows, x.device)
        dscore = _score_grad(grad, x, scores, meta, num_windows, dx if need_dx else None)
    b1, w2 = b1.contiguous(), w2.contiguous()
    dh = x.new_empty(tokens, hid)
    # partial column sums, a row per BM tokens (room for the smallest BM, zeroed)
    dw2 = torch.zeros(triton.cdiv(tokens, _MIN_BM), hid, dtype=torch.float32, device=x.device)
    db1 = torch.zeros_like(dw2)
    if dh.numel():
        grid = lambda meta: (triton.cdiv(tokens, meta["BM"]), triton.cdiv(hid, meta["BN"]))  # noqa: E731
        _mlp_backward_kernel[grid](x, w1, b1, w2, dscore, dh, dw2, db1, tokens, hid, channels,
                                   x.stride(0), w1.stride(0), size_class(tokens))
    if need_dx:
        dx = torch.addmm(dx, dh, w1)
    dw1 = dh.t() @ x
    return dx, dw1, db1.sum(0).to(b1.dtype), dw2.sum(0).to(w2.dtype).view_as(w2), torch.zeros_like(b2)
