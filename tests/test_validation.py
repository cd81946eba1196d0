"""Every public op rejects bad input with a ValueError/TypeError that names the argument.

Each case changes one argument of a valid call (test_valid_call_passes checks the valid calls), so the
error can only come from that argument.
"""
import warnings

import pytest
import torch

import fastvl
from fastvl import reference
from fastvl.testing import assert_close, cu_seqlens

F32 = torch.float32


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def head_dim(d):
    """q, k, v of the valid attention call with head_dim d."""
    return dict(q=torch.randn(7, 4, d), k=torch.randn(7, 2, d), v=torch.randn(7, 2, d))


def strided(*shape, dtype=F32):
    """A tensor of ``shape`` whose last dimension has stride 2."""
    return torch.randn(*shape[:-1], 2 * shape[-1]).to(dtype)[..., ::2]


def attention_args():
    T = 7
    return dict(
        q=torch.randn(T, 4, 64), k=torch.randn(T, 2, 64), v=torch.randn(T, 2, 64), cu_seqlens_q=cu_seqlens([3, 4]),
    )


def cross_args():
    return dict(
        q=torch.randn(7, 4, 64), k=torch.randn(5, 2, 64), v=torch.randn(5, 2, 64),
        cu_seqlens_q=cu_seqlens([3, 4]), cu_seqlens_k=cu_seqlens([1, 4]),
    )


def rope_args():
    return dict(x=torch.randn(5, 2, 8), pos=torch.randint(0, 9, (5, 2), dtype=torch.int32))


def merge_args():
    C, hidden = 6, 10
    return dict(
        x=torch.randn(12, C), ln_w=torch.randn(C), ln_b=torch.randn(C), w1=torch.randn(hidden, 4 * C),
        b1=torch.randn(hidden), w2=torch.randn(3, hidden), b2=torch.randn(3),
    )


def sap_args():
    C, hidden = 6, 5
    return dict(
        x=torch.randn(39, C), grid_hw=torch.tensor([[5, 7], [1, 4]]), w1=torch.randn(hidden, C), b1=torch.randn(hidden),
        w2=torch.randn(1, hidden), b2=torch.randn(1),
    )


def deepstack_args():
    return dict(hidden=torch.randn(2, 5, 8), index=torch.tensor([7, 0, 3]), stacked=torch.randn(3, 8))


def groups_args():
    return dict(x=torch.randn(16, 3), grid_thw=torch.tensor([[1, 4, 8], [2, 4, 4]]))


def positions_args():
    return dict(grid_thw=torch.tensor([[1, 4, 6], [2, 2, 2]]))


OPS = {
    "varlen_attention": (fastvl.varlen_attention, attention_args),
    "varlen_attention-cross": (fastvl.varlen_attention, cross_args),
    "apply_rope_2d": (fastvl.apply_rope_2d, rope_args),
    "patch_merge": (fastvl.patch_merge, merge_args),
    "spatial_attention_pool": (fastvl.spatial_attention_pool, sap_args),
    "deepstack_add": (fastvl.deepstack_add, deepstack_args),
    "deepstack_add_": (fastvl.deepstack_add_, deepstack_args),
    "deepstack_groups": (fastvl.deepstack_groups, groups_args),
    "deepstack_index": (fastvl.deepstack_index, lambda: {"grid_thw": groups_args()["grid_thw"]}),
    "vision_positions": (fastvl.vision_positions, positions_args),
}

