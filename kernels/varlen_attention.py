"""Varlen attention over packed segments; 2D RoPE applied once per call.

- RoPE: one pass (``_attn_rope``) computes each token's cos/sin once and rotates every head of q and k,
  writing the rotated rows with the head dim in pair order (i, i + D/2 interleaved; the dots only need q
  and k to agree). The attention kernels then load plain tiles; autograd keeps the rotated copies in
  place of q and k, and the backward rotates dq and dk back as it stores them (each row once).
- Work list (``_attn_work``): programs take (segment, block) items, longest segments first, from a list
  built on the device (no host sync); its capacity cdiv(T, BLOCK) + B leaves at most B + 1 programs idle.
  Blocks are 128 rows, or 64 when no segment is longer (Qwen2.5-VL windows of 64 patches).
- Forward: one program per (q block, head); online softmax in the log2 domain (the softmax scale folded
  with log2(e), scores through exp2), fp32 accumulation, the natural-log log-sum-exp saved.
- Backward: delta = rowsum(dO * O); one program per (k block, kv head) accumulates dk/dv over the q
  blocks of every query head of its GQA group with the keys as the M dimension of every dot (S^T = K Q^T,
  dV += P^T dO, dP^T = V dO^T, dK += dS^T Q: on sm_90 each a wgmma with M = 64 per warpgroup, B from
  shared memory, no transposed register tile); then one program per (q block, head) accumulates dq.
  Deterministic by default; ``deterministic=False`` lets the dk/dv programs add dS K into an fp32 dq with
  atomics instead, and the dq pass only converts it.
- Head dims 72/80/96 are split into two power-of-two tiles (64 + 16/16/32) whose dots accumulate into one
  score tile (padding 80 to 128 would add 60% tensor work); 64 and 128 are one tile.
"""
from dataclasses import replace

import torch
import triton
import triton.language as tl

from fastvl._backend import interpreting

from .common import LOG2E, autotune_configs, rope_2d_cos_sin, rope_table
from .registry import Spec, gated, launch_spec, prune_by_arch, signature

HEAD_DIMS = (64, 72, 80, 96, 128)
SAVES_ROTATED = True  # forward() returns the rotated q and k, which backward() takes in their place
DELTA_BLOCK = 64  # tokens per program of the delta pass
ROPE_TILE = 1024  # elements of one [tokens, pairs] tile of the RoPE pass: 8 per thread with 4 warps
WORK_CHUNK = 1024  # segments per step of the work-list scan
HAS_TMA = hasattr(tl, "make_tensor_descriptor")  # tensor descriptors (TMA on sm_90)


def _tiles(head_dim):
    """Widths (WA, WB) of the head-dim tiles; WB = 0 when one tile covers the head dim."""
    if head_dim in (64, 128):
        return head_dim, 0
    return 64, max(16, triton.next_power_of_2(head_dim - 64))


def block_size(max_len):
    """Rows of a q block (forward, dq) and keys of a k block (dk/dv): 64 when no segment is longer, so
    short segments do not fill 128-row tiles with padding, else 128 (in the interpreter 16 and 32: small
    test packs then get several blocks per segment)."""
    short, long = (16, 32) if interpreting() else (64, 128)
    return short if max_len <= short else long


def dkdv_block(block, head_dim):
    """Keys per dk/dv program: at head dim 128, 128 keys spill (two [128, 128] fp32 accumulators)."""
    return min(block, 64) if head_dim == 128 else block


def _len_bucket(max_len):
    """Autotune key: the longest segment, rounded up to a power of two between 64 and 4096."""
    return min(max(triton.next_power_of_2(max(max_len, 1)), 64), 4096)


def _prune(block_name):
    """``early_config_prune``: the configs of the device's ARCH family whose ``block_name`` is the block
    the host chose (passed as the ``block`` argument) for its work list."""
    def prune(configs, named_args, **kwargs):
        return [c for c in prune_by_arch(configs, named_args) if c.kwargs[block_name] == named_args["block"]]
    return prune


# ------------------------------------------------------------------ gate specs
# Launches the gate compiles (fastvl gate --perf): the ViT (packed qkv, non-causal) at every head dim and
# causal GQA for language models, in 128-row blocks; Qwen2.5-VL windows of 64 patches in 64-row blocks:
# (name, heads, kv_heads, head_dim, causal, packed qkv, block)
LAUNCHES = [(f"vit D={d}", 16, 16, d, False, True, 128) for d in HEAD_DIMS]
LAUNCHES += [("llm D=128 gqa", 16, 2, 128, True, False, 128), ("vit D=80 windows", 16, 16, 80, False, True, 64)]
ROPE_DIMS = (72, 80, 128)  # RoPE only changes how dq/dk are stored: one per head-dim tiling
BWD_FLOOR = {90: 0.6, 80: 0.45}  # sm_80's mma.sync reads both operands through ldmatrix: more smem traffic
_TYPES = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "dqacc_ptr": "*fp32", "cu_q_ptr": "*i32", "cu_k_ptr": "*i32",
          "work_ptr": "*i32", "pos_ptr": "*i32", "table_ptr": "*i64", "qk_scale": "fp32", "scale": "fp32"}


def _launch_ints(heads, kv_heads, dim, packed, block):
    """The integer arguments (strides, head counts, config keys) a launch at this shape passes."""
    q_t = 3 * heads * dim if packed else heads * dim
    kv_t = 3 * heads * dim if packed else kv_heads * dim
    ints = {"heads": heads, "kv_heads": kv_heads, "group": heads // kv_heads, "stride_pt": 2, "stride_pc": 1,
            "block": block, "len_bucket": 4096 if block == 128 else 64}
    for name, stride_t in (("q", q_t), ("k", kv_t), ("v", kv_t), ("o", heads * dim), ("do", heads * dim),
                           ("dq", heads * dim), ("dk", kv_heads * dim), ("dv", kv_heads * dim)):
        ints[f"stride_{name}t"], ints[f"stride_{name}h"] = stride_t, dim
    return ints


