"""DeepStack injection: rows ``index`` of hidden [..., C] increased by stacked [K, C].

In place (``forward(..., inplace=True)``): one program per block of index rows x channel tile gathers the rows, adds in
fp32 and scatters them back; nothing else of hidden is touched. Out of place (``forward``): the copy
is the kernel's own pass: every row of hidden is read once and written once to the output, the
indexed ones with their stacked row added, found through an inverse map (row -> position in index,
-1 elsewhere) scattered beforehand. Either way hidden's leading dims may be any two strided levels
(a transposed [B, L, C] needs no copy).

The op checks that ``index`` is unique and in range; the kernels never touch a row out of range even
when the check was skipped.
"""
import torch
import triton
import triton.language as tl

from .registry import Spec, gated, launch_spec, signature

BLOCK_ROWS = 16
BLOCK_C = 256
MAP_BLOCK = 1024  # index entries per program of the inverse-map scatter


def _specs(fn):
    # an LLM of width 1536 (Qwen2-1.5B), hidden [B, L, C] contiguous (one row stride), as launched;
    # floor: the fraction of DRAM bandwidth the performance model must allow
    ints = {"C": 1536, "stride_outer": 0, "stride_inner": 1536, "stride_stacked": 1536}
    return [
        launch_spec(f"{dt} index {it}", fn, dt, {"BR": BLOCK_ROWS, "BC": BLOCK_C}, ints,
                    {"index_ptr": f"*{it}", "map_ptr": "*i32"}, options={"num_warps": 4}, floor=0.8)
        for dt, it in (("fp16", "i64"), ("bf16", "i64"), ("bf16", "i32"))
    ]


@triton.jit
def _row_offsets(rows, INNER, stride_outer, stride_inner):
    """Element offset of each row of the flattened leading dims, laid out as [rows / INNER, INNER]."""
    rows = rows.to(tl.int64)
    return (rows // INNER) * stride_outer + (rows % INNER) * stride_inner


@gated(specs=_specs)
@triton.jit
def _deepstack_add_kernel(
    hidden_ptr, index_ptr, stacked_ptr, K, C, ROWS, INNER, stride_outer, stride_inner, stride_stacked,
    BR: tl.constexpr, BC: tl.constexpr,
):
    """hidden[index[r]] += stacked[r] for this program's index rows r and channel tile, in place."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    row = tl.load(index_ptr + r, mask=r < K, other=-1)
    mask = ((row >= 0) & (row < ROWS))[:, None] & (c < C)[None, :]
    target = hidden_ptr + _row_offsets(row, INNER, stride_outer, stride_inner)[:, None] + c[None, :]
    h = tl.load(target, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(stacked_ptr + r.to(tl.int64)[:, None] * stride_stacked + c[None, :], mask=mask, other=0.0)
    tl.store(target, (h + s.to(tl.float32)).to(hidden_ptr.dtype.element_ty), mask=mask)


@gated(specs=lambda fn: [Spec(f"index {it}", signature(fn, "i32", index_ptr=f"*{it}"), {"BLOCK": MAP_BLOCK},
                              {"num_warps": 4}, floor=0.8) for it in ("i64", "i32")])
@triton.jit
def _index_map_kernel(index_ptr, map_ptr, K, ROWS, BLOCK: tl.constexpr):
    """map[index[k]] = k for the entries that lie in [0, ROWS)."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(index_ptr + k, mask=k < K, other=-1)
    tl.store(map_ptr + row, k, mask=(row >= 0) & (row < ROWS))


@gated(specs=_specs)
@triton.jit
def _deepstack_copy_add_kernel(
    hidden_ptr, map_ptr, stacked_ptr, out_ptr, C, ROWS, INNER, stride_outer, stride_inner, stride_stacked,
    BR: tl.constexpr, BC: tl.constexpr,
):
    """out[row] = hidden[row] (+ stacked[map[row]] where map[row] >= 0) for this program's rows; out contiguous."""
    row = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    live = row < ROWS
    mask = live[:, None] & (c < C)[None, :]
    h = tl.load(hidden_ptr + _row_offsets(row, INNER, stride_outer, stride_inner)[:, None] + c[None, :], mask=mask,
                other=0.0).to(tl.float32)
    src = tl.load(map_ptr + row, mask=live, other=-1)
    s = tl.load(stacked_ptr + src.to(tl.int64)[:, None] * stride_stacked + c[None, :],
                mask=(src >= 0)[:, None] & mask, other=0.0)
    tl.store(out_ptr + row.to(tl.int64)[:, None] * C + c[None, :], (h + s.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def _two_level(hidden):
    """(inner, stride_outer, stride_inner) laying the rows of hidden's leading dims out as [rows / inner, inner]
    with two strides, or None when they need more levels (hidden is then copied)."""
    lead, strides = hidden.shape[:-1], hidden.stride()[:-1]
    dims = [(n, s) for n, s in zip(lead, strides) if n != 1]  # size-1 dims do not move
    merged = []
    for n, s in dims:  # merge each dim into the previous one where it continues it
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 2:
        return None
    merged = [(1, 0)] * (2 - len(merged)) + merged
    return merged[1][0], merged[0][1], merged[1][1]


def _launch_args(hidden, stacked):
    rows = hidden.numel() // hidden.shape[-1]
    return (hidden.shape[-1], rows, *_two_level(hidden), stacked.stride(0))


def _add_in_place(hidden, index, stacked):
    """hidden[index] += stacked in place (rows of the flattened leading dims); returns hidden."""
    count, channels = index.shape[0], hidden.shape[-1]
    if not (count and channels):
        return hidden
    if _two_level(hidden) is None:  # three or more strided levels: update a copy, then write it back
        return hidden.copy_(_add_in_place(hidden.contiguous(), index, stacked))
    grid = (triton.cdiv(count, BLOCK_ROWS), triton.cdiv(channels, BLOCK_C))
    c, rows, inner, outer_stride, inner_stride, stacked_stride = _launch_args(hidden, stacked)
    _deepstack_add_kernel[grid](hidden, index, stacked, count, c, rows, inner, outer_stride, inner_stride,
                                stacked_stride, BR=BLOCK_ROWS, BC=BLOCK_C, num_warps=4)
    return hidden


def forward(hidden, index, stacked, inplace=False):
    """hidden[index] += stacked (rows of the flattened leading dims): in place and returning hidden when
    ``inplace``; else a new contiguous tensor, hidden with the rows added, in one pass over hidden."""
    if inplace:
        return _add_in_place(hidden, index, stacked)
    if _two_level(hidden) is None:
        return _add_in_place(hidden.contiguous(), index, stacked)  # the copy is needed anyway
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    c, rows, inner, outer_stride, inner_stride, stacked_stride = _launch_args(hidden, stacked)
    if not out.numel():
        return out
    inverse = torch.full((rows,), -1, dtype=torch.int32, device=hidden.device)
    if index.shape[0]:
        _index_map_kernel[(triton.cdiv(index.shape[0], MAP_BLOCK),)](index, inverse, index.shape[0], rows,
                                                                     BLOCK=MAP_BLOCK, num_warps=4)
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(c, BLOCK_C))
    _deepstack_copy_add_kernel[grid](hidden, inverse, stacked, out, c, rows, inner, outer_stride, inner_stride,
                                     stacked_stride, BR=BLOCK_ROWS, BC=BLOCK_C, num_warps=4)
    return out