# (op, changed arguments: value or callable(valid args) -> value, exception, regular expression of the message)
CASES = {
    # varlen_attention
    "attn-q-list": ("varlen_attention", dict(q=lambda a: a["q"].tolist()), TypeError, "^q "),
    "attn-q-int": ("varlen_attention", dict(q=lambda a: a["q"].int()), TypeError, "^q "),
    "attn-q-2d": ("varlen_attention", dict(q=lambda a: a["q"][:, 0]), ValueError, "^q "),
    "attn-q-stride": ("varlen_attention", dict(q=strided(7, 4, 64)), ValueError, "^q .*unit stride"),
    "attn-k-stride": ("varlen_attention", dict(k=strided(7, 2, 64)), ValueError, "^k .*unit stride"),
    "attn-v-stride": ("varlen_attention", dict(v=strided(7, 2, 64)), ValueError, "^v .*unit stride"),
    "attn-k-dtype": ("varlen_attention", dict(k=lambda a: a["k"].half()), TypeError, "^k .*dtype"),
    "attn-v-dtype": ("varlen_attention", dict(v=lambda a: a["v"].double()), TypeError, "^v .*dtype"),
    "attn-v-none": ("varlen_attention", dict(v=None), TypeError, "^v "),
    "attn-head-dim-0": ("varlen_attention", head_dim(0), ValueError, "^q: head_dim must be >= 1"),
    "attn-k-head-dim": ("varlen_attention", dict(k=torch.randn(7, 2, 80)), ValueError, "^k "),
    "attn-v-heads": ("varlen_attention", dict(v=torch.randn(7, 1, 64)), ValueError, "^v "),
    "attn-v-tokens": ("varlen_attention", dict(v=torch.randn(6, 2, 64)), ValueError, "^v "),
    "attn-gqa-divisible": ("varlen_attention", dict(k=torch.randn(7, 3, 64), v=torch.randn(7, 3, 64)),
        ValueError, "^k: .*heads"),
    "attn-self-k-tokens": ("varlen_attention", dict(k=torch.randn(6, 2, 64), v=torch.randn(6, 2, 64)),
        ValueError, "^k has 6 tokens .*cu_seqlens_k"),
    "attn-cu-float": ("varlen_attention", dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].float()),
        TypeError, "^cu_seqlens_q .*int32"),
    "attn-cu-int64": ("varlen_attention", dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()),
        TypeError, "^cu_seqlens_q .*int32"),
    "attn-cu-list": ("varlen_attention", dict(cu_seqlens_q=[0, 3, 7]), TypeError, "^cu_seqlens_q "),
    "attn-cu-2d": ("varlen_attention", dict(cu_seqlens_q=cu_seqlens([3, 4])[None]), ValueError, "^cu_seqlens_q "),
    "attn-cu-empty": ("varlen_attention", dict(cu_seqlens_q=torch.zeros(0, dtype=torch.int32)),
        ValueError, "^cu_seqlens_q "),
    "attn-cu-stride": ("varlen_attention", dict(cu_seqlens_q=i32(0, 9, 3, 9, 7)[::2]),
        ValueError, "^cu_seqlens_q .*stride"),
    "attn-cu-start": ("varlen_attention", dict(cu_seqlens_q=i32(1, 3, 7)), ValueError, "^cu_seqlens_q must start at 0"),
    "attn-cu-decreasing": ("varlen_attention", dict(cu_seqlens_q=i32(0, 5, 3, 7)),
        ValueError, "^cu_seqlens_q must be non-decreasing"),
    "attn-cu-end": ("varlen_attention", dict(cu_seqlens_q=i32(0, 3, 6)),
        ValueError, "^cu_seqlens_q must end at the token count 7"),
    "attn-cu-end-beyond": ("varlen_attention", dict(cu_seqlens_q=i32(0, 3, 8)), ValueError, "^cu_seqlens_q must end"),
    "attn-cu-wrap": ("varlen_attention", dict(cu_seqlens_q=i32(0, 2**31 - 1, -2, 7)),
        ValueError, "^cu_seqlens_q must be non-decreasing"),
    "attn-cu-wrap-max": ("varlen_attention", dict(cu_seqlens_q=i32(0, -2**31, 2**31 - 1, 7), max_seqlen_q=7),
        ValueError, "^cu_seqlens_q must be non-decreasing"),
    "attn-max-seqlen-q": ("varlen_attention", dict(max_seqlen_q=3), ValueError, "^max_seqlen_q=3"),
    "attn-max-seqlen-q-negative": ("varlen_attention", dict(max_seqlen_q=-1), ValueError, "^max_seqlen_q "),
    "attn-max-seqlen-q-float": ("varlen_attention", dict(max_seqlen_q=4.0), TypeError, "^max_seqlen_q "),
    "attn-max-seqlen-q-tokens": ("varlen_attention", dict(max_seqlen_q=8), ValueError, "^max_seqlen_q=8 exceeds the token"),
    "attn-max-seqlen-q-int32": ("varlen_attention", dict(max_seqlen_q=2**31 - 1), ValueError, "^max_seqlen_q="),
    "attn-max-seqlen-q-int64": ("varlen_attention", dict(max_seqlen_q=2**70), ValueError, "^max_seqlen_q "),
    "attn-max-seqlen-k-self": ("varlen_attention", dict(max_seqlen_k=3), ValueError, "^max_seqlen_k=3"),
    "attn-max-seqlen-k-self-type": ("varlen_attention", dict(max_seqlen_k="4"), TypeError, "^max_seqlen_k "),
    "attn-max-seqlen-k-huge": ("varlen_attention", dict(max_seqlen_k=2**31 - 1), ValueError, "^max_seqlen_k="),
    "attn-causal-int": ("varlen_attention", dict(causal=1), TypeError, "^causal "),
    "attn-scale-negative": ("varlen_attention", dict(softmax_scale=-0.1), ValueError, "^softmax_scale "),
    "attn-scale-tensor": ("varlen_attention", dict(softmax_scale=torch.tensor(0.1)), TypeError, "^softmax_scale "),
    "attn-scale-inf": ("varlen_attention", dict(softmax_scale=float("inf")), ValueError, "^softmax_scale must be finite"),
    "attn-scale-nan": ("varlen_attention", dict(softmax_scale=float("nan")), ValueError, "^softmax_scale "),
    "attn-scale-huge-int": ("varlen_attention", dict(softmax_scale=10**400), ValueError, "^softmax_scale must be finite"),
    "attn-theta-zero": ("varlen_attention", dict(rope_theta=0.0), ValueError, "^rope_theta "),
    "attn-theta-inf": ("varlen_attention", dict(rope_theta=float("inf")), ValueError, "^rope_theta must be finite"),
    "attn-rope-int64": ("varlen_attention", dict(rope_pos=torch.zeros(7, 2, dtype=torch.int64)),
        TypeError, "^rope_pos .*int32"),
    "attn-rope-float": ("varlen_attention", dict(rope_pos=torch.zeros(7, 2)), TypeError, "^rope_pos "),
    "attn-rope-columns": ("varlen_attention", dict(rope_pos=torch.zeros(7, 3, dtype=torch.int32)),
        ValueError, "^rope_pos .*shape"),
    "attn-rope-rows": ("varlen_attention", dict(rope_pos=torch.zeros(6, 2, dtype=torch.int32)),
        ValueError, "^rope_pos .*shape"),
    "attn-rope-1d": ("varlen_attention", dict(rope_pos=torch.zeros(14, dtype=torch.int32)), ValueError, "^rope_pos "),
    "attn-rope-stride": ("varlen_attention", dict(rope_pos=torch.zeros(7, 4, dtype=torch.int32)[:, ::2]),
        ValueError, "^rope_pos .*stride"),
    # cross-attention
    "cross-k-cu-float": ("varlen_attention-cross", dict(cu_seqlens_k=lambda a: a["cu_seqlens_k"].float()),
        TypeError, "^cu_seqlens_k "),
    "cross-k-cu-end": ("varlen_attention-cross", dict(cu_seqlens_k=i32(0, 1, 4)),
        ValueError, "^cu_seqlens_k must end at the token count 5"),
    "cross-k-cu-start": ("varlen_attention-cross", dict(cu_seqlens_k=i32(2, 1, 5)),
        ValueError, "^cu_seqlens_k must start at 0"),
    "cross-k-cu-decreasing": ("varlen_attention-cross", dict(cu_seqlens_k=i32(0, 4, 1, 5), cu_seqlens_q=cu_seqlens([3, 0, 4])),
        ValueError, "^cu_seqlens_k must be non-decreasing"),
    "cross-k-segments": ("varlen_attention-cross", dict(cu_seqlens_k=cu_seqlens([1, 2, 2])),
        ValueError, "^cu_seqlens_k has 3 segments"),
    "cross-max-seqlen-k": ("varlen_attention-cross", dict(max_seqlen_k=2), ValueError, "^max_seqlen_k=2"),
    "cross-max-seqlen-k-tokens": ("varlen_attention-cross", dict(max_seqlen_k=6), ValueError, "^max_seqlen_k=6 exceeds"),
    "cross-k-cu-wrap": ("varlen_attention-cross", dict(cu_seqlens_k=i32(0, 2**31 - 1, 5)),
        ValueError, "^cu_seqlens_k must be non-decreasing"),
    "cross-rope": ("varlen_attention-cross", dict(rope_pos=torch.zeros(7, 2, dtype=torch.int32)),
        ValueError, "^rope_pos needs self-attention"),
    # apply_rope_2d
    "rope-x-list": ("apply_rope_2d", dict(x=[[[1.0] * 8]]), TypeError, "^x "),
    "rope-x-int": ("apply_rope_2d", dict(x=lambda a: a["x"].int()), TypeError, "^x "),
    "rope-x-2d": ("apply_rope_2d", dict(x=torch.randn(5, 8)), ValueError, "^x "),
    "rope-x-stride": ("apply_rope_2d", dict(x=strided(5, 2, 8)), ValueError, "^x .*unit stride"),
    "rope-head-dim": ("apply_rope_2d", dict(x=torch.randn(5, 2, 10)), ValueError, "^x: head_dim"),
    "rope-pos-int64": ("apply_rope_2d", dict(pos=lambda a: a["pos"].long()), TypeError, "^pos .*int32"),
    "rope-pos-float": ("apply_rope_2d", dict(pos=lambda a: a["pos"].float()), TypeError, "^pos "),
    "rope-pos-rows": ("apply_rope_2d", dict(pos=torch.zeros(4, 2, dtype=torch.int32)), ValueError, "^pos .*shape"),
    "rope-pos-columns": ("apply_rope_2d", dict(pos=torch.zeros(5, 3, dtype=torch.int32)), ValueError, "^pos .*shape"),
    "rope-pos-stride": ("apply_rope_2d", dict(pos=torch.zeros(5, 4, dtype=torch.int32)[:, ::2]),
        ValueError, "^pos .*stride"),
    "rope-theta-negative": ("apply_rope_2d", dict(theta=-1.0), ValueError, "^theta "),
    "rope-theta-str": ("apply_rope_2d", dict(theta="1e4"), TypeError, "^theta "),
    "rope-theta-inf": ("apply_rope_2d", dict(theta=float("inf")), ValueError, "^theta must be finite"),
    "rope-theta-nan": ("apply_rope_2d", dict(theta=float("nan")), ValueError, "^theta "),
    # patch_merge
    "merge-x-int": ("patch_merge", dict(x=lambda a: a["x"].long()), TypeError, "^x "),
    "merge-x-3d": ("patch_merge", dict(x=torch.randn(12, 1, 6)), ValueError, "^x "),
    "merge-x-stride": ("patch_merge", dict(x=strided(12, 6)), ValueError, "^x .*unit stride"),
    "merge-tokens": ("patch_merge", dict(x=torch.randn(10, 6)), ValueError, "^x: 10 tokens .*merge_size"),
    "merge-tokens-m3": ("patch_merge", dict(merge_size=3, w1=torch.randn(10, 54)),
        ValueError, "^x: 12 tokens .*merge_size"),
    "merge-size-zero": ("patch_merge", dict(merge_size=0), ValueError, "^merge_size "),
    "merge-size-float": ("patch_merge", dict(merge_size=2.0), TypeError, "^merge_size "),
    "merge-size-bool": ("patch_merge", dict(merge_size=True), TypeError, "^merge_size "),
    "merge-size-huge": ("patch_merge", dict(merge_size=2**40), ValueError, "^merge_size "),
    "merge-norm-unknown": ("patch_merge", dict(norm="batchnorm"), ValueError, "^norm "),
    "merge-norm-rms-with-bias": ("patch_merge", dict(norm="rmsnorm"), ValueError, "^ln_b .*rmsnorm"),
    "merge-norm-ln-without-bias": ("patch_merge", dict(ln_b=None), ValueError, "^ln_b .*layernorm"),
    "merge-ln-w-shape": ("patch_merge", dict(ln_w=torch.randn(5)), ValueError, "^ln_w .*shape"),
    "merge-ln-w-list": ("patch_merge", dict(ln_w=[1.0] * 6), TypeError, "^ln_w "),
    "merge-ln-b-shape": ("patch_merge", dict(ln_b=torch.randn(6, 1)), ValueError, "^ln_b .*shape"),
    "merge-ln-b-dtype": ("patch_merge", dict(ln_b=lambda a: a["ln_b"].half()), TypeError, "^ln_b .*dtype"),
    "merge-w1-shape": ("patch_merge", dict(w1=torch.randn(10, 6)), ValueError, "^w1 .*shape"),
    "merge-w1-1d": ("patch_merge", dict(w1=torch.randn(240)), ValueError, "^w1 .*shape"),
    "merge-w1-stride": ("patch_merge", dict(w1=strided(10, 24)), ValueError, "^w1 .*stride"),
    "merge-b1-shape": ("patch_merge", dict(b1=torch.randn(11)), ValueError, "^b1 .*shape"),
    "merge-w2-shape": ("patch_merge", dict(w2=torch.randn(3, 11)), ValueError, "^w2 .*shape"),
    "merge-b2-shape": ("patch_merge", dict(b2=torch.randn(4)), ValueError, "^b2 .*shape"),
    "merge-b2-dtype": ("patch_merge", dict(b2=lambda a: a["b2"].double()), TypeError, "^b2 .*dtype"),
    "merge-b2-int": ("patch_merge", dict(b2=torch.zeros(3, dtype=torch.int32)), TypeError, "^b2 .*dtype"),
    "merge-eps": ("patch_merge", dict(eps=0.0), ValueError, "^eps "),
    "merge-eps-inf": ("patch_merge", dict(eps=float("inf")), ValueError, "^eps must be finite"),
    "merge-eps-nan": ("patch_merge", dict(eps=float("nan")), ValueError, "^eps "),
    # spatial_attention_pool
    "sap-x-int": ("spatial_attention_pool", dict(x=lambda a: a["x"].int()), TypeError, "^x "),
    "sap-x-1d": ("spatial_attention_pool", dict(x=torch.randn(39)), ValueError, "^x "),
    "sap-x-stride": ("spatial_attention_pool", dict(x=strided(39, 6)), ValueError, "^x .*unit stride"),
    "sap-grid-float": ("spatial_attention_pool", dict(grid_hw=torch.tensor([[5.0, 7.0], [1.0, 4.0]])),
        TypeError, "^grid_hw "),
    "sap-grid-columns": ("spatial_attention_pool", dict(grid_hw=torch.tensor([[1, 5, 7], [1, 1, 4]])),
        ValueError, "^grid_hw "),
    "sap-grid-1d": ("spatial_attention_pool", dict(grid_hw=torch.tensor([5, 7])), ValueError, "^grid_hw "),
    "sap-grid-zero": ("spatial_attention_pool", dict(grid_hw=torch.tensor([[5, 7], [0, 4], [1, 4]])),
        ValueError, "^grid_hw .*positive"),
    "sap-grid-negative": ("spatial_attention_pool", dict(grid_hw=torch.tensor([[-5, -7], [1, 4]])),
        ValueError, "^grid_hw .*positive"),
    "sap-grid-total": ("spatial_attention_pool", dict(grid_hw=torch.tensor([[5, 7], [1, 3]])),
        ValueError, "^grid_hw covers 38 tokens"),
    "sap-grid-str": ("spatial_attention_pool", dict(grid_hw="5x7"), TypeError, "^grid_hw "),
    "sap-grid-list-triples": ("spatial_attention_pool", dict(grid_hw=[(1, 5, 7), (1, 1, 4)]), ValueError, "^grid_hw "),
    "sap-grid-list-floats": ("spatial_attention_pool", dict(grid_hw=[(5.0, 7.0), (1.0, 4.0)]), TypeError, "^grid_hw "),
    "sap-grid-list-zero": ("spatial_attention_pool", dict(grid_hw=[(5, 7), (1, 4), (0, 3)]),
        ValueError, "^grid_hw .*positive"),
    "sap-grid-list-total": ("spatial_attention_pool", dict(grid_hw=[(5, 7)]), ValueError, "^grid_hw covers 35 tokens"),
    "sap-window-zero": ("spatial_attention_pool", dict(window=0), ValueError, "^window "),
    "sap-window-negative": ("spatial_attention_pool", dict(window=-3), ValueError, "^window "),
    "sap-window-float": ("spatial_attention_pool", dict(window=3.0), TypeError, "^window "),
    "sap-window-tensor": ("spatial_attention_pool", dict(window=torch.tensor(3)), TypeError, "^window "),
    "sap-window-huge": ("spatial_attention_pool", dict(window=2**31), ValueError, "^window "),
    "sap-grid-huge": ("spatial_attention_pool", dict(grid_hw=[(2**40, 2**40)]), ValueError, "^grid_hw covers"),
    "sap-w1-shape": ("spatial_attention_pool", dict(w1=torch.randn(5, 7)), ValueError, "^w1 .*shape"),
    "sap-w1-dtype": ("spatial_attention_pool", dict(w1=lambda a: a["w1"].half()), TypeError, "^w1 .*dtype"),
    "sap-b1-shape": ("spatial_attention_pool", dict(b1=torch.randn(6)), ValueError, "^b1 .*shape"),
    "sap-w2-shape": ("spatial_attention_pool", dict(w2=torch.randn(2, 5)), ValueError, "^w2 .*shape"),
    "sap-w2-1d": ("spatial_attention_pool", dict(w2=torch.randn(5)), ValueError, "^w2 .*shape"),
    "sap-b2-shape": ("spatial_attention_pool", dict(b2=torch.randn(())), ValueError, "^b2 .*shape"),
    "sap-b2-none": ("spatial_attention_pool", dict(b2=None), TypeError, "^b2 "),
    # deepstack_add
    "deep-hidden-1d": ("deepstack_add", dict(hidden=torch.randn(8)), ValueError, "^hidden "),
    "deep-hidden-int": ("deepstack_add", dict(hidden=lambda a: a["hidden"].int()), TypeError, "^hidden "),
    "deep-hidden-stride": ("deepstack_add", dict(hidden=strided(2, 5, 8)), ValueError, "^hidden .*unit stride"),
    "deep-index-float": ("deepstack_add", dict(index=torch.tensor([7.0, 0.0, 3.0])), TypeError, "^index "),
    "deep-index-list": ("deepstack_add", dict(index=[7, 0, 3]), TypeError, "^index "),
    "deep-index-2d": ("deepstack_add", dict(index=torch.tensor([[7, 0, 3]])), ValueError, "^index "),
    "deep-index-stride": ("deepstack_add", dict(index=torch.tensor([7, 1, 0, 1, 3])[::2]),
        ValueError, "^index .*stride"),
    "deep-index-high": ("deepstack_add", dict(index=torch.tensor([7, 10, 3])),
        ValueError, "^index must lie in \\[0, 10\\)"),
    "deep-index-negative": ("deepstack_add", dict(index=torch.tensor([7, -1, 3])), ValueError, "^index must lie"),
    "deep-index-repeat": ("deepstack_add", dict(index=torch.tensor([7, 3, 7])), ValueError, "^index must not repeat"),
    "deep-stacked-rows": ("deepstack_add", dict(stacked=torch.randn(4, 8)), ValueError, "^stacked .*shape"),
    "deep-stacked-channels": ("deepstack_add", dict(stacked=torch.randn(3, 9)), ValueError, "^stacked .*shape"),
    "deep-stacked-3d": ("deepstack_add", dict(stacked=torch.randn(1, 3, 8)), ValueError, "^stacked "),
    "deep-stacked-dtype": ("deepstack_add", dict(stacked=lambda a: a["stacked"].double()),
        TypeError, "^stacked .*dtype"),
    "deep-stacked-stride": ("deepstack_add", dict(stacked=strided(3, 8)), ValueError, "^stacked .*stride"),
    # deepstack_groups, deepstack_index
    "groups-x-list": ("deepstack_groups", dict(x=[[0.0] * 3] * 16), TypeError, "^x "),
    "groups-x-3d": ("deepstack_groups", dict(x=torch.randn(16, 3, 1)), ValueError, "^x "),
    "groups-x-tokens": ("deepstack_groups", dict(x=torch.randn(12, 3)), ValueError, "^grid_thw covers 16 .* x has 12"),
    "groups-grid-float": ("deepstack_groups", dict(grid_thw=torch.tensor([[1.0, 4.0, 8.0]])), TypeError, "^grid_thw "),
    "groups-grid-multiple": ("deepstack_groups", dict(grid_thw=torch.tensor([[1, 4, 8], [2, 2, 8]])),
        ValueError, "^grid_thw h and w"),
    "groups-order": ("deepstack_groups", dict(order="raster"), ValueError, "^order "),
    "index-grid-zero": ("deepstack_index", dict(grid_thw=torch.tensor([[0, 4, 8]])),
        ValueError, "^grid_thw .*positive"),
    "index-grid-columns": ("deepstack_index", dict(grid_thw=torch.tensor([[4, 8]])), ValueError, "^grid_thw "),
    "index-order": ("deepstack_index", dict(order=None), ValueError, "^order "),
    # vision_positions
    "pos-grid-list": ("vision_positions", dict(grid_thw=[[1, 4, 6]]), TypeError, "^grid_thw "),
    "pos-grid-float": ("vision_positions", dict(grid_thw=torch.tensor([[1.0, 4.0, 6.0]])), TypeError, "^grid_thw "),
    "pos-grid-1d": ("vision_positions", dict(grid_thw=torch.tensor([1, 4, 6])), ValueError, "^grid_thw "),
    "pos-grid-columns": ("vision_positions", dict(grid_thw=torch.tensor([[4, 6]])), ValueError, "^grid_thw "),
    "pos-grid-zero": ("vision_positions", dict(grid_thw=torch.tensor([[1, 4, 6], [0, 2, 2]])),
        ValueError, "^grid_thw .*positive"),
    "pos-grid-negative": ("vision_positions", dict(grid_thw=torch.tensor([[1, -4, 6]])),
        ValueError, "^grid_thw .*positive"),
    "pos-grid-merge": ("vision_positions", dict(grid_thw=torch.tensor([[1, 4, 6], [1, 3, 2]])),
        ValueError, "^grid_thw: .*merge_size"),
    "pos-merge-size-zero": ("vision_positions", dict(merge_size=0), ValueError, "^merge_size "),
    "pos-merge-size-float": ("vision_positions", dict(merge_size=2.0), TypeError, "^merge_size "),
    "pos-grid-huge": ("vision_positions", dict(grid_thw=torch.tensor([[1, 2**20, 2**20]])), ValueError, "^grid_thw covers"),
}

