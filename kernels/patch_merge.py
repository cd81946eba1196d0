"""Fused Qwen2-VL PatchMerger: per-token norm, m*m neighbour concat, Linear -> GELU(erf) -> Linear.

The merged matrix X[r, j*C + c] = norm(x)[r*MM + j, c] (MM = merge_size**2 window neighbours, which
are consecutive rows of x) is never written. One pass over x stores per-token (mean, rstd); the two
GEMMs that read X (fc1 forward, and fc1's weight gradient in backward) normalise the x tiles while
loading them. fc1's epilogue adds its bias and applies GELU, fc2's adds its bias.

Backward: dz = (dy @ w2) * GELU'(z) in one GEMM epilogue; each weight gradient computes its bias
gradient on the side, as the row sums of the A operand it already loads (dy^T, dz^T); dX = dz @ w1
is written once in x's dtype (the reference rounds it there too) and one pass turns it into dx,
dln_w and dln_b, which need whole-token reductions no GEMM tile spans.

For backward the forward keeps stats [2, T] fp32, fc1's pre-activation z and h = GELU(z)
([T/MM, Hid], x's dtype): recomputing z would repeat the largest GEMM, and GELU (erf) applied while
loading the operand of fc2 or of dw2 would be redone for every output tile and bind those GEMMs to
the ALUs.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastvl._backend import interpreting

from .registry import Spec, gated, signature

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_NORM_TILE = 8192  # elements of x per program of the row-wise norm kernels (whole rows)


def _norm_specs(fn, floor, **types):
    # Qwen2-VL (LayerNorm, C=1280) and SigLIP-width RMSNorm (C=1152): BLOCK_C = next power of two
    return [
        Spec(f"{dtype} C={c} {name}", signature(fn, dtype, stats_ptr="*fp32", **types),
             {"RMS": name == "rms", "BLOCK_T": _NORM_TILE // 2048, "BLOCK_C": 2048}, {"num_warps": 8}, floor=floor)
        for dtype in ("fp16", "bf16") for c, name in ((1280, "ln"), (1152, "rms"))
    ]


@gated(specs=lambda fn: _norm_specs(fn, 0.6, eps="fp32"))
@triton.jit
def _merge_norm_stats(x_ptr, stats_ptr, T, C, stride_x, eps, RMS: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """stats[0] = mean (0 for RMSNorm), stats[1] = rstd of each token, from whole rows held in registers."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < T)[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RMS:
        mean = tl.zeros([BLOCK_T], dtype=tl.float32)
    else:
        mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)  # centred before squaring: no cancellation
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    tl.store(stats_ptr + rows, mean, mask=rows < T)
    tl.store(stats_ptr + T + rows, rstd, mask=rows < T)


@triton.jit
def _normed_tile(x_ptr, stride_x, stats_ptr, T, tok, tok_ok, ch, ch_ok, lnw_ptr, lnb_ptr, LN_BIAS: tl.constexpr):
    """norm(x)[tok, ch] for token rows ``tok`` and channel columns ``ch``, in x's dtype, 0 outside the masks."""
    mask = tok_ok[:, None] & ch_ok[None, :]
    x = tl.load(x_ptr + tok[:, None] * stride_x + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr + tok, mask=tok_ok, other=0.0)
    rstd = tl.load(stats_ptr + T + tok, mask=tok_ok, other=0.0)
    w = tl.load(lnw_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * rstd[:, None] * w[None, :]
    if LN_BIAS:
        y += tl.load(lnb_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(mask, y, 0.0).to(x_ptr.dtype.element_ty)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))


@triton.jit
def _gelu_grad(z):
    return 0.5 * (1.0 + tl.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)


