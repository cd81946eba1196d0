"""Varlen attention over packed segments, with 2D RoPE fused into the loads of q and k.

Forward: one program per (q block of a segment, head); online softmax in the log2 domain (the
softmax scale is folded with log2(e), scores go through exp2), fp32 accumulation, the natural-log
log-sum-exp saved for the backward. Backward: a delta = rowsum(dO * O) pass, then one program per
(k block, kv head) accumulating dk/dv over the q blocks of every query head of its GQA group, and
one program per (q block, head) accumulating dq: deterministic, no atomics.

Cost notes behind the layout:
- Head dims 72/80/96/128 are split into two power-of-two tiles (64 + 16, 64 + 16, 64 + 32, 64 + 64)
  whose dots accumulate into one score tile: padding 80 to 128 would spend 60% more tensor-core work
  on every dot. 72 pads its 8-wide remainder to 16 (the smallest dot depth): 11%. Two 64-wide
  tiles at D=128 keep the RoPE epilogue (un-rotating dq/dk) to half a tile of temporaries at a time.
- With RoPE the q/k tiles are built from rotation pairs: tile t holds the pairs (i, i + D/2) for a
  range of i, loaded as two contiguous halves, rotated elementwise and interleaved (the dot does not
  care how the head dim is ordered, only that q and k agree). The rotation then needs no data
  movement between tiles, one cos/sin per pair (not per element), and the backward un-rotates dq and
  dk in registers before storing them. Nothing rotated is ever written to memory.
- The rotation of a k tile is recomputed by every q block that reads it: D/2 cos/sin pairs per key
  row, ~25 fp32 operations each (pi/2 reduction + polynomials, see apply_rope_2d.cos_sin), on the same CUDA cores
  as the softmax, against 4*BLOCK_M*D tensor-core flops per key row. Cheaper than writing and
  re-reading a rotated copy, not free: it is the first thing to look at in a profile with RoPE on.
- Register pressure sets the block sizes (the gate rejects spills): dk/dv keep two fp32 [BLOCK_N, D]
  accumulators live through the whole loop, so k and v enter the dots as shared-memory operands and
  the q blocks of that loop are small.
"""
from dataclasses import replace

import torch
import triton
import triton.language as tl

from fastvl._backend import interpreting

from .common import LOG2E, rope_2d_cos_sin, rope_table
from .registry import Spec, gated, launch_spec, prune_by_arch, signature

HEAD_DIMS = (64, 72, 80, 96, 128)
DELTA_BLOCK = 64  # tokens per program of the delta pass


def _tiles(head_dim):
    """Widths (WA, WB) of the two head-dim tiles; WB = 0 when one tile covers the head dim."""
    rest = head_dim - 64
    return 64, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def _configs(gpu, interpreter):
    """Autotune configs from (block sizes, warps, stages). The interpreter gets ``interpreter`` alone: it
    would time every config, and its small blocks give small test packs several blocks per segment."""
    if interpreting():
        return [triton.Config(interpreter)]
    return [triton.Config(blocks, num_warps=w, num_stages=s) for blocks, w, s in gpu]


