"""DeepStack injection: rows ``index`` of hidden [..., C] increased by stacked [K, C], in place.

One program per block of index rows x channel tile gathers the rows, adds in fp32 and scatters
them back; the index is unique (checked by the op), so programs never touch the same row.
"""
import torch
import triton
import triton.language as tl

from .registry import Spec, gated, signature

BLOCK_ROWS = 16
BLOCK_C = 256


def _specs(fn):
    return [
        Spec(f"{dt} index {it}", signature(fn, dt, index_ptr=f"*{it}"), {"BR": BLOCK_ROWS, "BC": BLOCK_C},
             {"num_warps": 4}, floor=0.8)
        for dt, it in (("fp16", "i64"), ("bf16", "i64"), ("bf16", "i32"))
    ]


@gated(specs=_specs)
@triton.jit
def _deepstack_add_kernel(
    hidden_ptr, index_ptr, stacked_ptr, K, C, stride_hidden, stride_stacked, BR: tl.constexpr, BC: tl.constexpr,
):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (r < K)[:, None] & (c < C)[None, :]
    rows = tl.load(index_ptr + r, mask=r < K, other=0).to(tl.int64)
    target = hidden_ptr + rows[:, None] * stride_hidden + c[None, :]
    h = tl.load(target, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(stacked_ptr + r.to(tl.int64)[:, None] * stride_stacked + c[None, :], mask=mask, other=0.0)
    tl.store(target, (h + s.to(tl.float32)).to(hidden_ptr.dtype.element_ty), mask=mask)


def forward_(hidden, index, stacked):
    """hidden[index] += stacked in place (rows of the flattened leading dims); returns hidden."""
    channels = hidden.shape[-1]
    try:
        rows = hidden.view(-1, channels)
    except RuntimeError:  # leading dims that no single row stride spans: update a copy, then write it back
        return hidden.copy_(forward_(hidden.contiguous(), index, stacked))
    count = index.shape[0]
    if count and channels:
        grid = (triton.cdiv(count, BLOCK_ROWS), triton.cdiv(channels, BLOCK_C))
        _deepstack_add_kernel[grid](rows, index, stacked, count, channels, rows.stride(0), stacked.stride(0),
                                    BR=BLOCK_ROWS, BC=BLOCK_C, num_warps=4)
    return hidden


def forward(hidden, index, stacked):
    """Out-of-place: a copy of hidden with the rows added."""
    return forward_(hidden.clone(memory_format=torch.contiguous_format), index, stacked)
