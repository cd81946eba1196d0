"""Every public op rejects bad input with a ValueError/TypeError that names the argument.

Each case changes one argument of a valid call (test_valid_call_passes checks the valid calls), so the
error can only come from that argument.
"""
import inspect
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastvl
from fastvl import reference
from fastvl.testing import TOLERANCE, assert_close, cu_seqlens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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
    "attn-scale-float32-max": ("varlen_attention", dict(softmax_scale=3.5e38), ValueError,
        r"^softmax_scale must be in \[2\*\*-126, 3\.4028234663852886e\+38\] \(float32's normal range\), got 3\.5e"),
    "attn-scale-float32-tiny": ("varlen_attention", dict(softmax_scale=1e-39), ValueError,
        r"^softmax_scale must be in \[2\*\*-126, .*got 1e-39"),
    "attn-theta-zero": ("varlen_attention", dict(rope_theta=0.0), ValueError, "^rope_theta "),
    "attn-theta-inf": ("varlen_attention", dict(rope_theta=float("inf")), ValueError, "^rope_theta must be finite"),
    "attn-theta-tiny": ("varlen_attention", dict(rope_theta=2.0**-97), ValueError, r"^rope_theta must be >= 2\*\*-96"),
    "attn-rope-int64": ("varlen_attention", dict(rope_pos=torch.zeros(7, 2, dtype=torch.int64)),
        TypeError, "^rope_pos .*int32"),
    "attn-rope-float": ("varlen_attention", dict(rope_pos=torch.zeros(7, 2)), TypeError, "^rope_pos "),
    "attn-rope-columns": ("varlen_attention", dict(rope_pos=torch.zeros(7, 3, dtype=torch.int32)),
        ValueError, "^rope_pos .*shape"),
    "attn-rope-rows": ("varlen_attention", dict(rope_pos=torch.zeros(6, 2, dtype=torch.int32)),
        ValueError, "^rope_pos .*shape"),
    "attn-rope-1d": ("varlen_attention", dict(rope_pos=torch.zeros(14, dtype=torch.int32)), ValueError, "^rope_pos "),
    "attn-rope-head-dim": ("varlen_attention", dict(**head_dim(6), rope_pos=torch.zeros(7, 2, dtype=torch.int32)),
        ValueError, "^rope_pos: 2D RoPE needs a head_dim multiple of 4"),
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
    "rope-theta-tiny": ("apply_rope_2d", dict(theta=1e-30), ValueError, r"^theta must be >= 2\*\*-96 .*got 1e-30"),
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
    "merge-eps-float32-tiny": ("patch_merge", dict(eps=1e-300), ValueError, r"^eps must be in \[2\*\*-126, .*got 1e-300"),
    "merge-eps-float32-max": ("patch_merge", dict(eps=1e300), ValueError, r"^eps must be in \[2\*\*-126, .*got 1e\+300"),
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


# ---- classes of hostile input, generated: each op returns what the reference returns (the automatic backend: the
# kernels, in the interpreter on CPU) or raises a ValueError/TypeError naming one of its arguments

INT_VALUES = [0, -1, 1, 2**31 - 1, 2**31, 2**63, 2**70, -2**70, True, 2.0, "2", None, np.int64(3), torch.tensor(2)]
FLOAT_VALUES = [0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e-300, 1e300, 10**400, True, "1", None, np.float32(0.5),
                torch.tensor(0.5)]
OTHER_VALUES = [None, "", 0, 1, "x", 3.5, np.bool_(True)]
SCALARS = {  # the non-tensor arguments of each op
    "varlen_attention": ("max_seqlen_q", "max_seqlen_k", "causal", "softmax_scale", "rope_theta"),
    "varlen_attention-rope": ("max_seqlen_q", "causal", "softmax_scale", "rope_theta"),
    "varlen_attention-cross": ("max_seqlen_q", "max_seqlen_k", "causal"),
    "apply_rope_2d": ("theta",), "patch_merge": ("merge_size", "eps", "norm"), "spatial_attention_pool": ("window",),
    "deepstack_add": (), "deepstack_add_": (), "deepstack_groups": ("order",), "deepstack_index": ("order",),
    "vision_positions": ("merge_size",),
}
INT_SCALARS = {"max_seqlen_q", "max_seqlen_k", "merge_size", "window"}
FLOAT_SCALARS = {"softmax_scale", "rope_theta", "theta", "eps"}
DTYPES = [torch.bool, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
          torch.float64, torch.complex64]