def _specs(fn, block_name, floor, short_floor, rope=False, launches=LAUNCHES, block_of=lambda block, dim: block,
           **consts):
    """Specs of ``launches`` (bf16; fp16 too at D=80), each pinned to the configs of its block
    (``block_of``; 128-row launches: ``floor``, 64-row: ``short_floor``); ``rope``: also storing dq/dk
    through RoPE at ROPE_DIMS."""
    params = [p.name for p in fn.params]
    types = {k: v for k, v in _TYPES.items() if k in params}
    specs = []
    for name, heads, kv_heads, dim, causal, packed, block in launches:
        ints = _launch_ints(heads, kv_heads, dim, packed, block)
        ints = {k: v for k, v in {**ints, "block": block_of(block, dim)}.items() if k in params}
        base = {"HEAD_DIM": dim, "WA": _tiles(dim)[0], "WB": _tiles(dim)[1], "CAUSAL": causal,
                block_name: block_of(block, dim), **consts}
        variants = [("bf16", False)] + [("fp16", False)] * (name == "vit D=80")
        variants += [("bf16", True)] * (rope and not causal and block == 128 and dim in ROPE_DIMS)
        for dt, with_rope in variants:
            cx = {k: v for k, v in {**base, "ROPE": with_rope}.items() if k in params}
            specs.append(launch_spec(f"{dt} {name}{' rope' if with_rope else ''}", fn, dt, cx, ints, types,
                                     floor=floor if block == 128 else short_floor))
    return specs


# ------------------------------------------------------------------ tiles
@triton.jit
def _head(h, stride_h):
    """Offset of head h, a multiple of 8 elements (16 bytes) as the host guarantees (``_aligned``): row loads
    then vectorise even where the head stride is no multiple of 16 (head dim 72)."""
    return tl.multiple_of(h * stride_h, 8)