CASES.update({
    name.replace("deep-", "deep_-"): ("deepstack_add_", *case[1:]) for name, case in CASES.items() if case[0] == "deepstack_add"
})


def call(op, changes=None):
    args = OPS[op][1]()
    for name, value in (changes or {}).items():
        args[name] = value(args) if callable(value) else value
    return call_with(op, args)


def call_with(op, args):
    return OPS[op][0](**args)


@pytest.mark.parametrize("op", OPS)
def test_valid_call_passes(op):
    out = call(op)
    assert isinstance(out, torch.Tensor) and out.numel() > 0


@pytest.mark.parametrize("case", CASES)
def test_bad_input_names_the_argument(case):
    op, changes, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call(op, changes)


def test_every_op_is_covered():
    assert {name.split("-")[0] for name in OPS} == set(fastvl.ops.__all__)
    assert {op for op, *_ in CASES.values()} == set(OPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a CUDA device")
@pytest.mark.parametrize(
    "op, name, match",
    [
        ("varlen_attention", "k", "^k must be on"), ("varlen_attention", "cu_seqlens_q", "^cu_seqlens_q must be on"),
        ("varlen_attention-cross", "cu_seqlens_k", "^cu_seqlens_k must be on"),
        ("apply_rope_2d", "pos", "^pos must be on"), ("patch_merge", "w1", "^w1 must be on"),
        ("spatial_attention_pool", "b2", "^b2 must be on"), ("deepstack_add", "index", "^index must be on"),
        ("deepstack_add", "stacked", "^stacked must be on"),
    ],
)
def test_wrong_device_names_the_argument(op, name, match):
    fn, make = OPS[op]
    args = {key: value.cuda() if isinstance(value, torch.Tensor) and key != name else value for key, value in make().items()}
    with pytest.raises(ValueError, match=match):
        fn(**args)


# ---- inputs the Triton kernels do not cover: the reference runs them (warning once), or a forced 'triton' refuses

BF16_CASES = {  # op -> argument the refusal names
    "varlen_attention": "q", "apply_rope_2d": "x", "patch_merge": "x", "spatial_attention_pool": "x",
    "deepstack_add": "hidden", "deepstack_add_": "hidden",
}


def bf16(op):
    """The valid arguments of ``op`` in bfloat16 (a fresh copy per call)."""
    torch.manual_seed(0)
    return {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in OPS[op][1]().items()}


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fastvl._backend, "_warned", set())


