"""The native CPU backend: fastvl._C (CMakeLists.txt, csrc/), built by ``pip install -e .`` unless
FASTVL_NATIVE=0. ``module(op)`` has the interface of the op's Triton kernel module (fastvl.kernels.<op>),
so the ops in fastvl/ops call either alike."""
from types import SimpleNamespace

import torch

try:
    from . import _C
    ERROR = None
except ImportError as exc:  # not built (FASTVL_NATIVE=0), or built against another torch
    _C, ERROR = None, exc


def available() -> bool:
    return _C is not None


def _apply_rope_2d(x, pos, theta, inverse):
    return _C.apply_rope_2d(x, pos, theta, inverse)


def _attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta):
    """(out, lse, q, k): RoPE is applied inside the loops, so the backward takes q and k as given."""
    out, lse = _C.varlen_attention_fwd(q, k, v, cu_q, cu_k, causal, scale, rope_pos, theta)
    return out, lse, q, k


def _attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta,
                        deterministic=True):
    """Deterministic whatever ``deterministic`` says (no atomics)."""
    return _C.varlen_attention_bwd(grad, q, k, v, out, lse, cu_q, cu_k, causal, scale, rope_pos, theta)


def _merge_forward(x, ln_w, ln_b, w1, b1, w2, b2, merge_size, eps, norm, save=False):
    return _C.patch_merge_fwd(x, ln_w, ln_b, w1, b1, w2, b2, merge_size, eps, norm == "rmsnorm", save)


def _merge_backward(grad, x, ln_w, ln_b, w1, b1, w2, b2, pre, act, merge_size, eps, norm):
    dx, dln_w, dln_b, dw1, db1, dw2, db2 = _C.patch_merge_bwd(
        grad, x, ln_w, ln_b, w1, w2, pre, act, merge_size, eps, norm == "rmsnorm")
    return dx, dln_w, None if ln_b is None else dln_b, dw1, db1, dw2, db2


def _sap_forward(x, grid_hw, w1, b1, w2, b2, window, num_windows):
    return _C.sap_fwd(x, grid_hw, w1, b1, w2, b2, window, num_windows)


def _sap_backward(grad, x, grid_hw, w1, b1, w2, b2, window, num_windows, scores, need_dx):
    return tuple(_C.sap_bwd(grad, x, grid_hw, w1, b1, w2, window, num_windows, scores, need_dx))


def _deepstack_add(hidden, index, stacked, inplace=False):
    if not inplace:
        hidden = hidden.clone(memory_format=torch.contiguous_format)
    _C.deepstack_add_(hidden, index, stacked)
    return hidden


MODULES = {
    "apply_rope_2d": SimpleNamespace(forward=_apply_rope_2d),
    "varlen_attention": SimpleNamespace(forward=_attention_forward, backward=_attention_backward),
    "patch_merge": SimpleNamespace(forward=_merge_forward, backward=_merge_backward),
    "spatial_attention_pool": SimpleNamespace(forward=_sap_forward, backward=_sap_backward),
    "deepstack_add": SimpleNamespace(forward=_deepstack_add),
}


def module(name):
    """The native kernels of op ``name``, or None (not built, or no native kernel for it)."""
    return MODULES.get(name) if _C is not None else None