@triton.jit
def _load_tile(ptr, tok, tok_mask, stride_t, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Head dims START + [0, WIDTH) of the tokens' rows (zeros past the head dim or masked rows)."""
    d = START + tl.arange(0, WIDTH)
    return tl.load(ptr + tok[:, None] * stride_t + d[None, :], mask=tok_mask[:, None] & (d < HEAD_DIM)[None, :],
                   other=0.0)


@triton.jit
def _store_tile(ptr, x, tok, tok_mask, stride_t, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    d = START + tl.arange(0, WIDTH)
    tl.store(ptr + tok[:, None] * stride_t + d[None, :], x.to(ptr.dtype.element_ty),
             mask=tok_mask[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _segment_source(ptr, length, stride_t, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK: tl.constexpr, TMA: tl.constexpr):
    """What _segment_tile reads tiles of a segment's rows (head dims START + [0, WIDTH)) from: with TMA a
    tensor descriptor of the segment ([length, HEAD_DIM]: rows past it and columns past the head dim read
    zero), else the pointer."""
    if TMA:
        return tl.make_tensor_descriptor(ptr, [length, HEAD_DIM], [stride_t, 1], [BLOCK, WIDTH])
    else:
        return ptr


@triton.jit
def _segment_tile(src, n0, length, stride_t, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK: tl.constexpr, TMA: tl.constexpr):
    """Rows [n0, n0 + BLOCK) of a tile from _segment_source: one TMA load, or masked pointer loads."""
    if TMA:
        return src.load([n0, START])
    else:
        rows = n0 + tl.arange(0, BLOCK)
        return _load_tile(src, rows, rows < length, stride_t, START, WIDTH, HEAD_DIM)


@triton.jit
def _atomic_add_tile(ptr, x, tok, tok_mask, stride_t, START: tl.constexpr, WIDTH: tl.constexpr,
                     HEAD_DIM: tl.constexpr):
    d = START + tl.arange(0, WIDTH)
    tl.atomic_add(ptr + tok[:, None] * stride_t + d[None, :], x, mask=tok_mask[:, None] & (d < HEAD_DIM)[None, :],
                  sem="relaxed")


@triton.jit
def _store_qk_grad(ptr, g, tok, tok_mask, stride_t, pos_ptr, stride_pt, stride_pc, table_ptr,
                   START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """Store a dq/dk tile (fp32, head dims START + [0, WIDTH) of the layout q and k were rotated to); with
    RoPE its columns are the pairs START/2 + [0, WIDTH/2) interleaved: rotate them back and store each
    pair (i, i + D/2) in place."""
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        pair = START // 2 + tl.arange(0, WIDTH // 2)
        lo, hi = tl.split(tl.reshape(g, (tok.shape[0], WIDTH // 2, 2)))
        cos, sin = rope_2d_cos_sin(pos_ptr, tok, tok_mask, stride_pt, stride_pc, pair, table_ptr, HEAD_DIM)
        mask = tok_mask[:, None] & (pair < HALF)[None, :]
        lo_ptr = ptr + tok[:, None] * stride_t + pair[None, :]
        tl.store(lo_ptr, (lo * cos + hi * sin).to(ptr.dtype.element_ty), mask=mask)
        tl.store(lo_ptr + HALF, (hi * cos - lo * sin).to(ptr.dtype.element_ty), mask=mask)
    else:
        _store_tile(ptr, g, tok, tok_mask, stride_t, START, WIDTH, HEAD_DIM)


# ------------------------------------------------------------------ RoPE pass and work list
def _rope_specs(fn):
    return [launch_spec(f"bf16 vit D={d}", fn, "bf16", {"HEAD_DIM": d, **_rope_blocks(d)},
                        {k: v for k, v in _launch_ints(16, 16, d, True, 128).items() if k in fn.arg_names},
                        {"pos_ptr": "*i32", "table_ptr": "*i64"}, options={"num_warps": 4}, floor=0.6)
            for d in ROPE_DIMS]


def _rope_blocks(head_dim):
    block_half = triton.next_power_of_2(head_dim // 2)
    return {"BLOCK_T": max(16, ROPE_TILE // block_half), "BLOCK_HALF": block_half}


@gated(_rope_specs)
@triton.jit
def _attn_rope(q_ptr, k_ptr, qr_ptr, kr_ptr, pos_ptr, table_ptr, tokens, heads, kv_heads,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_pt, stride_pc,
               HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """q and k rotated into contiguous qr [T, H, D] / kr [T, Hk, D], pairs interleaved; a program per
    token block, its cos/sin computed once for every head of both."""
    HALF: tl.constexpr = HEAD_DIM // 2
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < tokens
    tok = tok.to(tl.int64)
    pair = tl.arange(0, BLOCK_HALF)
    cos, sin = rope_2d_cos_sin(pos_ptr, tok, tok_mask, stride_pt, stride_pc, pair, table_ptr, HEAD_DIM)
    mask = tok_mask[:, None] & (pair < HALF)[None, :]
    col = tl.arange(0, 2 * BLOCK_HALF)
    out_mask = tok_mask[:, None] & (col < HEAD_DIM)[None, :]
    for h in range(heads + kv_heads):
        if h < heads:
            src = q_ptr + tok[:, None] * stride_qt + _head(h, stride_qh) + pair[None, :]
            dst = qr_ptr + (tok[:, None] * heads + h) * HEAD_DIM + col[None, :]
        else:
            src = k_ptr + tok[:, None] * stride_kt + _head(h - heads, stride_kh) + pair[None, :]
            dst = kr_ptr + (tok[:, None] * kv_heads + h - heads) * HEAD_DIM + col[None, :]
        lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        y = tl.reshape(tl.join(lo * cos - hi * sin, hi * cos + lo * sin), (BLOCK_T, 2 * BLOCK_HALF))
        tl.store(dst, y.to(qr_ptr.dtype.element_ty), mask=out_mask)


@gated(lambda fn: [Spec(f"BLOCK=128 REVERSE={r}", signature(fn, "i32"), {"BLOCK": 128, "CHUNK": WORK_CHUNK,
                                                                          "REVERSE": r}, {"num_warps": 4}, floor=0.01)
                   for r in (False, True)])
@triton.jit
def _attn_work(cu_ptr, work_ptr, batch, capacity, BLOCK: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Program i writes the (segment, block) items of segment i at its place in the list: segments by
    length, longest first (ties by index); REVERSE lists a segment's blocks last first (causal forward:
    the blocks that see the most keys first). Program 0 marks the unused tail with segment -1."""
    i = tl.program_id(0)
    start = tl.load(cu_ptr + i)
    length = tl.load(cu_ptr + i + 1) - start
    blocks = tl.cdiv(length, BLOCK)
    offset = 0
    total = 0
    for j0 in range(0, batch, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        m = j < batch
        other = tl.load(cu_ptr + j + 1, mask=m, other=0) - tl.load(cu_ptr + j, mask=m, other=0)
        n = tl.cdiv(other, BLOCK)
        offset += tl.sum(tl.where((other > length) | ((other == length) & (j < i)), n, 0))
        total += tl.sum(n)
    for b0 in range(0, blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        block = blocks - 1 - b if REVERSE else b
        at = work_ptr + 2 * (offset + b)
        tl.store(at, tl.full([CHUNK], 0, tl.int32) + i, mask=b < blocks)
        tl.store(at + 1, block, mask=b < blocks)
    if i == 0:
        for t0 in range(total, capacity, CHUNK):
            t = t0 + tl.arange(0, CHUNK)
            tl.store(work_ptr + 2 * t, tl.full([CHUNK], -1, tl.int32), mask=t < capacity)


@triton.jit
def _work_item(work_ptr, item, cu_ptr, cu_other_ptr):
    """(segment, block, start, length, other start, other length) of a work item: the block of ``cu_ptr``'s
    segment and the same segment of ``cu_other_ptr``; segment -1: no work."""
    seg = tl.load(work_ptr + 2 * item)
    block = tl.load(work_ptr + 2 * item + 1)
    safe = tl.maximum(seg, 0)
    start = tl.load(cu_ptr + safe)
    other = tl.load(cu_other_ptr + safe)
    return seg, block, start, tl.load(cu_ptr + safe + 1) - start, other, tl.load(cu_other_ptr + safe + 1) - other


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
def _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, ka_src, kb_src, va_src, vb_src, rows, lk, causal_shift, stride_kt,
               stride_vt, qk_scale, start, end, HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _segment_tile(ka_src, n0, lk, stride_kt, 0, WA, HEAD_DIM, BLOCK_N, TMA)
        s = tl.dot(qa, tl.trans(k))
        if WB > 0:
            k = _segment_tile(kb_src, n0, lk, stride_kt, WA, WB, HEAD_DIM, BLOCK_N, TMA)
            s = tl.dot(qb, tl.trans(k), s)
        if MASK:
            visible = (cols < lk)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0
        m_use = m_new
        if MASK:  # rows with no visible key yet: keep exp2 away from (-inf) - (-inf)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _segment_tile(va_src, n0, lk, stride_vt, 0, WA, HEAD_DIM, BLOCK_N, TMA)
        p = p.to(v.dtype)
        acc_a = tl.dot(p, v, acc_a * alpha[:, None])
        if WB > 0:
            v = _segment_tile(vb_src, n0, lk, stride_vt, WA, WB, HEAD_DIM, BLOCK_N, TMA)
            acc_b = tl.dot(p, v, acc_b * alpha[:, None])
        m_i = m_new
    return acc_a, acc_b, m_i, l_i


@gated(lambda fn: _specs(fn, "BLOCK_M", {90: 0.75, 80: 0.6}, {90: 0.7, 80: 0.6}), tensor_cores="wgmma")
@triton.autotune(
    # (ARCH, BLOCK_M, BLOCK_N, stages); BLOCK_M is the host's block, 16 rows per warp
    autotune_configs([({"BLOCK_M": bm, "BLOCK_N": bn, "ARCH": arch, "TMA": arch == 90 and HAS_TMA}, bm // 16, st)
                      for arch, bm, bn, st in ((90, 128, 128, 2), (90, 128, 64, 3), (90, 64, 64, 2), (80, 128, 32, 2),
                                               (80, 64, 32, 2))],
                     [{"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 32, "BLOCK_N": 16, "TMA": HAS_TMA}]),
    key=["HEAD_DIM", "CAUSAL", "block", "len_bucket"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_M")},
)
@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, work_ptr,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
              tokens_q, heads, group, qk_scale, block, len_bucket,
              HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ARCH: tl.constexpr = 0, TMA: tl.constexpr = False):
    """One program per (work item, head). ``block`` (= BLOCK_M) and ``len_bucket`` only select configs;
    TMA: K/V tiles through tensor descriptors.
    Head dim 128 takes 64-key tiles (128 spill: two 128x128 fp32 tiles and the q tile in registers)."""
    BN: tl.constexpr = BLOCK_N if HEAD_DIM < 128 else 64
    pid = tl.program_id(0)
    item, h = pid // heads, pid % heads
    seg, mb, q_start, lq, k_start, lk = _work_item(work_ptr, item, cu_q_ptr, cu_k_ptr)
    if seg < 0:
        return
    m0 = mb * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < lq
    # 64-bit segment offsets in the base pointers, 32-bit offsets within a segment
    q_start, k_start = q_start.to(tl.int64), k_start.to(tl.int64)
    q_ptr += q_start * stride_qt + _head(h, stride_qh)
    o_ptr += q_start * stride_ot + _head(h, stride_oh)
    lse_ptr += h * tokens_q + q_start
    k_ptr += k_start * stride_kt + _head(h // group, stride_kh)
    v_ptr += k_start * stride_vt + _head(h // group, stride_vh)
    qa = _load_tile(q_ptr, rows, row_mask, stride_qt, 0, WA, HEAD_DIM)
    qb = qa
    acc_a = tl.zeros([BLOCK_M, WA], dtype=tl.float32)
    acc_b = acc_a
    if WB > 0:
        qb = _load_tile(q_ptr, rows, row_mask, stride_qt, WA, WB, HEAD_DIM)
        acc_b = tl.zeros([BLOCK_M, WB], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    ka = _segment_source(k_ptr, lk, stride_kt, 0, WA, HEAD_DIM, BN, TMA)
    va = _segment_source(v_ptr, lk, stride_vt, 0, WA, HEAD_DIM, BN, TMA)
    kb, vb = ka, va
    if WB > 0:
        kb = _segment_source(k_ptr, lk, stride_kt, WA, WB, HEAD_DIM, BN, TMA)
        vb = _segment_source(v_ptr, lk, stride_vt, WA, WB, HEAD_DIM, BN, TMA)
    full, end = _key_ranges(m0, lq, lk, CAUSAL, BLOCK_M, BN)
    acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, ka, kb, va, vb, rows, lk, lk - lq, stride_kt,
                                        stride_vt, qk_scale, 0, full, HEAD_DIM, WA, WB, CAUSAL, False, BN, TMA)
    acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, ka, kb, va, vb, rows, lk, lk - lq, stride_kt,
                                        stride_vt, qk_scale, full, end, HEAD_DIM, WA, WB, CAUSAL, True, BN, TMA)
    # rows without a visible key: output 0, lse -inf (l_i == 0)
    has_key = l_i > 0
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    _store_tile(o_ptr, acc_a * inv_l[:, None], rows, row_mask, stride_ot, 0, WA, HEAD_DIM)
    if WB > 0:
        _store_tile(o_ptr, acc_b * inv_l[:, None], rows, row_mask, stride_ot, WA, WB, HEAD_DIM)
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) / LOG2E, float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_mask)


# ------------------------------------------------------------------ backward
def _delta_specs(fn):
    return [Spec(f"bf16 D={d}", signature(fn, "bf16", delta_ptr="*fp32"),
                 {"HEAD_DIM": d, "WA": _tiles(d)[0], "WB": _tiles(d)[1], "BLOCK_T": DELTA_BLOCK}, {"num_warps": 4},
                 floor=0.5) for d in (80, 128)]


@gated(_delta_specs)
@triton.jit
def _attn_bwd_delta(o_ptr, do_ptr, delta_ptr, stride_ot, stride_oh, stride_dot, stride_doh, tokens,
                    HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32."""
    h = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = tok < tokens
    tok = tok.to(tl.int64)
    o_ptr += _head(h, stride_oh)
    do_ptr += _head(h, stride_doh)
    o = _load_tile(o_ptr, tok, mask, stride_ot, 0, WA, HEAD_DIM).to(tl.float32)
    do = _load_tile(do_ptr, tok, mask, stride_dot, 0, WA, HEAD_DIM).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if WB > 0:
        o = _load_tile(o_ptr, tok, mask, stride_ot, WA, WB, HEAD_DIM).to(tl.float32)
        do = _load_tile(do_ptr, tok, mask, stride_dot, WA, WB, HEAD_DIM).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(delta_ptr + h * tokens + tok, delta, mask=mask)


@triton.jit
def _dkdv_tiles(dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, qa_src, qb_src, doa_src, dob_src, lse_ptr, delta_ptr, dq_a,
                dq_b, keys, lq, causal_shift, stride_qt, stride_dot, stride_dq, qk_scale, scale, start, end,
                HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, MASK: tl.constexpr,
                ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr, TMA_REDUCE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dk/dv of one k block over q blocks [start, end) of one query head (q and dO tiles from
    _segment_source), keys as the M dimension. Padding rows past lq read q = dO = 0, lse = delta = 0: they
    add nothing. ATOMIC_DQ: also add dS K * scale into the fp32 dq (tensor descriptors ``dq_a``/``dq_b``
    with TMA_REDUCE, else through the pointer ``dq_a``)."""
    # at head dim 128 the accumulators fill the registers: no loads in flight across iterations there
    for m0 in tl.range(start, end, BLOCK_M, num_stages=1 if HEAD_DIM == 128 else None):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < lq
        qa = _segment_tile(qa_src, m0, lq, stride_qt, 0, WA, HEAD_DIM, BLOCK_M, TMA)
        do_a = _segment_tile(doa_src, m0, lq, stride_dot, 0, WA, HEAD_DIM, BLOCK_M, TMA)
        s_t = tl.dot(ka, tl.trans(qa))
        dp_t = tl.dot(va, tl.trans(do_a))
        qb, do_b = qa, do_a
        if WB > 0:
            qb = _segment_tile(qb_src, m0, lq, stride_qt, WA, WB, HEAD_DIM, BLOCK_M, TMA)
            do_b = _segment_tile(dob_src, m0, lq, stride_dot, WA, WB, HEAD_DIM, BLOCK_M, TMA)
            s_t = tl.dot(kb, tl.trans(qb), s_t)
            dp_t = tl.dot(vb, tl.trans(do_b), dp_t)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * LOG2E
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if MASK:  # causal diagonal; also drops rows without a visible key (lse = -inf)
            p_t = tl.where(keys[:, None] <= rows[None, :] + causal_shift, p_t, 0.0)
        delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(qa.dtype)
        p_t = p_t.to(qa.dtype)
        dv_a = tl.dot(p_t, do_a, dv_a)
        dk_a = tl.dot(ds_t, qa, dk_a)
        if WB > 0:
            dv_b = tl.dot(p_t, do_b, dv_b)
            dk_b = tl.dot(ds_t, qb, dk_b)
        if ATOMIC_DQ:
            ds = tl.trans(ds_t)
            if TMA_REDUCE:  # reductions clipped to the segment and head dim: no per-element addresses
                dq_a.atomic_add([m0, 0], tl.dot(ds, ka) * scale)
                if WB > 0:
                    dq_b.atomic_add([m0, WA], tl.dot(ds, kb) * scale)
            else:  # the interpreter, which has no tensor-descriptor reductions
                _atomic_add_tile(dq_a, tl.dot(ds, ka) * scale, rows, row_mask, stride_dq, 0, WA, HEAD_DIM)
                if WB > 0:
                    _atomic_add_tile(dq_a, tl.dot(ds, kb) * scale, rows, row_mask, stride_dq, WA, WB, HEAD_DIM)
    return dk_a, dk_b, dv_a, dv_b


@gated(lambda fn: _specs(fn, "BLOCK_N", BWD_FLOOR, BWD_FLOOR, rope=True, block_of=dkdv_block, ATOMIC_DQ=False)
       + [replace(s, archs=(90,)) for s in _specs(fn, "BLOCK_N", 0.45, 0.45, launches=LAUNCHES[2:3],
                                                  ATOMIC_DQ=True)],
       tensor_cores="wgmma")
@triton.autotune(
    # BLOCK_N keys (the host's block, 16 per warp) against BLOCK_M-row q blocks
    autotune_configs([({"BLOCK_N": bn, "BLOCK_M": bm, "ARCH": arch, "TMA": arch == 90 and HAS_TMA}, bn // 16, 2)
                      for arch, bn, bm in ((90, 128, 64), (90, 64, 64), (80, 128, 16), (80, 64, 32))],
                     [{"BLOCK_N": 16, "BLOCK_M": 16}, {"BLOCK_N": 32, "BLOCK_M": 16, "TMA": HAS_TMA}]),
    key=["HEAD_DIM", "CAUSAL", "ROPE", "ATOMIC_DQ", "block", "len_bucket"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_N")},
    reset_to_zero=["dqacc_ptr"],
)
@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dqacc_ptr, cu_q_ptr, cu_k_ptr,
                   work_ptr, pos_ptr, table_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_pt, stride_pc,
                   tokens_q, kv_heads, group, qk_scale, scale, block, len_bucket,
                   HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, CAUSAL: tl.constexpr,
                   ROPE: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ARCH: tl.constexpr = 0, TMA: tl.constexpr = False):
    """One program per (work item = block of BLOCK_N keys, kv head); loops over the q blocks of the
    group's query heads. ``block`` (= BLOCK_N) and ``len_bucket`` only select configs. Head dim 128
    takes half-height q blocks (the dk/dv accumulators then fill the registers)."""
    BM: tl.constexpr = BLOCK_M // 2 if HEAD_DIM == 128 and BLOCK_M > 16 else BLOCK_M
    TMA_REDUCE: tl.constexpr = TMA and ARCH == 90  # the interpreter has no tensor-descriptor reductions
    pid = tl.program_id(0)
    item, hk = pid // kv_heads, pid % kv_heads
    seg, nb, k_start, lk, q_start, lq = _work_item(work_ptr, item, cu_k_ptr, cu_q_ptr)
    if seg < 0:
        return
    n0 = nb * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    key_mask = keys < lk
    q_start, k_start = q_start.to(tl.int64), k_start.to(tl.int64)
    q_ptr += q_start * stride_qt
    do_ptr += q_start * stride_dot
    heads = kv_heads * group
    dqacc_ptr += q_start * heads * HEAD_DIM  # contiguous [Tq, H, D]
    lse_ptr += q_start
    delta_ptr += q_start
    k_ptr += k_start * stride_kt + _head(hk, stride_kh)
    v_ptr += k_start * stride_vt + _head(hk, stride_vh)
    dk_ptr += k_start * stride_dkt + _head(hk, stride_dkh)
    dv_ptr += k_start * stride_dvt + _head(hk, stride_dvh)
    pos_ptr += k_start * stride_pt
    ka = _load_tile(k_ptr, keys, key_mask, stride_kt, 0, WA, HEAD_DIM)
    va = _load_tile(v_ptr, keys, key_mask, stride_vt, 0, WA, HEAD_DIM)
    dk_a = tl.zeros([BLOCK_N, WA], dtype=tl.float32)
    dv_a = dk_a
    kb, vb, dk_b, dv_b = ka, va, dk_a, dv_a
    if WB > 0:
        kb = _load_tile(k_ptr, keys, key_mask, stride_kt, WA, WB, HEAD_DIM)
        vb = _load_tile(v_ptr, keys, key_mask, stride_vt, WA, WB, HEAD_DIM)
        dk_b = tl.zeros([BLOCK_N, WB], dtype=tl.float32)
        dv_b = dk_b
    shift = lk - lq
    # causal: q rows before n0 - shift see no key of this block; one loop masks the diagonal (the
    # pipes that bound this loop are not the ones a mask costs; a second, unmasked copy would cost registers)
    start = tl.maximum(n0 - shift, 0) // BM * BM if CAUSAL else 0
    for g in range(group):
        h = hk * group + g
        q_h, do_h = q_ptr + _head(h, stride_qh), do_ptr + _head(h, stride_doh)
        qa = _segment_source(q_h, lq, stride_qt, 0, WA, HEAD_DIM, BM, TMA)
        doa = _segment_source(do_h, lq, stride_dot, 0, WA, HEAD_DIM, BM, TMA)
        qb, dob = qa, doa
        if WB > 0:
            qb = _segment_source(q_h, lq, stride_qt, WA, WB, HEAD_DIM, BM, TMA)
            dob = _segment_source(do_h, lq, stride_dot, WA, WB, HEAD_DIM, BM, TMA)
        dq_a = dqacc_ptr + _head(h, HEAD_DIM)
        dq_b = dq_a
        if ATOMIC_DQ and TMA_REDUCE:
            dq_a = tl.make_tensor_descriptor(dq_b, [lq, HEAD_DIM], [heads * HEAD_DIM, 1], [BM, WA])
            if WB > 0:
                dq_b = tl.make_tensor_descriptor(dq_b, [lq, HEAD_DIM], [heads * HEAD_DIM, 1], [BM, WB])
        dk_a, dk_b, dv_a, dv_b = _dkdv_tiles(
            dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, qa, qb, doa, dob, lse_ptr + h * tokens_q, delta_ptr + h * tokens_q,
            dq_a, dq_b, keys, lq, shift, stride_qt, stride_dot, heads * HEAD_DIM, qk_scale, scale, start, lq, HEAD_DIM,
            WA, WB, CAUSAL, ATOMIC_DQ, TMA, TMA_REDUCE, BM)
    # dv first: its registers are free before dk goes through RoPE
    _store_tile(dv_ptr, dv_a, keys, key_mask, stride_dvt, 0, WA, HEAD_DIM)
    if WB > 0:
        _store_tile(dv_ptr, dv_b, keys, key_mask, stride_dvt, WA, WB, HEAD_DIM)
    _store_qk_grad(dk_ptr, dk_a * scale, keys, key_mask, stride_dkt, pos_ptr, stride_pt, stride_pc, table_ptr,
                   0, WA, HEAD_DIM, ROPE)
    if WB > 0:
        _store_qk_grad(dk_ptr, dk_b * scale, keys, key_mask, stride_dkt, pos_ptr, stride_pt, stride_pc, table_ptr,
                       WA, WB, HEAD_DIM, ROPE)


@triton.jit
def _dq_tiles(dq_a, dq_b, qa, qb, do_a, do_b, lse, delta, ka_src, kb_src, va_src, vb_src, rows, lk, causal_shift,
              stride_kt, stride_vt, qk_scale, start, end, HEAD_DIM: tl.constexpr, WA: tl.constexpr,
              WB: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ka = _segment_tile(ka_src, n0, lk, stride_kt, 0, WA, HEAD_DIM, BLOCK_N, TMA)
        v = _segment_tile(va_src, n0, lk, stride_vt, 0, WA, HEAD_DIM, BLOCK_N, TMA)
        s = tl.dot(qa, tl.trans(ka))
        dp = tl.dot(do_a, tl.trans(v))
        kb = ka
        if WB > 0:
            kb = _segment_tile(kb_src, n0, lk, stride_kt, WA, WB, HEAD_DIM, BLOCK_N, TMA)
            v = _segment_tile(vb_src, n0, lk, stride_vt, WA, WB, HEAD_DIM, BLOCK_N, TMA)
            s = tl.dot(qb, tl.trans(kb), s)
            dp = tl.dot(do_b, tl.trans(v), dp)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:  # keys past the segment, causal diagonal; rows without a visible key (lse = -inf) get 0
            visible = (cols < lk)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_shift)
            p = tl.where(visible, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(ka.dtype)
        dq_a = tl.dot(ds, ka, dq_a)
        if WB > 0:
            dq_b = tl.dot(ds, kb, dq_b)
    return dq_a, dq_b


@gated(lambda fn: _specs(fn, "BLOCK_M", BWD_FLOOR, BWD_FLOOR, rope=True), tensor_cores="wgmma")
@triton.autotune(
    # BLOCK_M rows (the host's block, 16 per warp) against BLOCK_N-key blocks
    autotune_configs([({"BLOCK_M": bm, "BLOCK_N": bn, "ARCH": arch, "TMA": arch == 90 and HAS_TMA}, bm // 16, 2)
                      for arch, bn in ((90, 64), (80, 32)) for bm in (64, 128)],
                     [{"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 32, "BLOCK_N": 16, "TMA": HAS_TMA}]),
    key=["HEAD_DIM", "CAUSAL", "ROPE", "block", "len_bucket"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_M")},
)
@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr, work_ptr, pos_ptr,
                 table_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dqt, stride_dqh, stride_pt, stride_pc, tokens_q, heads, group, qk_scale, scale, block,
                 len_bucket, HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, CAUSAL: tl.constexpr,
                 ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ARCH: tl.constexpr = 0,
                 TMA: tl.constexpr = False):
    """One program per (work item = block of BLOCK_M queries, head); loops over the key blocks it sees
    (TMA: through tensor descriptors)."""
    pid = tl.program_id(0)
    item, h = pid // heads, pid % heads
    seg, mb, q_start, lq, k_start, lk = _work_item(work_ptr, item, cu_q_ptr, cu_k_ptr)
    if seg < 0:
        return
    m0 = mb * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < lq
    q_start, k_start = q_start.to(tl.int64), k_start.to(tl.int64)
    q_ptr += q_start * stride_qt + _head(h, stride_qh)
    do_ptr += q_start * stride_dot + _head(h, stride_doh)
    dq_ptr += q_start * stride_dqt + _head(h, stride_dqh)
    k_ptr += k_start * stride_kt + _head(h // group, stride_kh)
    v_ptr += k_start * stride_vt + _head(h // group, stride_vh)
    pos_ptr += q_start * stride_pt
    qa = _load_tile(q_ptr, rows, row_mask, stride_qt, 0, WA, HEAD_DIM)
    do_a = _load_tile(do_ptr, rows, row_mask, stride_dot, 0, WA, HEAD_DIM)
    dq_a = tl.zeros([BLOCK_M, WA], dtype=tl.float32)
    qb, do_b, dq_b = qa, do_a, dq_a
    if WB > 0:
        qb = _load_tile(q_ptr, rows, row_mask, stride_qt, WA, WB, HEAD_DIM)
        do_b = _load_tile(do_ptr, rows, row_mask, stride_dot, WA, WB, HEAD_DIM)
        dq_b = tl.zeros([BLOCK_M, WB], dtype=tl.float32)
    lse = tl.load(lse_ptr + h * tokens_q + q_start + rows, mask=row_mask, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + h * tokens_q + q_start + rows, mask=row_mask, other=0.0)
    ka = _segment_source(k_ptr, lk, stride_kt, 0, WA, HEAD_DIM, BLOCK_N, TMA)
    va = _segment_source(v_ptr, lk, stride_vt, 0, WA, HEAD_DIM, BLOCK_N, TMA)
    kb, vb = ka, va
    if WB > 0:
        kb = _segment_source(k_ptr, lk, stride_kt, WA, WB, HEAD_DIM, BLOCK_N, TMA)
        vb = _segment_source(v_ptr, lk, stride_vt, WA, WB, HEAD_DIM, BLOCK_N, TMA)
    full, end = _key_ranges(m0, lq, lk, CAUSAL, BLOCK_M, BLOCK_N)
    dq_a, dq_b = _dq_tiles(dq_a, dq_b, qa, qb, do_a, do_b, lse, delta, ka, kb, va, vb, rows, lk, lk - lq,
                           stride_kt, stride_vt, qk_scale, 0, full, HEAD_DIM, WA, WB, CAUSAL, False, BLOCK_N, TMA)
    dq_a, dq_b = _dq_tiles(dq_a, dq_b, qa, qb, do_a, do_b, lse, delta, ka, kb, va, vb, rows, lk, lk - lq,
                           stride_kt, stride_vt, qk_scale, full, end, HEAD_DIM, WA, WB, CAUSAL, True, BLOCK_N, TMA)
    _store_qk_grad(dq_ptr, dq_a * scale, rows, row_mask, stride_dqt, pos_ptr, stride_pt, stride_pc, table_ptr,
                   0, WA, HEAD_DIM, ROPE)
    if WB > 0:
        _store_qk_grad(dq_ptr, dq_b * scale, rows, row_mask, stride_dqt, pos_ptr, stride_pt, stride_pc, table_ptr,
                       WA, WB, HEAD_DIM, ROPE)


def _dq_store_specs(fn):
    sig = signature(fn, "bf16", dqacc_ptr="*fp32", pos_ptr="*i32", table_ptr="*i64")
    return [Spec(f"bf16 D={d}{' rope' if rope else ''}", sig,
                 {"HEAD_DIM": d, "WA": _tiles(d)[0], "WB": _tiles(d)[1], "ROPE": rope, "BLOCK_T": DELTA_BLOCK},
                 {"num_warps": 4}, floor=0.6) for d, rope in ((80, True), (128, False))]


@gated(_dq_store_specs)
@triton.jit
def _attn_dq_store(dqacc_ptr, dq_ptr, pos_ptr, table_ptr, tokens, heads, stride_dqt, stride_dqh, stride_pt, stride_pc,
                   HEAD_DIM: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, ROPE: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """dq from the fp32 sum the dk/dv programs accumulated with atomics (deterministic=False)."""
    h = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = tok < tokens
    tok = tok.to(tl.int64)
    dqacc_ptr += _head(h, HEAD_DIM)
    dq_ptr += _head(h, stride_dqh)
    acc = _load_tile(dqacc_ptr, tok, mask, heads * HEAD_DIM, 0, WA, HEAD_DIM)
    _store_qk_grad(dq_ptr, acc, tok, mask, stride_dqt, pos_ptr, stride_pt, stride_pc, table_ptr, 0, WA, HEAD_DIM, ROPE)
    if WB > 0:
        acc = _load_tile(dqacc_ptr, tok, mask, heads * HEAD_DIM, WA, WB, HEAD_DIM)
        _store_qk_grad(dq_ptr, acc, tok, mask, stride_dqt, pos_ptr, stride_pt, stride_pc, table_ptr, WA, WB, HEAD_DIM,
                       ROPE)


# ------------------------------------------------------------------ host side
def _tma_scratch():
    """Tensor descriptors made on the device need a global scratch allocator: torch's, unless one is set."""
    from triton.runtime import _allocation

    if HAS_TMA and isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _aligned(t):
    """``t``, or a contiguous copy where its start or its token or head stride is not 16-byte aligned (see
    _head; tensor descriptors need the same)."""
    return t if t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 and t.data_ptr() % 16 == 0 else t.contiguous()


def _sm90(device):
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _work_list(cu, tokens, block, reverse):
    """int32 [capacity, 2] (segment, block) items of ``cu``'s segments, built on the device."""
    batch = cu.numel() - 1
    capacity = triton.cdiv(tokens, block) + batch
    work = torch.empty(capacity, 2, dtype=torch.int32, device=cu.device)
    _attn_work[(batch,)](cu, work, batch, capacity, BLOCK=block, CHUNK=WORK_CHUNK, REVERSE=reverse)
    return work


def rotate(q, k, rope_pos, theta):
    """(q, k) rotated by RoPE into contiguous tensors with each head dim in pair order, as the kernels take
    them (one pass, each token's cos/sin once)."""
    tokens, heads, dim = q.shape
    qr = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    kr = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return qr, kr
    blocks = _rope_blocks(dim)
    _attn_rope[(triton.cdiv(tokens, blocks["BLOCK_T"]),)](
        q, k, qr, kr, rope_pos, rope_table(dim, theta, q.device), tokens, heads, k.shape[1], *q.stride()[:2],
        *k.stride()[:2], *rope_pos.stride(), HEAD_DIM=dim, **blocks)
    return qr, kr


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta):
    """(out [Tq, H, D] in q's dtype, lse [H, Tq] fp32 natural log (-inf for rows without a visible key),
    q and k as the backward takes them: rotated (``rotate``) with ``rope_pos``, else q and k)."""
    tq, heads, dim = q.shape
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, tq, dtype=torch.float32, device=q.device)
    if rope_pos is not None:
        q, k = rotate(q, k, rope_pos, theta)
    batch = cu_q.numel() - 1
    if tq == 0 or batch == 0 or max_q == 0:
        return out, lse, q, k
    wa, wb = _tiles(dim)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    if _sm90(q.device):
        _tma_scratch()
    block = block_size(max(max_q, max_k))
    work = _work_list(cu_q, tq, block, causal)
    _attn_fwd[(work.shape[0] * heads,)](
        q, k, v, out, lse, cu_q, cu_k, work, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        tq, heads, heads // k.shape[1], scale * LOG2E.value, block, _len_bucket(max_k),
        HEAD_DIM=dim, WA=wa, WB=wb, CAUSAL=causal,
    )
    return out, lse, q, k


def backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta,
             deterministic=True):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v; dk/dv summed over each GQA group. q and k are
    forward()'s: rotated when ``rope_pos`` is given (dq and dk are rotated back)."""
    tq, heads, dim = q.shape
    kv_heads = k.shape[1]
    q, k, v, grad_out = _aligned(q), _aligned(k), _aligned(v), _aligned(grad_out)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    batch = cu_q.numel() - 1
    if batch == 0 or (max_q == 0 and max_k == 0):
        return dq, dk, dv
    wa, wb = _tiles(dim)
    consts = {"HEAD_DIM": dim, "WA": wa, "WB": wb, "CAUSAL": causal, "ROPE": rope_pos is not None}
    # without rope the position pointers are never read; any int32/int64 tensors stand in
    pos, table = (rope_pos, rope_table(dim, theta, q.device)) if rope_pos is not None else (cu_q, cu_q)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    block = block_size(max(max_q, max_k))
    bucket = _len_bucket(max(max_q, max_k))
    # sm_80's mma.sync keeps both operands of the atomic path's extra dot in registers: it spills there
    # the atomic dq adds through TMA: sm_90 (and the interpreter) only
    atomic = not deterministic and max_k > 0 and (q.device.type != "cuda" or _sm90(q.device))
    if _sm90(q.device):
        _tma_scratch()
    # fp32 dq summed with atomics over the k blocks (contiguous); a stand-in when unused
    dqacc = torch.zeros(tq if atomic else 0, heads, dim, dtype=torch.float32, device=q.device)
    pos_strides = rope_pos.stride() if rope_pos is not None else (0, 0)
    delta = torch.empty(heads, tq, dtype=torch.float32, device=q.device)
    if tq:
        _attn_bwd_delta[(triton.cdiv(tq, DELTA_BLOCK), heads)](
            out, grad_out, delta, *out.stride()[:2], *grad_out.stride()[:2], tq,
            HEAD_DIM=dim, WA=wa, WB=wb, BLOCK_T=DELTA_BLOCK,
        )
    if max_k:
        key_block = dkdv_block(block, dim)
        work = _work_list(cu_k, k.shape[0], key_block, False)
        _attn_bwd_dkdv[(work.shape[0] * kv_heads,)](
            q, k, v, grad_out, lse, delta, dk, dv, dqacc, cu_q, cu_k, work, pos, table, *q.stride()[:2],
            *k.stride()[:2], *v.stride()[:2], *grad_out.stride()[:2], *dk.stride()[:2], *dv.stride()[:2],
            *pos_strides, tq, kv_heads, heads // kv_heads, scale * LOG2E.value, scale, key_block, bucket,
            ATOMIC_DQ=atomic, **consts,
        )
    if atomic:
        if tq:
            _attn_dq_store[(triton.cdiv(tq, DELTA_BLOCK), heads)](
                dqacc, dq, pos, table, tq, heads, *dq.stride()[:2], *pos_strides,
                HEAD_DIM=dim, WA=wa, WB=wb, ROPE=consts["ROPE"], BLOCK_T=DELTA_BLOCK,
            )
    elif max_q:
        work = _work_list(cu_q, tq, block, causal)
        _attn_bwd_dq[(work.shape[0] * heads,)](
            q, k, v, grad_out, lse, delta, dq, cu_q, cu_k, work, pos, table, *q.stride()[:2], *k.stride()[:2],
            *v.stride()[:2], *grad_out.stride()[:2], *dq.stride()[:2], *pos_strides, tq, heads, heads // kv_heads,
            scale * LOG2E.value, scale, block, bucket, **consts,
        )
    return dq, dk, dv
