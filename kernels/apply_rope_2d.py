"""2D rotary embedding of vision tokens (Qwen2-VL convention), one read and one write of x.

Pair (i, i + D/2) rotates by row * f_i for i < D/4 and by col * f_(i - D/4) after, with
f_j = theta^(-4j/D). A program takes a block of tokens: it reads their positions once, computes
cos/sin of the D/2 angles once (common.rope_2d_cos_sin: exact modulo one turn, from a D/4 table of
frequencies) and applies them to a group of heads. The half vectors are split into two power-of-two
parts (40 = 32 + 8 at D = 80), not padded: no idle lanes at the head dims models use.
"""

import torch
import triton
import triton.language as tl

from .common import rope_2d_cos_sin, rope_table, sm_count
from .registry import Spec, gated, signature

HEAD_DIMS = (16, 64, 72, 80, 96, 128)  # compiled by the gate; any multiple of 4 runs
TILE = 1024  # elements of the [BLOCK_T, WA] tile: 8 per thread with 4 warps (< 100 registers)


def _specs(fn):
    return [
        Spec(f"{name} D={d}", signature(fn, name, pos_ptr="*i32", table_ptr="*i64", sin_sign="fp32"),
             {"HEAD_DIM": d, **_blocks(d)}, {"num_warps": 4}, floor=0.8)
        for name in ("fp16", "bf16", "fp32")
        for d in HEAD_DIMS
    ]


@triton.jit
def _rotate_part(x_tok, y_tok, pos_ptr, tok, tok_ok, stride_pt, stride_pc, stride_xh, stride_yh, h0, h1,
                 table_ptr, sin_sign, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rotate pairs (i, i + D/2) for i in START + [0, WIDTH) of heads h0..h1-1, cos/sin computed once."""
    HALF: tl.constexpr = HEAD_DIM // 2
    i = START + tl.arange(0, WIDTH)
    cos, sin = rope_2d_cos_sin(pos_ptr, tok, tok_ok, stride_pt, stride_pc, i, table_ptr, HEAD_DIM)
    sin = sin * sin_sign
    mask = tok_ok[:, None] & (i < HALF)[None, :]
    x_tok += i[None, :]
    y_tok += i[None, :]
    for h in range(h0, h1):
        x1 = tl.load(x_tok + h * stride_xh, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_tok + h * stride_xh + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_tok + h * stride_yh, (x1 * cos - x2 * sin).to(y_tok.dtype.element_ty), mask=mask)
        tl.store(y_tok + h * stride_yh + HALF, (x2 * cos + x1 * sin).to(y_tok.dtype.element_ty), mask=mask)


@gated(_specs)
@triton.jit
def _rope_2d_kernel(
    x_ptr, y_ptr, pos_ptr, T, H, heads_per_program,
    stride_xt, stride_xh, stride_yt, stride_yh, stride_pt, stride_pc,
    table_ptr, sin_sign,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr,
):
    """The half head dim D/2 in two power-of-two parts, WA + WB (WB = 0: one part): 36 = 32 + 4, 40 = 32 + 8,
    48 = 32 + 16, so head dims 72/80/96 run without idle lanes."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    tok = tok.to(tl.int64)
    x_tok = x_ptr + tok[:, None] * stride_xt
    y_tok = y_ptr + tok[:, None] * stride_yt
    h0 = tl.program_id(1) * heads_per_program
    h1 = tl.minimum(h0 + heads_per_program, H)
    _rotate_part(x_tok, y_tok, pos_ptr, tok, tok_ok, stride_pt, stride_pc, stride_xh, stride_yh, h0, h1,
                 table_ptr, sin_sign, 0, WA, HEAD_DIM)
    if WB:
        _rotate_part(x_tok, y_tok, pos_ptr, tok, tok_ok, stride_pt, stride_pc, stride_xh, stride_yh, h0, h1,
                     table_ptr, sin_sign, WA, WB, HEAD_DIM)


def _blocks(head_dim):
    """BLOCK_T and the parts (WA, WB) of the half head dim: WA its largest power of two, WB the rest
    rounded up to one (masked only when the rest is not a power of two, e.g. D = 88)."""
    half = head_dim // 2
    wa = 1 << (half.bit_length() - 1)
    wb = triton.next_power_of_2(half - wa) if half > wa else 0
    return {"BLOCK_T": max(16, TILE // wa), "WA": wa, "WB": wb}


def _heads_per_program(token_blocks, heads, device):
    """All heads in one program (cos/sin computed once per token) unless that leaves SMs idle."""
    if device.type != "cuda":
        return heads
    programs = 4 * sm_count(device)
    groups = min(heads, triton.cdiv(programs, token_blocks))
    return triton.cdiv(heads, groups)


def forward(x, pos, theta, inverse, heads_per_program=None):
    """y [T, H, D] = x rotated by pos [T, 2] (by the negative angles when ``inverse``).

    x needs a unit last stride; its token and head strides are free (e.g. a slice of a qkv tensor), and
    so are pos's.
    """
    T, H, D = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    blocks = _blocks(D)
    token_blocks = triton.cdiv(T, blocks["BLOCK_T"])
    per = heads_per_program or _heads_per_program(token_blocks, H, x.device)
    _rope_2d_kernel[(token_blocks, triton.cdiv(H, per))](
        x, y, pos, T, H, per,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), pos.stride(0), pos.stride(1),
        rope_table(D, theta, x.device), -1.0 if inverse else 1.0,
        HEAD_DIM=D, **blocks,
    )
    return y