EXTREMES = [2**31 - 1, -2**31, -1, 0, 1000]


def rope_attention_args():
    return {**attention_args(), "rope_pos": torch.randint(0, 50, (7, 2), dtype=torch.int32)}


HOSTILE_OPS = {**OPS, "varlen_attention-rope": (fastvl.varlen_attention, rope_attention_args)}


def tensor_mutations(t):
    """name -> callable(t) of the ways a tensor argument goes wrong (or stays valid in an unusual layout)."""
    out = {"none": lambda t: None, "list": lambda t: t.tolist(), "numpy": lambda t: t.numpy(),
           "unsqueeze": lambda t: t[None], "flatten": lambda t: t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1),
           "last-stride": lambda t: torch.stack([t, t], -1).flatten(-2)[..., ::2] if t.dim() else t,
           "first-stride": lambda t: torch.stack([t, t], 1).flatten(0, 1)[::2] if t.dim() else t,
           "expanded": lambda t: t[:1].expand(t.shape) if t.dim() and t.shape[0] else t}
    out.update({f"dtype-{str(d)[6:]}": lambda t, d=d: t.to(d) for d in DTYPES})
    for d in range(t.dim()):
        out[f"empty-{d}"] = lambda t, d=d: t.narrow(d, 0, 0)
        out[f"grow-{d}"] = lambda t, d=d: torch.cat([t, t.narrow(d, 0, min(1, t.shape[d]))], d)
    if not t.is_floating_point() and t.numel():
        out.update({f"value-{v}": lambda t, v=v: t.flatten().index_fill(0, torch.tensor([t.numel() // 2]), v)
                    .view(t.shape) for v in EXTREMES})
    return out


def tensor_cases(op):
    """(argument, mutation name, callable) of every class of hostile tensor input for op."""
    return [(name, m, fn) for name, value in HOSTILE_OPS[op][1]().items() if isinstance(value, torch.Tensor)
            for m, fn in tensor_mutations(value).items()]


def scalar_cases(op):
    """(argument, repr, value) of every hostile value of op's non-tensor arguments."""
    return [(name, repr(v), v) for name in SCALARS[op]
            for v in (INT_VALUES if name in INT_SCALARS else FLOAT_VALUES if name in FLOAT_SCALARS else OTHER_VALUES)]


def outcome(op, args):
    """The op's result, or the class of the ValueError/TypeError it raised (which must name an argument)."""
    fn = HOSTILE_OPS[op][0]
    names = "|".join(inspect.signature(fn).parameters)
    try:
        return fn(**args)
    except (ValueError, TypeError) as exc:
        assert re.match(rf"^({names})\b", str(exc)), f"{op}: the error names no argument: {exc}"
        return ValueError


def assert_same_outcome(op, out, ref):
    """out (automatic backend) as ref (reference backend): both named errors, or the same values."""
    if ref is ValueError or out is ValueError:
        assert out is ref, f"{op}: {'only the reference' if ref is ValueError else 'only the kernel'} raised"
        return
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{op}: {out.shape} {out.dtype} vs {ref.shape} {ref.dtype}"
    out = out.cpu()
    if not ref.is_floating_point():
        assert torch.equal(out, ref), op
        return
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), f"{op}: non-finite values differ from the reference"
    assert_close(out[finite], ref[finite], tol=TOLERANCE[ref.dtype] if ref.dtype != torch.float32 else 1e-4, name=op)


def run_both(op, make):
    """``make()`` builds fresh arguments (the in-place op changes them) for each backend."""
    with fastvl.use_backend("reference"):
        ref = outcome(op, make())
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make().items()}
    with fastvl.use_backend(None), warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvl.FallbackWarning)
        out = outcome(op, args)
    assert_same_outcome(op, out, ref)


# FASTVL_HOSTILE_EXAMPLES=500 (and derandomised no more: a new seed each run) explores further than CI does
HOSTILE = settings(max_examples=int(os.environ.get("FASTVL_HOSTILE_EXAMPLES", 12)), deadline=None,
                   derandomize="FASTVL_HOSTILE_EXAMPLES" not in os.environ, database=None,
                   suppress_health_check=list(HealthCheck))


