"""Device functions, constants and helpers shared by the kernels (one home for each)."""
import functools
from fractions import Fraction

import torch
import triton
import triton.language as tl

from fastvl._backend import interpreting

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
# 2*pi to 40 digits: the frequency table is exact to 2^-64 of a turn
_TWO_PI = Fraction("6.283185307179586476925286766559005768394")


@functools.lru_cache(maxsize=64)
def _rope_turns(head_dim: int, theta: float) -> tuple:
    """The D/4 rotary frequencies f_j = theta^(-4j/D) (float64, as the reference computes them) in turns per
    position, as 64-bit fixed point (2^64 = one turn) wrapped to int64. Only the fraction of a turn matters
    at integer positions. The ops admit theta >= 2^-96 only, so every frequency is finite (below 2^96)."""
    inv_freq = theta ** (-torch.arange(0, head_dim // 4, dtype=torch.float64) * 4 / head_dim)
    table = []
    for f in inv_freq.tolist():
        turns = round(Fraction(f) / _TWO_PI * 2**64) % 2**64
        table.append(turns - 2**64 if turns >= 2**63 else turns)
    return tuple(table)


def rope_table(head_dim: int, theta: float, device) -> torch.Tensor:
    """int64 [D/4] table of rope_2d_cos_sin (built on the host once per (head_dim, theta, device))."""
    return _rope_table(head_dim, float(theta), torch.device(device))


@functools.lru_cache(maxsize=64)
def _rope_table(head_dim, theta, device):
    return torch.tensor(_rope_turns(head_dim, theta), dtype=torch.int64, device=device)


@triton.jit
def rope_2d_cos_sin(pos_ptr, tok, tok_mask, stride_pt, stride_pc, pair, table_ptr, HEAD_DIM: tl.constexpr):
    """fp32 cos/sin [len(tok), len(pair)] of the rotation of pairs (i, i + D/2), i in ``pair``, at the tokens'
    (row, col) positions (int32 pos [T, 2] with strides): pair i turns by row * f_i for i < D/4, by
    col * f_(i - D/4) after. The angle modulo one turn is exact for every int32 position: the position
    times the 64-bit fixed-point frequency (``rope_table``) wraps modulo 2^64 = one turn. Only the top 32
    bits of that product count (32-bit arithmetic: high word of position x low word, plus position x high
    word), and only the remainder within an eighth of a turn of the nearest quadrant becomes fp32."""
    QUARTER: tl.constexpr = HEAD_DIM // 4
    use_col = pair >= QUARTER
    freq = tl.load(table_ptr + tl.where(use_col, pair - QUARTER, pair), mask=pair < 2 * QUARTER, other=0)
    f_lo = freq.to(tl.uint32)[None, :]
    f_hi = (freq >> 32).to(tl.uint32)[None, :]
    row = tl.load(pos_ptr + tok * stride_pt, mask=tok_mask, other=0)
    col = tl.load(pos_ptr + tok * stride_pt + stride_pc, mask=tok_mask, other=0)
    p = tl.where(use_col[None, :], col[:, None], row[:, None])
    u = p.to(tl.uint32)  # a negative position reads as p + 2^32: take 2^32 * f_lo back off
    turns = u * f_hi + tl.umulhi(u, f_lo) - tl.where(p < 0, f_lo, 0)  # top 32 bits of p * f modulo 2^64
    quadrant = ((turns + (1 << 29)) >> 30) & 3  # nearest quarter turn
    # the remainder within 1/8 turn of it, in units of 2^-32 turn, to radians
    r = (turns - (quadrant << 30)).to(tl.int32).to(tl.float32) * 1.4629180792671596e-09  # 2*pi / 2^32
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666666666666666e-1 + r2 * (8.333333333333333e-3 + r2 * (-1.984126984126984e-4
                                                                                    + r2 * 2.7557319223985893e-6)))
    cos_r = 1.0 + r2 * (-0.5 + r2 * (4.1666666666666664e-2 + r2 * (-1.3888888888888889e-3 + r2 * 2.48015873015873e-5)))
    odd = (quadrant & 1) == 1
    c = tl.where(odd, sin_r, cos_r)
    s = tl.where(odd, cos_r, sin_r)
    return tl.where((quadrant == 1) | (quadrant == 2), -c, c), tl.where(quadrant >= 2, -s, s)


_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@functools.cache
def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (0 for any other device)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def size_class(tokens: int) -> int:
    """log2 of a token count: keys GEMM autotuning (a single image and a training pack tile differently)
    without re-tuning for every pack size."""
    return max(tokens, 1).bit_length()


def autotune_configs(gpu, interpreter):
    """Autotune configs from (kwargs, warps, stages) triples; the interpreter gets ``interpreter`` (kwargs, or a
    list of them where the host picks among configs) alone: it runs one program at a time and would time every
    config, and small blocks give small test shapes several."""
    if interpreting():
        return [triton.Config(kw, num_warps=4, num_stages=1)
                for kw in (interpreter if isinstance(interpreter, list) else [interpreter])]
    return [triton.Config(kwargs, num_warps=w, num_stages=s) for kwargs, w, s in gpu]


@triton.jit
def gelu(z):
    """Exact (erf) GELU."""
    return 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))


@triton.jit
def gelu_grad(z):
    return 0.5 * (1.0 + tl.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)


@triton.jit
def matmul_tile(a_ptr, b_ptr, m0, n0, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """fp32 [BM, BN] tile at rows m0.., columns n0.. of A[M, K] @ B[K, N] (any strides) on tensor cores.

    Rows and columns past M and N wrap around (callers mask what they store), so the loop has no masks
    but the K tail's when K is not a multiple of BK (EVEN_K False)."""
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + ((m0 + tl.arange(0, BM)) % M).to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + ((n0 + tl.arange(0, BN)) % N).to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(rk < K - k * BK)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(rk < K - k * BK)[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    return acc


def even_k(args):
    """``triton.heuristics`` value of EVEN_K for kernels calling matmul_tile."""
    return args["K"] % args["BK"] == 0


@triton.jit
def _halves(x, BM: tl.constexpr, BN: tl.constexpr):
    return tl.split(tl.permute(tl.reshape(x, (BM, 2, BN // 2)), (0, 2, 1)))


@triton.jit
def quarters(x, BM: tl.constexpr, BN: tl.constexpr):
    """The four column quarters of a [BM, BN] tensor: an epilogue done a quarter at a time holds fewer
    temporaries next to a large accumulator (no spills at 128 x 256)."""
    left, right = _halves(x, BM, BN)
    q0, q1 = _halves(left, BM, BN // 2)
    q2, q3 = _halves(right, BM, BN // 2)
    return q0, q1, q2, q3
