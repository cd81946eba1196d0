"""Fused Qwen2-VL PatchMerger: per-token norm, m*m neighbour concat, Linear -> GELU(erf) -> Linear.

The norm is applied once: a row-wise pass reads x and writes xn = norm(x) ([T, C], x's dtype), whose
contiguous view [T / MM, MM * C] (MM = merge_size**2 neighbours, consecutive rows of x) is the merged
matrix X. Normalising x tiles inside the GEMM instead would redo it for every output tile (Hid / BN
times) and bind fc1 to the ALUs; the extra write of xn is one memory pass, a few percent of fc1.
fc1 is a plain tensor-core GEMM whose epilogue adds b1 and applies GELU (saving the pre-activation
for backward); fc2, which only adds a bias, runs on cuBLAS (``torch.addmm``).

Backward: dz = (dy @ w2) * GELU'(z) is the same GEMM with a GELU' epilogue that also reduces its tile
to per-row-block column sums (db1 from one small sum, no second pass over dz). The epilogue-free
GEMMs dw2 = dy^T @ h, dw1 = dz^T @ X and dX = dz @ w1 run on cuBLAS, and db2 = column sums of dy.
X is normalised again for dw1 (one pass, freed before dX is allocated), so training saves only fc1's
pre-activation z and h = GELU(z): recomputing z would repeat the largest GEMM, and GELU (erf) applied
while loading fc2's or dw2's operand would be redone for every output tile. One row-wise pass turns
dX into dx, dln_w and dln_b, which need whole-token reductions no GEMM tile spans.
"""
import torch
import triton
import triton.language as tl

from .common import autotune_configs, even_k, gelu, gelu_grad, matmul_tile, quarters, size_class, sm_count
from .registry import gated, launch_spec, prune_by_arch

# epilogues of the fused GEMM
GELU_FORWARD = tl.constexpr(0)  # out = GELU(acc + bias), pre <- acc + bias (SAVE_PRE)
GELU_BACKWARD = tl.constexpr(1)  # out = acc * GELU'(pre); per-row-block column sums of out

_NORM_TILE = 8192  # elements of x per program of the row-wise norm kernels (whole rows)


@triton.jit
def _normalise_rows(x, mask, C, eps, RMS: tl.constexpr):
    """(x - mean) * rstd of whole fp32 rows x (0 outside ``mask``; no mean for RMSNorm), and rstd per row."""
    if RMS:
        xc = x
    else:
        xc = tl.where(mask, x - (tl.sum(x, axis=1) / C)[:, None], 0.0)  # centred before squaring: no cancellation
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    return xc * rstd[:, None], rstd


def _norm_specs(fn, **types):
    # Qwen2-VL (LayerNorm, C=1280) and a SigLIP-width RMSNorm (C=1152) as launched: whole rows, BLOCK_C the
    # next power of two; floor: the fraction of DRAM bandwidth the performance model must allow
    return [
        launch_spec(f"{dtype} C={c} {name}", fn, dtype, {"RMS": name == "rms", "BLOCK_T": _NORM_TILE // 2048,
                                                          "BLOCK_C": 2048}, {"C": c, "stride_x": c},
                    {"eps": "fp32", **types}, options={"num_warps": 8}, floor=0.8)
        for dtype in ("fp16", "bf16") for c, name in ((1280, "ln"), (1152, "rms"))
    ]