def changed(op, name, change):
    """make() of op's valid call with ``name`` replaced by ``change`` (a value, or a callable of the old value)."""
    def make():
        torch.manual_seed(0)
        args = HOSTILE_OPS[op][1]()
        args[name] = change(args[name]) if callable(change) and not isinstance(change, torch.Tensor) else change
        return args
    return make


@pytest.mark.parametrize("op", HOSTILE_OPS)
@HOSTILE
@given(data=st.data())
def test_hostile_arguments(op, data):
    """One tensor argument of a valid call replaced by a member of a hostile class: a wrong type or dtype, an empty
    or grown dimension, a strided or expanded (stride 0) layout, an extreme integer."""
    name, mutation, change = data.draw(st.sampled_from(tensor_cases(op)), label="case")
    run_both(op, changed(op, name, change))


@pytest.mark.parametrize("op, name, value", [pytest.param(op, name, value, id=f"{op}-{name}={r}")
                                             for op in HOSTILE_OPS for name, r, value in scalar_cases(op)])
def test_hostile_scalars(op, name, value):
    """Every hostile value of every non-tensor argument (a wrong type, zero, non-finite, tiny or huge), in every
    run: most are refused before any kernel runs, so all of them take seconds."""
    run_both(op, changed(op, name, value))


def _floats(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _lengths(draw, most=3):
    return draw(st.lists(st.integers(0, 9), max_size=most))


def degenerate_attention(draw, dtype):
    q_lengths = _lengths(draw)
    cross = draw(st.booleans())
    k_lengths = [draw(st.integers(0, 9)) for _ in q_lengths] if cross else q_lengths
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(0, 2))  # group 0: q without heads
    dim = draw(st.sampled_from([1, 4, 8, 64, 80]))
    tq, tk = sum(q_lengths), sum(k_lengths)
    args = dict(q=_floats(tq, kv_heads * group, dim, dtype=dtype), k=_floats(tk, kv_heads, dim, dtype=dtype),
                v=_floats(tk, kv_heads, dim, dtype=dtype), cu_seqlens_q=cu_seqlens(q_lengths),
                causal=draw(st.booleans()))
    if cross:
        args["cu_seqlens_k"] = cu_seqlens(k_lengths)
    elif dim % 4 == 0 and draw(st.booleans()):
        args["rope_pos"] = torch.randint(0, 30, (tq, 2), dtype=torch.int32)
    return args


def degenerate_rope(draw, dtype):
    tokens, heads, dim = draw(st.integers(0, 9)), draw(st.integers(0, 3)), draw(st.sampled_from([4, 8, 12, 64]))
    return dict(x=_floats(tokens, heads, dim, dtype=dtype), pos=torch.randint(0, 30, (tokens, 2), dtype=torch.int32))


def degenerate_merge(draw, dtype):
    m, rows, channels = draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 9))
    hidden, out = draw(st.integers(1, 7)), draw(st.integers(1, 5))
    norm = draw(st.sampled_from(["layernorm", "rmsnorm"]))
    return dict(x=_floats(rows * m * m, channels, dtype=dtype), ln_w=_floats(channels, dtype=dtype),
                ln_b=_floats(channels, dtype=dtype) if norm == "layernorm" else None,
                w1=_floats(hidden, m * m * channels, dtype=dtype), b1=_floats(hidden, dtype=dtype),
                w2=_floats(out, hidden, dtype=dtype), b2=_floats(out, dtype=dtype), merge_size=m, norm=norm)


def degenerate_sap(draw, dtype):
    grids = draw(st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), max_size=3))
    channels, hidden = draw(st.integers(1, 9)), draw(st.integers(1, 7))
    tokens = sum(h * w for h, w in grids)
    return dict(x=_floats(tokens, channels, dtype=dtype), grid_hw=torch.tensor(grids, dtype=torch.int64).reshape(-1, 2),
                w1=_floats(hidden, channels, dtype=dtype), b1=_floats(hidden, dtype=dtype),
                w2=_floats(1, hidden, dtype=dtype), b2=_floats(1, dtype=dtype), window=draw(st.integers(1, 8)))


