"""FlashSloth spatial attention pooling: fused score MLP, window softmax, weighted window sums.

Forward (two kernels; the [T, Hid] hidden activation never leaves registers):
  1. ``_score_kernel``: x @ W1^T on tensor cores; its epilogue applies b1 + ReLU and reduces the tile
     against w2 into per-token fp32 partial scores (one row per slab of Hid columns, summed after).
  2. ``_pool_kernel``: one program per block of windows x channel tile: window softmax of the scores
     and the weighted sum of the raw features.
Backward: ``_pool_backward_kernel`` gives dscore = w * (dy.x - sum_window(w * dy.x)) and the direct
term w * dy of dx; ``_mlp_backward_kernel`` recomputes the pre-activation GEMM to get the ReLU mask
and writes dh = dscore * w2 * relu'(pre); cuBLAS then does the two plain GEMMs dx += dh @ W1 and
dW1 = dh^T @ x, which have no epilogue to fuse.

Backward recomputes pre = x @ W1^T rather than saving it: saving would write [T, Hid] in forward,
read it back in backward (2*T*Hid elements) and hold it in memory in between; recomputing
re-reads x (T*C elements, half that traffic when C == Hid as in FlashSloth's 1152 -> 1152 MLP)
for one more GEMM. Forward saves only the [T] fp32 scores. b2 shifts every score of a window
alike, so it changes neither the output nor any gradient (its own gradient is exactly 0).
"""
import torch
import triton
import triton.language as tl

from fastvl._backend import interpreting

from .registry import Spec, gated, signature

SLAB = 128  # Hid columns (forward) / tokens (backward) one GEMM program covers: fixes the partial-sum layout


def _first_config_when_interpreting(configs, named_args, **kwargs):
    """The interpreter would benchmark every config at ~20 ms a program: run the first one only."""
    return configs[:1] if interpreting() else configs


def _gemm_configs(*tiles):
    """(BM, BN, warps) tiles; BK 32 and at most 32 accumulator elements a thread keep the gate's
    alignment-agnostic compile (scalar loads, 64-bit addresses per element) free of spills."""
    return [triton.Config({"BM": bm, "BN": bn, "BK": 32}, num_warps=w, num_stages=3) for bm, bn, w in tiles]


def _size_class(tokens):
    """log2 of the token count: keys the GEMM autotuning (a single crop and a training pack tile differently)
    without re-tuning for every pack size."""
    return max(tokens, 1).bit_length()


def _gemm_specs(fn):
    fp32 = {name: "*fp32" for name in ("partial_ptr", "dscore_ptr", "dw2_ptr", "db1_ptr")}
    return [Spec(dt, signature(fn, dt, **fp32), {"SLAB": SLAB}, floor=0.15) for dt in ("fp16", "bf16")]


