"""Device functions and helpers shared by the kernels (one home for each)."""
import triton
import triton.language as tl

from fastvl._backend import interpreting

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def autotune_configs(gpu, interpreter):
    """Autotune configs from (kwargs, warps, stages) triples; the interpreter gets ``interpreter`` alone (one
    program at a time, it would time every config, and small blocks give small test shapes several)."""
    if interpreting():
        return [triton.Config(interpreter, num_warps=4, num_stages=1)]
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