def degenerate_deepstack(draw, dtype):
    batch, length, channels = draw(st.integers(1, 3)), draw(st.integers(0, 6)), draw(st.integers(1, 9))
    count = draw(st.integers(0, batch * length))
    return dict(hidden=_floats(batch, length, channels, dtype=dtype), index=torch.randperm(batch * length)[:count],
                stacked=_floats(count, channels, dtype=dtype))


def _grid(draw, multiple):
    return torch.tensor(draw(st.lists(st.tuples(st.integers(1, 2), st.integers(1, 3).map(lambda v: v * multiple),
                                                st.integers(1, 3).map(lambda v: v * multiple)), max_size=3)),
                        dtype=torch.int64).reshape(-1, 3)


def degenerate_groups(draw, dtype):
    grid = _grid(draw, 4)
    return dict(x=_floats(int(grid.prod(-1).sum()) // 4, draw(st.integers(0, 5)), dtype=dtype), grid_thw=grid,
                order=draw(st.sampled_from(["spatial", "slimm"])))


def degenerate_positions(draw, dtype):
    m = draw(st.integers(1, 3))
    return dict(grid_thw=_grid(draw, m), merge_size=m)


DEGENERATE = {
    "varlen_attention": degenerate_attention, "apply_rope_2d": degenerate_rope, "patch_merge": degenerate_merge,
    "spatial_attention_pool": degenerate_sap, "deepstack_add": degenerate_deepstack,
    "deepstack_add_": degenerate_deepstack, "deepstack_groups": degenerate_groups,
    "deepstack_index": lambda draw, dtype: {k: v for k, v in degenerate_groups(draw, dtype).items() if k != "x"},
    "vision_positions": degenerate_positions,
}


@pytest.mark.parametrize("op", DEGENERATE)
@HOSTILE
@given(data=st.data())
def test_empty_and_degenerate_shapes(op, data):
    """Valid calls at the edges of the contract (no segments or empty ones, zero heads or tokens, one channel,
    windows larger than the grid, head dims without a kernel) in every dtype: the reference's result."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), label="dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    args = DEGENERATE[op](data.draw, dtype)

    def make():
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}

    run_both(op, make)


def test_every_op_has_hostile_and_degenerate_cases():
    assert {name.split("-")[0] for name in HOSTILE_OPS} == set(DEGENERATE) == set(fastvl.ops.__all__)


# ---- dispatch: every op with a kernel reaches it on the Triton backend (the reference's numbers cannot stand in)

KERNELS = {  # op -> (kernel module, host functions a forward and backward pass must call)
    "varlen_attention": ("varlen_attention", ("forward", "backward")),
    "apply_rope_2d": ("apply_rope_2d", ("forward",)),  # its backward is the inverse rotation: forward again
    "patch_merge": ("patch_merge", ("forward", "backward")),
    "spatial_attention_pool": ("spatial_attention_pool", ("forward", "backward")),
    "deepstack_add": ("deepstack_add", ("forward",)),  # the backward is a gather
    "deepstack_add_": ("deepstack_add", ("forward",)),
}
HOST_OPS = {"deepstack_groups", "deepstack_index", "vision_positions"}  # index work on the host: no kernel


@pytest.mark.parametrize("op", KERNELS)
def test_public_op_reaches_its_kernel(op, triton_backend, monkeypatch):
    import importlib

    module, functions = KERNELS[op]
    kernel = importlib.import_module(f"fastvl.kernels.{module}")
    calls = []
    for name in functions:
        original = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _name=name, _fn=original, **k: calls.append(_name) or _fn(*a, **k))
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in OPS[op][1]().items()}
    leaves = [v.requires_grad_() for v in args.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if op == "deepstack_add_":
        args["hidden"] = args["hidden"] * 1  # in place on a non-leaf
    OPS[op][0](**args).sum().backward()
    assert set(calls) == set(functions), f"{op}: {calls} reached, expected {functions}"
    assert all(leaf.grad is not None for leaf in leaves)


def test_every_op_is_dispatched_or_host_side():
    assert set(KERNELS) | HOST_OPS == set(fastvl.ops.__all__) and not set(KERNELS) & HOST_OPS