# ------------------------------------------------------------------ tile loads and stores
@triton.jit
def _load_tile(ptr, tok, tok_mask, stride_t, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Head dims START + [0, WIDTH) of the tokens' rows (zeros past the head dim or masked rows)."""
    d = START + tl.arange(0, WIDTH)
    return tl.load(ptr + tok[:, None] * stride_t + d[None, :], mask=tok_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, x, tok, tok_mask, stride_t, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    d = START + tl.arange(0, WIDTH)
    tl.store(ptr + tok[:, None] * stride_t + d[None, :], x.to(ptr.dtype.element_ty),
             mask=tok_mask[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _load_qk(ptr, tok, tok_mask, stride_t, pos_ptr, stride_pt, stride_pc, table_ptr,
             START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """A q/k tile in the dot layout, in the input dtype: plain head dims START + [0, WIDTH); with RoPE the
    rotated pairs (i, i + D/2), i in START/2 + [0, WIDTH/2), interleaved (rotation in fp32)."""
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        pair = START // 2 + tl.arange(0, WIDTH // 2)
        mask = tok_mask[:, None] & (pair < HALF)[None, :]
        lo_ptr = ptr + tok[:, None] * stride_t + pair[None, :]
        lo = tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(lo_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        cos, sin = rope_2d_cos_sin(pos_ptr, tok, tok_mask, stride_pt, stride_pc, pair, table_ptr, HEAD_DIM)
        x = tl.join(lo * cos - hi * sin, hi * cos + lo * sin)
        return tl.reshape(x, (tok.shape[0], WIDTH)).to(ptr.dtype.element_ty)
    else:
        return _load_tile(ptr, tok, tok_mask, stride_t, START, WIDTH, HEAD_DIM)


@triton.jit
def _store_qk_grad(ptr, g, tok, tok_mask, stride_t, pos_ptr, stride_pt, stride_pc, table_ptr,
                   START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """Store a dq/dk tile given in the layout of _load_qk; with RoPE rotate it back (by the negative angles)."""
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        pair = START // 2 + tl.arange(0, WIDTH // 2)
        mask = tok_mask[:, None] & (pair < HALF)[None, :]
        lo, hi = tl.split(tl.reshape(g, (tok.shape[0], WIDTH // 2, 2)))
        cos, sin = rope_2d_cos_sin(pos_ptr, tok, tok_mask, stride_pt, stride_pc, pair, table_ptr, HEAD_DIM)
        sin = -sin
        lo_ptr = ptr + tok[:, None] * stride_t + pair[None, :]
        tl.store(lo_ptr, (lo * cos - hi * sin).to(ptr.dtype.element_ty), mask=mask)
        tl.store(lo_ptr + HALF, (hi * cos + lo * sin).to(ptr.dtype.element_ty), mask=mask)
    else:
        _store_tile(ptr, g, tok, tok_mask, stride_t, START, WIDTH, HEAD_DIM)


@triton.jit
def _key_ranges(m0, lq, lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of q rows [m0, m0 + BLOCK_M): [0, full) need no mask, [full, end) do (causal
    diagonal, segment end). Row r sees key c <= r + lk - lq (bottom-right aligned)."""
    if CAUSAL:
        end = tl.minimum(lk, m0 + BLOCK_M + lk - lq)
        full = tl.maximum(tl.minimum(lk, m0 + 1 + lk - lq), 0) // BLOCK_N * BLOCK_N
    else:
        end = lk
        full = lk // BLOCK_N * BLOCK_N
    return full, end


# ------------------------------------------------------------------ forward
@triton.jit
def _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, k_ptr, v_ptr, pos_ptr, rows, lk, causal_shift,
               stride_kt, stride_vt, stride_pt, stride_pc, qk_scale, table_ptr, start, end,
               HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, CAUSAL: tl.constexpr,
               ROPE: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < lk
        k = _load_qk(k_ptr, cols, col_mask, stride_kt, pos_ptr, stride_pt, stride_pc, table_ptr, 0, WA, HEAD_DIM, ROPE)
        s = tl.dot(qa, tl.trans(k))
        if WB > 0:
            k = _load_qk(k_ptr, cols, col_mask, stride_kt, pos_ptr, stride_pt, stride_pc, table_ptr, WA, WB, HEAD_DIM, ROPE)
            s = tl.dot(qb, tl.trans(k), s)
        s = s * qk_scale
        if MASK:
            visible = col_mask[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if MASK:  # rows with no visible key yet: keep exp2 away from (-inf) - (-inf)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, cols, col_mask, stride_vt, 0, WA, HEAD_DIM)
        p = p.to(v.dtype)
        acc_a = tl.dot(p, v, acc_a * alpha[:, None])
        if WB > 0:
            v = _load_tile(v_ptr, cols, col_mask, stride_vt, WA, WB, HEAD_DIM)
            acc_b = tl.dot(p, v, acc_b * alpha[:, None])
        m_i = m_new
    return acc_a, acc_b, m_i, l_i


# Launches the gate compiles: the ViT (packed qkv, non-causal, with and without RoPE) at every head
# dim, and causal GQA for language models: (name, heads, kv_heads, head_dim, causal, rope, packed qkv)
LAUNCHES = [(f"vit D={d}{' rope' if rope else ''}", 16, 16, d, False, rope, True)
            for d in HEAD_DIMS for rope in (True, False)]
LAUNCHES += [("llm D=64 gqa", 14, 2, 64, True, False, False), ("llm D=128 gqa", 16, 2, 128, True, False, False)]


def _launch_ints(heads, kv_heads, dim, rope, packed):
    """The integer arguments (strides, head counts) a launch at this shape passes."""
    q_t = 3 * heads * dim if packed else heads * dim
    kv_t = 3 * heads * dim if packed else kv_heads * dim
    ints = {"heads": heads, "kv_heads": kv_heads, "group": heads // kv_heads,
            "stride_pt": 2 if rope else 0, "stride_pc": 1 if rope else 0}
    for name, stride_t in (("q", q_t), ("k", kv_t), ("v", kv_t), ("o", heads * dim), ("do", heads * dim),
                           ("dq", heads * dim), ("dk", kv_heads * dim), ("dv", kv_heads * dim)):
        ints[f"stride_{name}t"], ints[f"stride_{name}h"] = stride_t, dim
    return ints


def _launch_specs(fn, floor, **types):
    params = {p.name for p in fn.params}
    specs = []
    for name, heads, kv_heads, dim, causal, rope, packed in LAUNCHES:
        ints = {k: v for k, v in _launch_ints(heads, kv_heads, dim, rope, packed).items() if k in params}
        consts = {"HEAD_DIM": dim, "WA": _tiles(dim)[0], "WB": _tiles(dim)[1], "CAUSAL": causal, "ROPE": rope}
        specs.append(launch_spec(f"bf16 {name}", fn, "bf16", consts, ints, types, floor=floor))
    return specs


def _fwd_specs(fn):
    return _launch_specs(fn, 0.25, lse_ptr="*fp32", cu_q_ptr="*i32", cu_k_ptr="*i32", pos_ptr="*i32", qk_scale="fp32",
                         table_ptr="*i64")


@gated(_fwd_specs, tensor_cores="wgmma")
@triton.autotune(
    _configs([({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 2)], {"BLOCK_M": 32, "BLOCK_N": 16}),
    key=["HEAD_DIM", "CAUSAL", "ROPE"],
)
@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, pos_ptr,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
              stride_pt, stride_pc, tokens_q, heads, group, qk_scale, table_ptr,
              HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, CAUSAL: tl.constexpr,
              ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    seg, h = pid_bh // heads, pid_bh % heads
    q_start = tl.load(cu_q_ptr + seg)
    lq = tl.load(cu_q_ptr + seg + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    k_start = tl.load(cu_k_ptr + seg)
    lk = tl.load(cu_k_ptr + seg + 1) - k_start
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < lq
    # 64-bit segment offsets in the base pointers, 32-bit offsets within a segment
    q_start, k_start = q_start.to(tl.int64), k_start.to(tl.int64)
    q_ptr += q_start * stride_qt + h * stride_qh
    o_ptr += q_start * stride_ot + h * stride_oh
    lse_ptr += h * tokens_q + q_start
    k_ptr += k_start * stride_kt + (h // group) * stride_kh
    v_ptr += k_start * stride_vt + (h // group) * stride_vh
    pos_k = pos_ptr + k_start * stride_pt
    pos_ptr += q_start * stride_pt
    qa = _load_qk(q_ptr, rows, row_mask, stride_qt, pos_ptr, stride_pt, stride_pc, table_ptr, 0, WA, HEAD_DIM, ROPE)
    qb = qa
    acc_a = tl.zeros([BLOCK_M, WA], dtype=tl.float32)
    acc_b = acc_a
    if WB > 0:
        qb = _load_qk(q_ptr, rows, row_mask, stride_qt, pos_ptr, stride_pt, stride_pc, table_ptr, WA, WB, HEAD_DIM, ROPE)
        acc_b = tl.zeros([BLOCK_M, WB], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full, end = _key_ranges(m0, lq, lk, CAUSAL, BLOCK_M, BLOCK_N)
    acc_a, acc_b, m_i, l_i = _fwd_tiles(
        acc_a, acc_b, m_i, l_i, qa, qb, k_ptr, v_ptr, pos_k, rows, lk, lk - lq, stride_kt, stride_vt,
        stride_pt, stride_pc, qk_scale, table_ptr, 0, full, HEAD_DIM, WA, WB, CAUSAL, ROPE, False, BLOCK_N)
    acc_a, acc_b, m_i, l_i = _fwd_tiles(
        acc_a, acc_b, m_i, l_i, qa, qb, k_ptr, v_ptr, pos_k, rows, lk, lk - lq, stride_kt, stride_vt,
        stride_pt, stride_pc, qk_scale, table_ptr, full, end, HEAD_DIM, WA, WB, CAUSAL, ROPE, True, BLOCK_N)
    # rows without a visible key: output 0, lse -inf (l_i == 0)
    has_key = l_i > 0
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    _store_tile(o_ptr, acc_a * inv_l[:, None], rows, row_mask, stride_ot, 0, WA, HEAD_DIM)
    if WB > 0:
        _store_tile(o_ptr, acc_b * inv_l[:, None], rows, row_mask, stride_ot, WA, WB, HEAD_DIM)
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) / LOG2E, float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_mask)


# ------------------------------------------------------------------ backward
def _bwd_specs(fn):
    return _launch_specs(fn, 0.10, lse_ptr="*fp32", delta_ptr="*fp32", cu_q_ptr="*i32", cu_k_ptr="*i32",
                         pos_ptr="*i32", qk_scale="fp32", scale="fp32", table_ptr="*i64")


def _delta_specs(fn):
    return [
        Spec(f"{dt} D={d}", signature(fn, dt, delta_ptr="*fp32"),
             {"HEAD_DIM": d, "WA": _tiles(d)[0], "WB": _tiles(d)[1], "BLOCK_T": DELTA_BLOCK}, {"num_warps": 4},
             floor=0.5)
        for dt in ("fp16", "bf16") for d in (72, 128)
    ]


@gated(_delta_specs)
@triton.jit
def _attn_bwd_delta(o_ptr, do_ptr, delta_ptr, stride_ot, stride_oh, stride_dot, stride_doh, tokens,
                    HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32."""
    h = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = tok < tokens
    tok = tok.to(tl.int64)
    o_ptr += h * stride_oh
    do_ptr += h * stride_doh
    o = _load_tile(o_ptr, tok, mask, stride_ot, 0, WA, HEAD_DIM).to(tl.float32)
    do = _load_tile(do_ptr, tok, mask, stride_dot, 0, WA, HEAD_DIM).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if WB > 0:
        o = _load_tile(o_ptr, tok, mask, stride_ot, WA, WB, HEAD_DIM).to(tl.float32)
        do = _load_tile(do_ptr, tok, mask, stride_dot, WA, WB, HEAD_DIM).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(delta_ptr + h * tokens + tok, delta, mask=mask)


@triton.jit
def _dkdv_tiles(dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, q_ptr, do_ptr, lse_ptr, delta_ptr, pos_ptr,
                cols, lq, causal_shift, stride_qt, stride_dot, stride_pt, stride_pc, qk_scale, table_ptr, start, end,
                HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, ROPE: tl.constexpr,
                MASK: tl.constexpr, BLOCK_M: tl.constexpr, PART: tl.constexpr):
    """Accumulate dk/dv (PART 0), dv only (1) or dk only (2) of one k block over q blocks [start, end)
    of one query head. k and v are the second dot operands (shared memory, not registers); the small
    [queries, keys] tiles p and ds are transposed for the dk/dv dots. Padding rows past lq load
    q = dO = 0, lse = delta = 0: they add nothing."""
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < lq
        q = _load_qk(q_ptr, rows, row_mask, stride_qt, pos_ptr, stride_pt, stride_pc, table_ptr, 0, WA, HEAD_DIM, ROPE)
        s = tl.dot(q, tl.trans(ka))
        if WB > 0:
            qb = _load_qk(q_ptr, rows, row_mask, stride_qt, pos_ptr, stride_pt, stride_pc, table_ptr, WA, WB, HEAD_DIM, ROPE)
            s = tl.dot(qb, tl.trans(kb), s)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * LOG2E
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:  # causal diagonal; also drops rows without a visible key (lse = -inf)
            p = tl.where(cols[None, :] <= rows[:, None] + causal_shift, p, 0.0)
        do = _load_tile(do_ptr, rows, row_mask, stride_dot, 0, WA, HEAD_DIM)
        p_t = tl.trans(p.to(do.dtype))
        if PART != 2:
            dv_a = tl.dot(p_t, do, dv_a)
        if PART != 1:
            dp = tl.dot(do, tl.trans(va))
        if WB > 0:
            do = _load_tile(do_ptr, rows, row_mask, stride_dot, WA, WB, HEAD_DIM)
            if PART != 2:
                dv_b = tl.dot(p_t, do, dv_b)
            if PART != 1:
                dp = tl.dot(do, tl.trans(vb), dp)
        if PART != 1:
            delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
            ds_t = tl.trans((p * (dp - delta[:, None])).to(q.dtype))
            dk_a = tl.dot(ds_t, q, dk_a)
            if WB > 0:
                dk_b = tl.dot(ds_t, qb, dk_b)
    return dk_a, dk_b, dv_a, dv_b


# (PART, architectures): sm_90 accumulates dk and dv in one pass; on sm_80, whose mma keeps both dot
# operands in registers, the pair spills with fused RoPE, so dv and dk run as two passes there
DKDV_PARTS = ((0, (90,)), (1, (80,)), (2, (80,)))


def _dkdv_parts(device):
    """The PART values backward() launches on ``device``, in order."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return (1, 2)
    return (0,)


def _dkdv_specs(fn):
    return [replace(spec, name=f"{spec.name} P{part}", constexprs={**spec.constexprs, "PART": part}, archs=archs)
            for spec in _bwd_specs(fn) for part, archs in DKDV_PARTS]


@gated(_dkdv_specs, tensor_cores="wgmma")
@triton.autotune(
    _configs([({"BLOCK_M": 16, "BLOCK_N": 64, "ARCH": 90}, 8, 1), ({"BLOCK_M": 16, "BLOCK_N": 32, "ARCH": 80}, 8, 1)],
             {"BLOCK_M": 16, "BLOCK_N": 32}),
    key=["HEAD_DIM", "CAUSAL", "ROPE", "PART"],
    prune_configs_by={"early_config_prune": prune_by_arch},
)
@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr, pos_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_pt, stride_pc,
                   tokens_q, kv_heads, group, qk_scale, scale, table_ptr,
                   HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, CAUSAL: tl.constexpr,
                   ROPE: tl.constexpr, PART: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ARCH: tl.constexpr = 0):
    """One block of BLOCK_N keys of one kv head; loops over the q blocks of the group's query heads.
    PART: 0 computes dk and dv, 1 dv only, 2 dk only (see backward()). ARCH only tags the config with
    the architecture family it is for (registry.prune_by_arch)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    seg, hk = pid_bh // kv_heads, pid_bh % kv_heads
    k_start = tl.load(cu_k_ptr + seg)
    lk = tl.load(cu_k_ptr + seg + 1) - k_start
    n0 = pid_n * BLOCK_N
    if n0 >= lk:
        return
    q_start = tl.load(cu_q_ptr + seg)
    lq = tl.load(cu_q_ptr + seg + 1) - q_start
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < lk
    q_start, k_start = q_start.to(tl.int64), k_start.to(tl.int64)
    q_ptr += q_start * stride_qt
    do_ptr += q_start * stride_dot
    lse_ptr += q_start
    delta_ptr += q_start
    pos_q = pos_ptr + q_start * stride_pt
    k_ptr += k_start * stride_kt + hk * stride_kh
    v_ptr += k_start * stride_vt + hk * stride_vh
    dk_ptr += k_start * stride_dkt + hk * stride_dkh
    dv_ptr += k_start * stride_dvt + hk * stride_dvh
    pos_ptr += k_start * stride_pt
    ka = _load_qk(k_ptr, cols, col_mask, stride_kt, pos_ptr, stride_pt, stride_pc, table_ptr, 0, WA, HEAD_DIM, ROPE)
    va = _load_tile(v_ptr, cols, col_mask, stride_vt, 0, WA, HEAD_DIM)
    dk_a = tl.zeros([BLOCK_N, WA], dtype=tl.float32)
    dv_a = dk_a
    kb, vb, dk_b, dv_b = ka, va, dk_a, dv_a
    if WB > 0:
        kb = _load_qk(k_ptr, cols, col_mask, stride_kt, pos_ptr, stride_pt, stride_pc, table_ptr, WA, WB, HEAD_DIM, ROPE)
        vb = _load_tile(v_ptr, cols, col_mask, stride_vt, WA, WB, HEAD_DIM)
        dk_b = tl.zeros([BLOCK_N, WB], dtype=tl.float32)
        dv_b = dk_b
    shift = lk - lq
    # q rows that see some key of this block start at n0 - shift; from `full` on they see all of it
    start, full = 0, 0
    if CAUSAL:
        start = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        full = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, start)
    for g in range(group):
        h = hk * group + g
        head = (q_ptr + h * stride_qh, do_ptr + h * stride_doh, lse_ptr + h * tokens_q, delta_ptr + h * tokens_q)
        dk_a, dk_b, dv_a, dv_b = _dkdv_tiles(
            dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, *head, pos_q, cols, lq, shift, stride_qt, stride_dot,
            stride_pt, stride_pc, qk_scale, table_ptr, start, tl.minimum(full, lq), HEAD_DIM, WA, WB, ROPE, True, BLOCK_M,
            PART)
        dk_a, dk_b, dv_a, dv_b = _dkdv_tiles(
            dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, *head, pos_q, cols, lq, shift, stride_qt, stride_dot,
            stride_pt, stride_pc, qk_scale, table_ptr, full, lq, HEAD_DIM, WA, WB, ROPE, False, BLOCK_M, PART)
    if PART != 1:
        _store_qk_grad(dk_ptr, dk_a * scale, cols, col_mask, stride_dkt, pos_ptr, stride_pt, stride_pc, table_ptr,
                       0, WA, HEAD_DIM, ROPE)
        if WB > 0:
            _store_qk_grad(dk_ptr, dk_b * scale, cols, col_mask, stride_dkt, pos_ptr, stride_pt, stride_pc,
                           table_ptr, WA, WB, HEAD_DIM, ROPE)
    if PART != 2:
        _store_tile(dv_ptr, dv_a, cols, col_mask, stride_dvt, 0, WA, HEAD_DIM)
        if WB > 0:
            _store_tile(dv_ptr, dv_b, cols, col_mask, stride_dvt, WA, WB, HEAD_DIM)


@triton.jit
def _dq_tiles(dq_a, dq_b, qa, qb, do_a, do_b, lse, delta, k_ptr, v_ptr, pos_ptr, rows, lk, causal_shift,
              stride_kt, stride_vt, stride_pt, stride_pc, qk_scale, table_ptr, start, end,
              HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, CAUSAL: tl.constexpr,
              ROPE: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < lk
        ka = _load_qk(k_ptr, cols, col_mask, stride_kt, pos_ptr, stride_pt, stride_pc, table_ptr, 0, WA, HEAD_DIM, ROPE)
        v = _load_tile(v_ptr, cols, col_mask, stride_vt, 0, WA, HEAD_DIM)
        s = tl.dot(qa, tl.trans(ka))
        dp = tl.dot(do_a, tl.trans(v))
        kb = ka
        if WB > 0:
            kb = _load_qk(k_ptr, cols, col_mask, stride_kt, pos_ptr, stride_pt, stride_pc, table_ptr, WA, WB, HEAD_DIM, ROPE)
            v = _load_tile(v_ptr, cols, col_mask, stride_vt, WA, WB, HEAD_DIM)
            s = tl.dot(qb, tl.trans(kb), s)
            dp = tl.dot(do_b, tl.trans(v), dp)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:  # keys past the segment, causal diagonal; rows without a visible key (lse = -inf) get 0
            visible = col_mask[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_shift)
            p = tl.where(visible, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(ka.dtype)
        dq_a = tl.dot(ds, ka, dq_a)
        if WB > 0:
            dq_b = tl.dot(ds, kb, dq_b)
    return dq_a, dq_b


@gated(_bwd_specs, tensor_cores="wgmma")
@triton.autotune(
    _configs([({"BLOCK_M": 64, "BLOCK_N": 16}, 8, 1)], {"BLOCK_M": 32, "BLOCK_N": 16}),
    key=["HEAD_DIM", "CAUSAL", "ROPE"],
)
@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr, pos_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dqt, stride_dqh, stride_pt, stride_pc, tokens_q, heads, group, qk_scale, scale, table_ptr,
                 HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, CAUSAL: tl.constexpr,
                 ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of BLOCK_M queries of one head; loops over the key blocks it sees."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    seg, h = pid_bh // heads, pid_bh % heads
    q_start = tl.load(cu_q_ptr + seg)
    lq = tl.load(cu_q_ptr + seg + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    k_start = tl.load(cu_k_ptr + seg)
    lk = tl.load(cu_k_ptr + seg + 1) - k_start
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < lq
    q_start, k_start = q_start.to(tl.int64), k_start.to(tl.int64)
    q_ptr += q_start * stride_qt + h * stride_qh
    do_ptr += q_start * stride_dot + h * stride_doh
    dq_ptr += q_start * stride_dqt + h * stride_dqh
    k_ptr += k_start * stride_kt + (h // group) * stride_kh
    v_ptr += k_start * stride_vt + (h // group) * stride_vh
    pos_k = pos_ptr + k_start * stride_pt
    pos_ptr += q_start * stride_pt
    qa = _load_qk(q_ptr, rows, row_mask, stride_qt, pos_ptr, stride_pt, stride_pc, table_ptr, 0, WA, HEAD_DIM, ROPE)
    do_a = _load_tile(do_ptr, rows, row_mask, stride_dot, 0, WA, HEAD_DIM)
    dq_a = tl.zeros([BLOCK_M, WA], dtype=tl.float32)
    qb, do_b, dq_b = qa, do_a, dq_a
    if WB > 0:
        qb = _load_qk(q_ptr, rows, row_mask, stride_qt, pos_ptr, stride_pt, stride_pc, table_ptr, WA, WB, HEAD_DIM, ROPE)
        do_b = _load_tile(do_ptr, rows, row_mask, stride_dot, WA, WB, HEAD_DIM)
        dq_b = tl.zeros([BLOCK_M, WB], dtype=tl.float32)
    lse = tl.load(lse_ptr + h * tokens_q + q_start + rows, mask=row_mask, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + h * tokens_q + q_start + rows, mask=row_mask, other=0.0)
    full, end = _key_ranges(m0, lq, lk, CAUSAL, BLOCK_M, BLOCK_N)
    dq_a, dq_b = _dq_tiles(dq_a, dq_b, qa, qb, do_a, do_b, lse, delta, k_ptr, v_ptr, pos_k, rows, lk, lk - lq,
                           stride_kt, stride_vt, stride_pt, stride_pc, qk_scale, table_ptr, 0, full,
                           HEAD_DIM, WA, WB, CAUSAL, ROPE, False, BLOCK_N)
    dq_a, dq_b = _dq_tiles(dq_a, dq_b, qa, qb, do_a, do_b, lse, delta, k_ptr, v_ptr, pos_k, rows, lk, lk - lq,
                           stride_kt, stride_vt, stride_pt, stride_pc, qk_scale, table_ptr, full, end,
                           HEAD_DIM, WA, WB, CAUSAL, ROPE, True, BLOCK_N)
    _store_qk_grad(dq_ptr, dq_a * scale, rows, row_mask, stride_dqt, pos_ptr, stride_pt, stride_pc, table_ptr,
                   0, WA, HEAD_DIM, ROPE)
    if WB > 0:
        _store_qk_grad(dq_ptr, dq_b * scale, rows, row_mask, stride_dqt, pos_ptr, stride_pt, stride_pc, table_ptr,
                       WA, WB, HEAD_DIM, ROPE)


# ------------------------------------------------------------------ host side
def _common(q, cu_q, rope_pos, theta):
    """Launch arguments shared by the kernels: constexprs, rope pointer/strides, frequency table."""
    dim = q.shape[2]
    wa, wb = _tiles(dim)
    consts = {"HEAD_DIM": dim, "WA": wa, "WB": wb, "ROPE": rope_pos is not None}
    # without rope the position pointer is never read; any int32 tensor stands in
    pos, pos_strides = (rope_pos, rope_pos.stride()) if rope_pos is not None else (cu_q, (0, 0))
    table = rope_table(dim, theta, q.device) if rope_pos is not None else cu_q
    return consts, pos, pos_strides, table


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta):
    """(out [Tq, H, D] in q's dtype, lse [H, Tq] fp32 natural log; -inf for rows without a visible key)."""
    tq, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, tq, dtype=torch.float32, device=q.device)
    batch = cu_q.numel() - 1
    if tq == 0 or batch == 0 or max_q == 0:
        return out, lse
    consts, pos, pos_strides, table = _common(q, cu_q, rope_pos, theta)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, out, lse, cu_q, cu_k, pos, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        *pos_strides, tq, heads, heads // k.shape[1], scale * LOG2E.value, table, CAUSAL=causal, **consts,
    )
    return out, lse


def backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v; dk/dv summed over each GQA group."""
    tq, heads, dim = q.shape
    kv_heads = k.shape[1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    batch = cu_q.numel() - 1
    if batch == 0 or (max_q == 0 and max_k == 0):
        return dq, dk, dv
    consts, pos, pos_strides, table = _common(q, cu_q, rope_pos, theta)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    delta = torch.empty(heads, tq, dtype=torch.float32, device=q.device)
    if tq:
        _attn_bwd_delta[(triton.cdiv(tq, DELTA_BLOCK), heads)](
            out, grad_out, delta, *out.stride()[:2], *grad_out.stride()[:2], tq,
            HEAD_DIM=dim, WA=consts["WA"], WB=consts["WB"], BLOCK_T=DELTA_BLOCK,
        )
    common = (*pos_strides, tq)
    if max_k:
        grid = lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), batch * kv_heads)  # noqa: E731
        for part in _dkdv_parts(q.device):
            _attn_bwd_dkdv[grid](
                q, k, v, grad_out, lse, delta, dk, dv, cu_q, cu_k, pos, *q.stride()[:2], *k.stride()[:2],
                *v.stride()[:2], *grad_out.stride()[:2], *dk.stride()[:2], *dv.stride()[:2], *common, kv_heads,
                heads // kv_heads, scale * LOG2E.value, scale, table, CAUSAL=causal, PART=part, **consts,
            )
    if max_q:
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _attn_bwd_dq[grid](
            q, k, v, grad_out, lse, delta, dq, cu_q, cu_k, pos, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
            *grad_out.stride()[:2], *dq.stride()[:2], *common, heads, heads // kv_heads, scale * LOG2E.value, scale,
            table, CAUSAL=causal, **consts,
        )
    return dq, dk, dv