@triton.jit
def _grouped(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) walking GROUP_M row tiles at a time, so concurrent programs share B tiles in L2."""
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


def _matmul_configs():
    """(BM, BN) tiles with BK 32 and at most 32 fp32 accumulators a thread: the gate compiles without the
    16-byte alignment the runtime specialises on (scalar loads, a 64-bit address per element), and
    larger tiles spill there."""
    if interpreting():  # the interpreter pays per program and per op, not per FLOP: one small tile
        return [triton.Config({"BM": 32, "BN": 32, "BK": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BM": bm, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=warps, num_stages=3)
        for bm, warps in ((64, 4), (128, 8))
    ]


# Every variant the op launches: (name, constexprs, the strides that are 1 there, which Triton specialises)
_VARIANTS = (
    ("fc1 ln m2", dict(NORM=1, MM=4, LN_BIAS=True, BIAS=True, GELU=1, SAVE_PRE=True, ROWSUM=False), ("ak", "bk")),
    ("fc1 rms m4", dict(NORM=1, MM=16, LN_BIAS=False, BIAS=True, GELU=1, SAVE_PRE=False, ROWSUM=False), ("ak", "bk")),
    ("fc2", dict(NORM=0, MM=1, LN_BIAS=False, BIAS=True, GELU=0, SAVE_PRE=False, ROWSUM=False), ("ak", "bk")),
    ("dz", dict(NORM=0, MM=1, LN_BIAS=False, BIAS=False, GELU=2, SAVE_PRE=False, ROWSUM=False), ("ak", "bn")),
    ("dX", dict(NORM=0, MM=1, LN_BIAS=False, BIAS=False, GELU=0, SAVE_PRE=False, ROWSUM=False), ("ak", "bn")),
    ("dw2", dict(NORM=0, MM=1, LN_BIAS=False, BIAS=False, GELU=0, SAVE_PRE=False, ROWSUM=True), ("am", "bn")),
    ("dw1 ln m2", dict(NORM=2, MM=4, LN_BIAS=True, BIAS=False, GELU=0, SAVE_PRE=False, ROWSUM=True), ("am", "bn")),
)


def _matmul_specs(fn):
    specs = []
    for name, constexprs, unit in _VARIANTS:
        unit = {f"stride_{s}": 1 for s in unit}
        for dtype in ("fp16", "bf16"):
            sig = signature(fn, dtype, stats_ptr="*fp32", **dict.fromkeys(unit, "constexpr"))
            specs.append(Spec(f"{dtype} {name}", sig, {**constexprs, **unit}, floor=0.1))
    return specs


@gated(tensor_cores="wgmma", specs=_matmul_specs)
@triton.autotune(configs=_matmul_configs(), key=["size_class", "N", "NORM", "GELU", "ROWSUM"])
@triton.jit
def _merge_matmul(
    a_ptr, b_ptr, out_ptr, bias_ptr, pre_ptr, dbias_ptr, stats_ptr, lnw_ptr, lnb_ptr,
    M, N, K, T, stride_am, stride_ak, stride_bk, stride_bn, stride_om, size_class,
    NORM: tl.constexpr, MM: tl.constexpr, LN_BIAS: tl.constexpr, BIAS: tl.constexpr, GELU: tl.constexpr,
    SAVE_PRE: tl.constexpr, ROWSUM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, :] = A[M, K'] @ B[K', :] in fp32 with a fused epilogue; out is row-major (unit column stride).

    NORM 1: A is the merged normalised x (a_ptr = x, stride_am = x's row stride): K = C and the reduction
    runs over the MM neighbour blocks of K channels. NORM 2: B is (b_ptr = x, stride_bk = x's row
    stride): N = C and the output has MM blocks of N columns. NORM 0: plain strided A and B, MM = 1.
    Epilogue: + bias[col]; GELU 1: store the pre-activation (SAVE_PRE) then GELU; GELU 2: multiply by
    GELU'(pre). ROWSUM: dbias = row sums of A, stored by the first column of tiles. ``size_class``
    (log2 of the token count) only keys the autotuner: every new pack size must not re-tune.
    """
    tiles_n = tl.cdiv(N, BN)
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BM), tiles_n * (MM if NORM == 2 else 1), GROUP_M)
    j_out = pid_n // tiles_n  # neighbour block of the output columns (NORM 2), else 0
    rm = pid_m * BM + tl.arange(0, BM)
    rn = (pid_n % tiles_n) * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rowsum = tl.zeros((BM,), dtype=tl.float32)
    for j in range(MM if NORM == 1 else 1):
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < K
            if NORM == 1:
                a = _normed_tile(a_ptr, stride_am, stats_ptr, T, rm * MM + j, m_ok, rk, k_ok, lnw_ptr, lnb_ptr, LN_BIAS)
            else:
                a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM == 2:
                b = _normed_tile(b_ptr, stride_bk, stats_ptr, T, rk * MM + j_out, k_ok, rn, n_ok, lnw_ptr, lnb_ptr,
                                 LN_BIAS)
            else:
                b = tl.load(b_ptr + (j * K + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            if ROWSUM:
                rowsum += tl.sum(a.to(tl.float32), axis=1)

    cols = j_out * N + rn
    mask = m_ok[:, None] & n_ok[None, :]
    offs = rm[:, None] * stride_om + cols[None, :]
    if BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU == 1:
        if SAVE_PRE:
            tl.store(pre_ptr + offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        acc = _gelu(acc)
    if GELU == 2:
        acc *= _gelu_grad(tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if ROWSUM:
        if pid_n == 0:
            tl.store(dbias_ptr + rm, rowsum.to(dbias_ptr.dtype.element_ty), mask=m_ok)


@gated(specs=lambda fn: _norm_specs(fn, 0.8, dw_ptr="*fp32", db_ptr="*fp32"))
@triton.jit
def _merge_norm_backward(dy_ptr, x_ptr, stats_ptr, lnw_ptr, dx_ptr, dw_ptr, db_ptr, T, C, stride_x,
                         RMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx from dy = d norm(x) ([T, C], contiguous), and this program's partial sums of dln_w, dln_b (fp32 [C]).

    Programs stride over the row blocks, so the partials are few (a handful per SM) and summed by torch.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    w = tl.load(lnw_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(pid * BLOCK_T, T, tl.num_programs(0) * BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        r_ok = rows < T
        mask = r_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + rows, mask=r_ok, other=0.0)
        rstd = tl.load(stats_ptr + T + rows, mask=r_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        dx = g - xhat * (tl.sum(g * xhat, axis=1) / C)[:, None]
        if not RMS:
            dx -= (tl.sum(g, axis=1) / C)[:, None]
        tl.store(dx_ptr + rows[:, None] * C + cols[None, :], (dx * rstd[:, None]).to(dx_ptr.dtype.element_ty),
                 mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_ptr + pid * C + cols, dw, mask=c_ok)
    if not RMS:
        tl.store(db_ptr + pid * C + cols, db, mask=c_ok)


class Merged(NamedTuple):
    """The merged normalised x as a GEMM operand: [T / mm, mm * C], never materialised."""

    x: torch.Tensor
    stats: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor | None
    mm: int


def matmul(a, b, out, *, bias=None, gelu=0, pre=None, dbias=None):
    """out = a @ b (+ bias; gelu 1: pre <- z, out <- GELU(z); gelu 2: out *= GELU'(pre); dbias <- a's row sums).

    ``a`` or ``b`` may be a Merged x; plain operands are 2-D tensors of any strides (a transpose is a view).
    """
    norm, merged = 0, Merged(out, out, out, None, 1)  # placeholders: NORM 0 never reads them
    if isinstance(a, Merged):
        norm, merged = 1, a
        a, M, K, (stride_am, stride_ak) = a.x, a.x.shape[0] // a.mm, a.x.shape[1], (a.x.stride(0), 1)
    else:
        (M, K), (stride_am, stride_ak) = a.shape, a.stride()
    if isinstance(b, Merged):
        norm, merged = 2, b
        b, N, (stride_bk, stride_bn) = b.x, b.x.shape[1], (b.x.stride(0), 1)
    else:
        N, (stride_bk, stride_bn) = b.shape[1], b.stride()
    tokens = K if dbias is not None else M  # the dimension that grows with the pack (weight gradients reduce it)
    n_blocks = merged.mm if norm == 2 else 1

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]) * n_blocks,)

    _merge_matmul[grid](
        a, b, out, _or(bias, out), _or(pre, out), _or(dbias, out), merged.stats, merged.ln_w, _or(merged.ln_b, out),
        M, N, K, merged.x.shape[0], stride_am, stride_ak, stride_bk, stride_bn, out.stride(0), tokens.bit_length(),
        NORM=norm, MM=merged.mm, LN_BIAS=merged.ln_b is not None, BIAS=bias is not None, GELU=gelu,
        SAVE_PRE=pre is not None, ROWSUM=dbias is not None,
    )
    return out


def _or(t, placeholder):
    """A pointer argument the kernel's constexpr flags leave unread still needs a tensor."""
    return placeholder if t is None else t


def _norm_launch(x):
    """(BLOCK_T, BLOCK_C) of the row-wise norm kernels: whole rows, about _NORM_TILE elements per program."""
    block_c = triton.next_power_of_2(x.shape[1])
    return max(1, _NORM_TILE // block_c), block_c


def _new(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def norm_stats(x, eps, norm):
    """[2, T] fp32: per-token mean (0 for RMSNorm) and rstd, one pass over x."""
    tokens, channels = x.shape
    stats = x.new_empty(2, tokens, dtype=torch.float32)
    if tokens:
        block_t, block_c = _norm_launch(x)
        _merge_norm_stats[(triton.cdiv(tokens, block_t),)](
            x, stats, tokens, channels, x.stride(0), eps, RMS=norm == "rmsnorm", BLOCK_T=block_t, BLOCK_C=block_c,
            num_warps=8,
        )
    return stats


def norm_backward(dnormed, x, stats, ln_w, norm):
    """(dx, dln_w, dln_b or None) from dnormed [T, C] contiguous, the gradient of norm(x)."""
    tokens, channels = x.shape
    rms = norm == "rmsnorm"
    block_t, block_c = _norm_launch(x)
    # a few programs per SM striding over the row blocks (two in the interpreter, which pays per program)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 0
    programs = min(triton.cdiv(tokens, block_t), 4 * sms or 2)
    dx = x.new_empty(tokens, channels)
    dw = x.new_empty(programs, channels, dtype=torch.float32)
    db = dw if rms else torch.empty_like(dw)
    _merge_norm_backward[(programs,)](
        dnormed, x, stats, ln_w, dx, dw, db, tokens, channels, x.stride(0), RMS=rms, BLOCK_T=block_t,
        BLOCK_C=block_c, num_warps=8,
    )
    return dx, dw.sum(0).to(ln_w.dtype), None if rms else db.sum(0).to(ln_w.dtype)


def forward(x, ln_w, ln_b, w1, b1, w2, b2, merge_size, eps, norm, save=False):
    """(out, stats, pre, act): the last three are what backward() reuses, empty tensors unless ``save``."""
    mm = merge_size * merge_size
    tokens, channels = x.shape
    rows, hidden = tokens // mm, w1.shape[0]
    stats = norm_stats(x, eps, norm)
    act = x.new_empty(rows, hidden)
    pre = x.new_empty(rows, hidden) if save else None
    out = x.new_empty(rows, w2.shape[0])
    if tokens:
        matmul(Merged(x, stats, ln_w, ln_b, mm), w1.t(), act, bias=b1, gelu=1, pre=pre)
        matmul(act, w2.t(), out, bias=b2)
    if not save:
        return out, x.new_empty(0, dtype=torch.float32), x.new_empty(0), x.new_empty(0)
    return out, stats, pre, act


def backward(grad, x, ln_w, ln_b, w1, b1, w2, b2, stats, pre, act, merge_size, eps, norm):
    """Gradients of (x, ln_w, ln_b, w1, b1, w2, b2) from forward()'s saved stats, pre and act; None for no ln_b."""
    mm = merge_size * merge_size
    tokens, channels = x.shape
    dw2, db2 = _new(w2), _new(b2)
    matmul(grad.t(), act, dw2, dbias=db2)
    dz = matmul(grad, w2, _new(pre), gelu=2, pre=pre)
    dw1, db1 = _new(w1), _new(b1)
    matmul(dz.t(), Merged(x, stats, ln_w, ln_b, mm), dw1, dbias=db1)
    dnormed = matmul(dz, w1, x.new_empty(tokens // mm, mm * channels))
    dx, dln_w, dln_b = norm_backward(dnormed, x, stats, ln_w, norm)
    return dx, dln_w, dln_b, dw1, db1, dw2, db2