@pytest.mark.parametrize("dim", [8, 16, 48])
def test_reference_runs_any_head_dim(dim):
    args = {name: t.double() for name, t in head_dim(dim).items()}
    cu = cu_seqlens([3, 4])
    out = fastvl.varlen_attention(**args, cu_seqlens_q=cu, causal=True)
    assert_close(out, reference.varlen_attention(*args.values(), cu, causal=True))


def test_forced_triton_names_what_it_does_not_cover(triton_backend):
    with pytest.raises(ValueError, match=r"^q: head_dim 48 has no Triton kernel \(head dims \(64, 72, 80, 96, 128\)\)"):
        fastvl.varlen_attention(**head_dim(48), cu_seqlens_q=cu_seqlens([3, 4]))
    if not fastvl._backend.interpreting():
        return
    for op, name in BF16_CASES.items():
        with pytest.raises(TypeError, match=f"^{name}: bfloat16 on CPU"):
            call_with(op, bf16(op))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the automatic backend runs CPU tensors in the interpreter")
def test_automatic_backend_runs_the_reference_and_warns_once(fresh_warnings):
    def head_dim_16():
        torch.manual_seed(0)
        return {**attention_args(), **head_dim(16)}

    # deepstack_add_ shares deepstack_add's kernel, hence its (already given) warning
    cases = [(op, lambda op=op: bf16(op)) for op in BF16_CASES if op != "deepstack_add_"]
    cases.append(("varlen_attention", head_dim_16))
    for op, make in cases:
        with fastvl.use_backend("reference"):
            expected = call_with(op, make())
        with fastvl.use_backend(None):
            with pytest.warns(fastvl.FallbackWarning, match=f"^{op}: .*running the reference"):
                out = call_with(op, make())
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once
                call_with(op, make())
        assert torch.equal(out, expected), op