@gated(specs=_norm_specs)
@triton.jit
def _merge_norm(x_ptr, lnw_ptr, lnb_ptr, xn_ptr, T, C, stride_x, eps, RMS: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """xn = norm(x) * ln_w (+ ln_b for LayerNorm) in x's dtype, xn contiguous; whole rows in registers."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < T)[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y, _ = _normalise_rows(x, mask, C, eps, RMS)
    y *= tl.load(lnw_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if not RMS:
        y += tl.load(lnb_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(xn_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], y.to(xn_ptr.dtype.element_ty), mask=mask)


@gated(specs=lambda fn: _norm_specs(fn, dw_ptr="*fp32", db_ptr="*fp32"))
@triton.jit
def _merge_norm_backward(dy_ptr, x_ptr, lnw_ptr, dx_ptr, dw_ptr, db_ptr, T, C, stride_x, eps,
                         RMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx from dy = d norm(x) ([T, C], contiguous), and this program's partial sums of dln_w, dln_b (fp32 [C]).

    The row statistics are recomputed from the rows already loaded. Programs stride over the row blocks,
    so the partials are few (a handful per SM) and summed by torch.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    w = tl.load(lnw_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(pid * BLOCK_T, T, tl.num_programs(0) * BLOCK_T):
        rows = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (rows < T)[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = _normalise_rows(x, mask, C, eps, RMS)
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


@triton.jit
def _grouped(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) walking GROUP_M row tiles at a time, so concurrent programs share B tiles in L2."""
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


def _matmul_configs():
    """(BM, BN, BK, warps, stages) per architecture family. sm_90: 128 x 256 x 64 on two warpgroups, the
    one tile whose shared-memory traffic (each warpgroup reads the B tile for its wgmma) stays below its
    tensor time (fastvl gate --perf: 95%; 128 x 128: 74%); 3-4 stages of 48 KiB. sm_80 (mma.sync from
    registers, 164 KiB): tiles of 128 x 128/256, and 64 x 128 for packs of a few hundred merged rows."""
    tiles = {90: [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4)],
             80: [(128, 256, 32, 8, 3), (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (64, 128, 32, 4, 4)]}
    return autotune_configs([({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "ARCH": arch}, w, s)
                             for arch, configs in tiles.items() for bm, bn, bk, w, s in configs],
                            {"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4})


_MATMUL_CONFIGS = _matmul_configs()
_MIN_BM = min(c.kwargs["BM"] for c in _MATMUL_CONFIGS)

# The GEMMs as launched for the Qwen2-VL-2B merger (C = 1280, merge 2: K = 5120, Hid = 5120, Out = 1536):
# fc1 = xn [R, 5120] @ w1^T, dz = dy [R, 1536] @ w2 [1536, 5120]; R (the merged rows) varies
_LAUNCHES = (
    ("fc1 train", dict(EPILOGUE=GELU_FORWARD, SAVE_PRE=True), dict(N=5120, K=5120, stride_am=5120, stride_ak=1,
                                                                   stride_bk=1, stride_bn=5120, stride_om=5120)),
    ("fc1 infer", dict(EPILOGUE=GELU_FORWARD, SAVE_PRE=False), dict(N=5120, K=5120, stride_am=5120, stride_ak=1,
                                                                    stride_bk=1, stride_bn=5120, stride_om=5120)),
    ("dz", dict(EPILOGUE=GELU_BACKWARD, SAVE_PRE=False), dict(N=5120, K=1536, stride_am=1536, stride_ak=1,
                                                              stride_bk=5120, stride_bn=1, stride_om=5120)),
)


def _matmul_specs(fn):
    # floor: the fraction of tensor peak the performance model must allow (>= 80% at the merger shape)
    return [launch_spec(f"{dtype} {name}", fn, dtype, {**constexprs, "EVEN_K": True}, ints, {"colsum_ptr": "*fp32"},
                        floor=0.8)
            for name, constexprs, ints in _LAUNCHES for dtype in ("fp16", "bf16")]


@gated(tensor_cores="wgmma", specs=_matmul_specs)
@triton.autotune(configs=_MATMUL_CONFIGS, key=["size_class", "N", "K", "EPILOGUE"],
                 prune_configs_by={"early_config_prune": prune_by_arch})
@triton.heuristics({"EVEN_K": even_k})
@triton.jit
def _merge_matmul(
    a_ptr, b_ptr, out_ptr, bias_ptr, pre_ptr, colsum_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, size_class,
    EPILOGUE: tl.constexpr, SAVE_PRE: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, ARCH: tl.constexpr = 0,
):
    """out[M, N] = epilogue(A[M, K] @ B[K, N]) in fp32 on tensor cores; A and B strided, out and pre
    row-major with row stride ``stride_om``, colsum fp32 [cdiv(M, BM), N]. ``size_class`` (log2 of M)
    only keys the autotuner: a new pack size must not re-tune. ARCH tags a config's architecture family.
    """
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    acc = matmul_tile(a_ptr, b_ptr, pid_m * BM, pid_n * BN, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                      EVEN_K, BM, BN, BK)
    q0, q1, q2, q3 = quarters(acc, BM, BN)
    args = (pid_m * BM, M, N, out_ptr, bias_ptr, pre_ptr, colsum_ptr + pid_m * N, stride_om, EPILOGUE, SAVE_PRE)
    _epilogue(q0, pid_n * BN, *args)
    _epilogue(q1, pid_n * BN + BN // 4, *args)
    _epilogue(q2, pid_n * BN + BN // 2, *args)
    _epilogue(q3, pid_n * BN + 3 * (BN // 4), *args)


@triton.jit
def _epilogue(acc, n0, m0, M, N, out_ptr, bias_ptr, pre_ptr, colsum_ptr, stride_om,
              EPILOGUE: tl.constexpr, SAVE_PRE: tl.constexpr):
    """The epilogue of the accumulator block at rows m0.., columns n0.. (see _merge_matmul)."""
    rm = tl.arange(0, acc.shape[0])
    rn = tl.arange(0, acc.shape[1])
    n_ok = n0 + rn < N
    mask = (m0 + rm < M)[:, None] & n_ok[None, :]
    offs = m0.to(tl.int64) * stride_om + n0 + (rm[:, None] * stride_om + rn[None, :])
    if EPILOGUE == GELU_FORWARD:
        acc += tl.load(bias_ptr + n0 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SAVE_PRE:
            tl.store(pre_ptr + offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        acc = gelu(acc)
    else:
        acc *= gelu_grad(tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        tl.store(colsum_ptr + n0 + rn, tl.sum(tl.where(mask, acc, 0.0), axis=0), mask=n_ok)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def matmul(a, b, out, epilogue, *, bias=None, pre=None, save_pre=False):
    """out = epilogue(a @ b) for 2-D ``a`` [M, K] and ``b`` [K, N] of any strides (a transpose is a view).

    GELU_FORWARD: z = a @ b + bias, pre <- z when ``save_pre``, out <- GELU(z); returns out.
    GELU_BACKWARD: out <- (a @ b) * GELU'(pre); returns the column sums of out (fp32 [N]).
    """
    (M, K), N = a.shape, b.shape[1]
    # a row of partial column sums per BM rows; BM is chosen at launch, so room for the smallest, zeroed
    colsum = torch.zeros(triton.cdiv(M, _MIN_BM) if epilogue == GELU_BACKWARD else 0, N, dtype=torch.float32,
                         device=out.device)
    if M and N:
        def grid(meta):
            return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

        _merge_matmul[grid](
            a, b, out, out if bias is None else bias, out if pre is None else pre, colsum, M, N, K,
            *a.stride(), *b.stride(), out.stride(0), size_class(M), EPILOGUE=epilogue, SAVE_PRE=save_pre,
        )
    return out if epilogue == GELU_FORWARD else colsum.sum(0)


def _norm_launch(x):
    """(BLOCK_T, BLOCK_C) of the row-wise norm kernels: whole rows, about _NORM_TILE elements per program."""
    block_c = triton.next_power_of_2(x.shape[1])
    return max(1, _NORM_TILE // block_c), block_c


def normalise(x, ln_w, ln_b, eps, norm):
    """xn = norm(x) [T, C] contiguous, in x's dtype."""
    tokens, channels = x.shape
    xn = x.new_empty(tokens, channels)
    if tokens:
        block_t, block_c = _norm_launch(x)
        _merge_norm[(triton.cdiv(tokens, block_t),)](
            x, ln_w, ln_w if ln_b is None else ln_b, xn, tokens, channels, x.stride(0), eps,
            RMS=norm == "rmsnorm", BLOCK_T=block_t, BLOCK_C=block_c, num_warps=8,
        )
    return xn


def norm_backward(dnormed, x, ln_w, eps, norm):
    """(dx, dln_w, dln_b or None) from dnormed [T, C] contiguous, the gradient of norm(x)."""
    tokens, channels = x.shape
    rms = norm == "rmsnorm"
    dx = x.new_empty(tokens, channels)
    if not tokens:
        zeros = torch.zeros_like(ln_w)
        return dx, zeros, None if rms else zeros.clone()
    block_t, block_c = _norm_launch(x)
    # a few programs per SM striding over the row blocks (two in the interpreter, which pays per program)
    programs = min(triton.cdiv(tokens, block_t), 4 * sm_count(x.device) or 2)
    dw = x.new_empty(programs, channels, dtype=torch.float32)
    db = dw if rms else torch.empty_like(dw)
    _merge_norm_backward[(programs,)](
        dnormed, x, ln_w, dx, dw, db, tokens, channels, x.stride(0), eps, RMS=rms, BLOCK_T=block_t,
        BLOCK_C=block_c, num_warps=8,
    )
    return dx, dw.sum(0).to(ln_w.dtype), None if rms else db.sum(0).to(ln_w.dtype)


def forward(x, ln_w, ln_b, w1, b1, w2, b2, merge_size, eps, norm, save=False):
    """(out, pre, act): fc1's pre-activation and GELU output, which backward() reuses; None unless ``save``."""
    mm = merge_size * merge_size
    tokens, channels = x.shape
    rows = tokens // mm
    act = x.new_empty(rows, w1.shape[0])
    pre = torch.empty_like(act) if save else None
    if act.numel():
        xn = normalise(x, ln_w, ln_b, eps, norm).view(rows, mm * channels)
        matmul(xn, w1.t(), act, GELU_FORWARD, bias=b1, pre=pre, save_pre=save)
        del xn  # before fc2 allocates its output
    out = torch.addmm(b2, act, w2.t())
    return out, pre, (act if save else None)


def backward(grad, x, ln_w, ln_b, w1, b1, w2, b2, pre, act, merge_size, eps, norm):
    """Gradients of (x, ln_w, ln_b, w1, b1, w2, b2) from forward()'s saved pre and act; None for no ln_b."""
    mm = merge_size * merge_size
    tokens, channels = x.shape
    rows = tokens // mm
    dw2 = grad.t() @ act
    db2 = grad.sum(0)
    dz = torch.empty_like(pre)
    db1 = matmul(grad, w2, dz, GELU_BACKWARD, pre=pre).to(b1.dtype)
    xn = normalise(x, ln_w, ln_b, eps, norm).view(rows, mm * channels)
    dw1 = dz.t() @ xn
    del xn  # before dX takes its place
    dnormed = dz @ w1
    dx, dln_w, dln_b = norm_backward(dnormed.view(tokens, channels), x, ln_w, eps, norm)
    return dx, dln_w, dln_b, dw1, db1, dw2, db2
