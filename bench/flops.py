"""FLOPs of a whole model with ``torch.utils.flop_counter.FlopCounterMode``, attention included on every device.

FlopCounterMode sees each ``torch.ops.fastvl`` op as one call (its kernel or reference runs below the
mode) and has no formula for them, nor for the CPU SDPA kernel (it counts 0 there); ``FORMULAS`` adds
them. Conventions are torch's: matrix products only (2 per multiply-add), attention as the full score
matrix (causal or not, as torch's SDPA formulas), backward as the products a plain implementation does
(2x a linear layer, 2.5x attention), not what a kernel recomputes.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import fastvl  # noqa: F401 - registers torch.ops.fastvl

aten = torch.ops.aten


def _raw(formula):
    """Mark a formula as taking the tensors themselves (cu_seqlens values), not their shapes."""
    formula._get_raw = True
    return formula


def _bind(op, args, kwargs):
    """The op's arguments by their schema names."""
    names = [a.name for a in op.default._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def _pairs(cu_q, cu_k):
    """sum over segments of Lq * Lk."""
    lq, lk = cu_q.diff().tolist(), cu_k.diff().tolist()
    return sum(a * b for a, b in zip(lq, lk))


@_raw
def varlen_attention(*args, out_val=None, **kwargs):
    a = _bind(torch.ops.fastvl.varlen_attention, args, kwargs)
    q = a["q"]
    return 4 * _pairs(a["cu_q"], a["cu_k"]) * q.shape[1] * q.shape[2]


@_raw
def varlen_attention_backward(*args, out_val=None, **kwargs):
    a = _bind(torch.ops.fastvl.varlen_attention_backward, args, kwargs)
    q = a["q"]
    return 10 * _pairs(a["cu_q"], a["cu_k"]) * q.shape[1] * q.shape[2]


def _mlp(x_rows, *weights):
    return sum(2 * x_rows * w.shape[0] * w.shape[1] for w in weights)


@_raw
def patch_merge(*args, out_val=None, **kwargs):
    a = _bind(torch.ops.fastvl.patch_merge, args, kwargs)
    return _mlp(a["x"].shape[0] // a["merge_size"] ** 2, a["w1"], a["w2"])


@_raw
def patch_merge_backward(*args, out_val=None, **kwargs):
    a = _bind(torch.ops.fastvl.patch_merge_backward, args, kwargs)
    return 2 * _mlp(a["x"].shape[0] // a["merge_size"] ** 2, a["w1"], a["w2"])


@_raw
def spatial_attention_pool(*args, out_val=None, **kwargs):
    a = _bind(torch.ops.fastvl.spatial_attention_pool, args, kwargs)
    return _mlp(a["x"].shape[0], a["w1"], a["w2"])


@_raw
def spatial_attention_pool_backward(*args, out_val=None, **kwargs):
    a = _bind(torch.ops.fastvl.spatial_attention_pool_backward, args, kwargs)
    return (2 if a.get("need_dx", True) else 1) * _mlp(a["x"].shape[0], a["w1"], a["w2"])


@_raw
def no_matmul(*args, out_val=None, **kwargs):
    return 0


def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


FORMULAS = {
    torch.ops.fastvl.varlen_attention: varlen_attention,
    torch.ops.fastvl.varlen_attention_backward: varlen_attention_backward,
    torch.ops.fastvl.patch_merge: patch_merge,
    torch.ops.fastvl.patch_merge_backward: patch_merge_backward,
    torch.ops.fastvl.spatial_attention_pool: spatial_attention_pool,
    torch.ops.fastvl.spatial_attention_pool_backward: spatial_attention_pool_backward,
    torch.ops.fastvl.deepstack_add: no_matmul,
    torch.ops.fastvl.deepstack_add_: no_matmul,
    torch.ops.fastvl.apply_rope_2d: no_matmul,
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
}


def counter():
    """A silent FlopCounterMode that knows the fastvl ops and CPU SDPA."""
    return FlopCounterMode(display=False, custom_mapping=FORMULAS)


def count(fn):
    """(result of ``fn()``, FLOPs it did)."""
    with counter() as mode:
        result = fn()
    return result, mode.get_total_flops()