@triton.jit
def _pre_activation(
    x_ptr, w1_ptr, b1_ptr, rm, rn, T, C, HID, stride_x, stride_w, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """fp32 tile x[rm] @ W1[rn]^T + b1[rn]; rows past T / columns past HID wrap around (callers mask them)."""
    rk = tl.arange(0, BK)
    a_ptrs = x_ptr + (rm % T).to(tl.int64)[:, None] * stride_x + rk[None, :]
    b_ptrs = w1_ptr + (rn % HID).to(tl.int64)[None, :] * stride_w + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, C, BK):
        a = tl.load(a_ptrs, mask=(k0 + rk < C)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(k0 + rk < C)[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    return acc + tl.load(b1_ptr + rn % HID).to(tl.float32)[None, :]


@gated(specs=_gemm_specs, tensor_cores="wgmma")
@triton.autotune(_gemm_configs((64, 64, 4), (128, 64, 8), (128, 128, 8)), key=["size_class", "C", "HID"],
                 prune_configs_by={"early_config_prune": _first_config_when_interpreting})
@triton.jit
def _score_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, partial_ptr, T, C, HID, stride_x, stride_w, size_class,
    SLAB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """partial[slab, t] = sum over the slab's Hid columns n of w2[n] * relu(x[t] . W1[n] + b1[n])."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    slab = tl.program_id(1)
    score = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(slab * SLAB, tl.minimum(slab * SLAB + SLAB, HID), BN):
        rn = n0 + tl.arange(0, BN)
        pre = _pre_activation(x_ptr, w1_ptr, b1_ptr, rm, rn, T, C, HID, stride_x, stride_w, BM, BN, BK)
        w2 = tl.load(w2_ptr + rn, mask=rn < HID, other=0.0).to(tl.float32)
        score += tl.sum(tl.maximum(pre, 0.0) * w2[None, :], axis=1)
    tl.store(partial_ptr + slab * T + rm, score, mask=rm < T)


@gated(specs=_gemm_specs, tensor_cores="wgmma")
@triton.autotune(_gemm_configs((64, 64, 4), (128, 64, 8), (64, 128, 8)), key=["size_class", "C", "HID"],
                 prune_configs_by={"early_config_prune": _first_config_when_interpreting})
@triton.jit
def _mlp_backward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, dscore_ptr, dh_ptr, dw2_ptr, db1_ptr, T, C, HID, stride_x, stride_w, size_class,
    SLAB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """dh = dscore * w2 * (pre > 0) for the slab's tokens; per-slab column sums of dscore * relu(pre) and dh."""
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    slab = tl.program_id(0)
    w2 = tl.load(w2_ptr + rn, mask=rn < HID, other=0.0).to(tl.float32)
    dw2 = tl.zeros((BN,), dtype=tl.float32)
    db1 = tl.zeros((BN,), dtype=tl.float32)
    for m0 in range(slab * SLAB, tl.minimum(slab * SLAB + SLAB, T), BM):
        rm = m0 + tl.arange(0, BM)
        pre = _pre_activation(x_ptr, w1_ptr, b1_ptr, rm, rn, T, C, HID, stride_x, stride_w, BM, BN, BK)
        ds = tl.load(dscore_ptr + rm, mask=rm < T, other=0.0)  # 0 past T: those rows add nothing
        dh = tl.where(pre > 0, ds[:, None] * w2[None, :], 0.0)
        tl.store(dh_ptr + rm.to(tl.int64)[:, None] * HID + rn[None, :], dh.to(dh_ptr.dtype.element_ty),
                 mask=(rm < T)[:, None] & (rn < HID)[None, :])
        dw2 += tl.sum(ds[:, None] * tl.maximum(pre, 0.0), axis=0)
        db1 += tl.sum(dh, axis=0)
    tl.store(dw2_ptr + slab * HID + rn, dw2, mask=rn < HID)
    tl.store(db1_ptr + slab * HID + rn, db1, mask=rn < HID)


@triton.jit
def _window_block(meta_ptr, score_ptr, NW, R: tl.constexpr, RR: tl.constexpr, BW: tl.constexpr):
    """A block of windows: ids, live mask, and per slot (k = row k // R, col k % R) token, mask, softmax weight."""
    win = tl.program_id(0) * BW + tl.arange(0, BW)
    live = win < NW
    base = tl.load(meta_ptr + win * 4, mask=live, other=0)
    rows = tl.load(meta_ptr + win * 4 + 1, mask=live, other=0)
    cols = tl.load(meta_ptr + win * 4 + 2, mask=live, other=0)
    width = tl.load(meta_ptr + win * 4 + 3, mask=live, other=0)
    k = tl.arange(0, RR)
    di, dj = k // R, k % R
    valid = (di[None, :] < rows[:, None]) & (dj[None, :] < cols[:, None])  # slots >= R*R have di >= R >= rows
    tok = (base[:, None] + di[None, :] * width[:, None] + dj[None, :]).to(tl.int64)
    s = tl.load(score_ptr + tok, mask=valid, other=float("-inf"))
    peak = tl.where(live, tl.max(s, axis=1), 0.0)  # every live window holds at least one token
    e = tl.exp(s - peak[:, None])
    total = tl.where(live, tl.sum(e, axis=1), 1.0)
    return win, live, tok, valid.to(tl.int32), e / total[:, None]


@triton.jit
def _slot(t, k, RR: tl.constexpr):
    """Column k of a [BW, RR] slot tensor."""
    return tl.sum(tl.where((tl.arange(0, RR) == k)[None, :], t, 0), axis=1)


def _pool_blocks(window):
    """Slots per window (a power of two), windows per program (16, fewer for large windows), channel tile."""
    rr = triton.next_power_of_2(window * window)
    return {"R": window, "RR": rr, "BW": max(1, min(16, 256 // rr)), "BC": 64}


def _pool_specs(fn):
    types = {"score_ptr": "*fp32", "dscore_ptr": "*fp32", "meta_ptr": "*i32"}
    return [Spec(f"{dt} window={r}", signature(fn, dt, **types), _pool_blocks(r), {"num_warps": 4}, floor=0.4)
            for dt, r in (("fp16", 3), ("bf16", 3), ("bf16", 2))]


def _pool_backward_specs(fn):
    with_dx = [Spec(s.name, s.signature, {**s.constexprs, "WRITE_DX": True}, s.options, floor=0.75)
               for s in _pool_specs(fn)]
    base = with_dx[1]
    return with_dx + [Spec(base.name + " no dx", base.signature, {**base.constexprs, "WRITE_DX": False}, base.options,
                           floor=0.75)]


@gated(specs=_pool_specs)
@triton.jit
def _pool_kernel(
    x_ptr, score_ptr, meta_ptr, out_ptr, NW, C, stride_x,
    R: tl.constexpr, RR: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr,
):
    """out[window, c tile] = sum over the window's tokens of softmax(score) * x."""
    win, live, tok, valid, weight = _window_block(meta_ptr, score_ptr, NW, R, RR, BW)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    out = tl.zeros((BW, BC), dtype=tl.float32)
    for k in range(R * R):
        mask = (_slot(valid, k, RR) != 0)[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + _slot(tok, k, RR)[:, None] * stride_x + c[None, :], mask=mask, other=0.0)
        out += _slot(weight, k, RR)[:, None] * x.to(tl.float32)
    tl.store(out_ptr + win.to(tl.int64)[:, None] * C + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (c < C)[None, :])


@gated(specs=_pool_backward_specs)
@triton.jit
def _pool_backward_kernel(
    x_ptr, score_ptr, meta_ptr, dy_ptr, dx_ptr, dscore_ptr, NW, C, stride_x, stride_dy,
    R: tl.constexpr, RR: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr, WRITE_DX: tl.constexpr,
):
    """dscore = w * (dy.x - sum_window(w * dy.x)) per token, and (WRITE_DX) dx = w * dy, the MLP term added later."""
    win, live, tok, valid, weight = _window_block(meta_ptr, score_ptr, NW, R, RR, BW)
    dy_rows = dy_ptr + win.to(tl.int64)[:, None] * stride_dy
    dots = tl.zeros((BW, RR), dtype=tl.float32)
    for k in range(R * R):
        t = _slot(tok, k, RR)
        v = _slot(valid, k, RR) != 0
        w = _slot(weight, k, RR)
        dot = tl.zeros((BW,), dtype=tl.float32)
        for c0 in range(0, C, BC):
            c = c0 + tl.arange(0, BC)
            dy = tl.load(dy_rows + c[None, :], mask=live[:, None] & (c < C)[None, :], other=0.0).to(tl.float32)
            mask = v[:, None] & (c < C)[None, :]
            x = tl.load(x_ptr + t[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(x * dy, axis=1)
            if WRITE_DX:
                tl.store(dx_ptr + t[:, None] * C + c[None, :], (w[:, None] * dy).to(dx_ptr.dtype.element_ty), mask=mask)
        dots += tl.where((tl.arange(0, RR) == k)[None, :], dot[:, None], 0.0)
    dscore = weight * (dots - tl.sum(weight * dots, axis=1)[:, None])
    tl.store(dscore_ptr + tok, dscore, mask=valid != 0)


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
    partial = torch.empty(triton.cdiv(hid, SLAB), tokens, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(tokens, meta["BM"]), triton.cdiv(hid, SLAB))  # noqa: E731
    _score_kernel[grid](x, w1, b1, w2, partial, tokens, channels, hid, x.stride(0), w1.stride(0), _size_class(tokens),
                        SLAB=SLAB)
    return partial.sum(0)


def forward(x, grid_hw, w1, b1, w2, b2, window, num_windows):
    """Pooled windows [num_windows, C] and the fp32 scores [T] (saved for backward)."""
    tokens, channels = x.shape
    out = x.new_empty(num_windows, channels)
    if num_windows == 0:
        return out, x.new_empty(0, dtype=torch.float32)
    scores = _scores(x, w1, b1.contiguous(), w2.contiguous())
    meta = _window_meta(grid_hw, window, num_windows, x.device)
    blocks = _pool_blocks(window)
    grid = (triton.cdiv(num_windows, blocks["BW"]), triton.cdiv(channels, blocks["BC"]))
    _pool_kernel[grid](x, scores, meta, out, num_windows, channels, x.stride(0), **blocks, num_warps=4)
    return out, scores


def backward(grad, x, grid_hw, w1, b1, w2, b2, window, num_windows, scores, need_dx):
    """Gradients of x (empty unless need_dx: a frozen tower skips its GEMM), w1, b1, w2, b2."""
    tokens, channels = x.shape
    hid = w1.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dscore = torch.empty(tokens, dtype=torch.float32, device=x.device)
    if num_windows:
        meta = _window_meta(grid_hw, window, num_windows, x.device)
        blocks = _pool_blocks(window)
        _pool_backward_kernel[(triton.cdiv(num_windows, blocks["BW"]),)](
            x, scores, meta, grad, dx, dscore, num_windows, channels, x.stride(0), grad.stride(0), **blocks,
            WRITE_DX=need_dx, num_warps=4)
    b1, w2 = b1.contiguous(), w2.contiguous()
    dh = x.new_empty(tokens, hid)
    slabs = triton.cdiv(tokens, SLAB)
    dw2 = torch.empty(slabs, hid, dtype=torch.float32, device=x.device)
    db1 = torch.empty(slabs, hid, dtype=torch.float32, device=x.device)
    if tokens:
        grid = lambda meta: (slabs, triton.cdiv(hid, meta["BN"]))  # noqa: E731
        _mlp_backward_kernel[grid](x, w1, b1, w2, dscore, dh, dw2, db1, tokens, channels, hid,
                                   x.stride(0), w1.stride(0), _size_class(tokens), SLAB=SLAB)
    if need_dx:
        dx = torch.addmm(dx, dh, w1)
    dw1 = dh.t() @ x
    return dx, dw1, db1.sum(0).to(b1.dtype), dw2.sum(0).to(w2.dtype).view_as(w2), torch.zeros_like(b2)
