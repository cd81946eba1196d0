"""Public op: attention over packed variable-length segments, with optional fused 2D RoPE."""
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as check
from ._dispatch import custom_op, kernel_module, reference_vjp


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
    causal=False, softmax_scale=None, rope_pos=None, rope_theta=10000.0, deterministic=True,
):
    """softmax(q k^T * scale) v within each segment of a packed batch.

    q [Tq, H, D], k and v [Tk, Hk, D] (GQA when Hk < H, H % Hk == 0; the Triton kernels take D in
    64/72/80/96/128, other head dims run the reference);
    ``cu_seqlens_q``/``cu_seqlens_k``: int32 [B+1] segment offsets (``cu_seqlens_k`` defaults to
    ``cu_seqlens_q``). ``causal`` masks bottom-right aligned. ``softmax_scale`` (default D^-0.5) is in
    float32's normal range [2^-126, 3.4028234663852886e38]. ``rope_pos`` [Tq, 2] int32 (row, col) rotates
    q and k once inside the op (self-attention only) as ``apply_rope_2d`` does with ``rope_theta``
    (>= 2^-96). Passing ``max_seqlen_*`` avoids a device-to-host sync on CUDA; the offsets are then
    trusted. ``deterministic=False`` lets the Triton backward sum dq with atomics (faster, not bitwise
    reproducible).
    """
    check.tensor("q", q, ndim=3)
    device = q.device
    check.tensor("k", k, ndim=3, device=device)
    check.tensor("v", v, ndim=3, device=device)
    check.same_dtype("k", k, "q", q)
    check.same_dtype("v", v, "q", q)
    tq, heads, dim = q.shape
    tk, kv_heads = k.shape[0], k.shape[1]
    if dim < 1:
        raise ValueError(f"q: head_dim must be >= 1, got shape {tuple(q.shape)}")
    check.shape("k", k, (None, None, dim))
    check.shape("v", v, (tk, kv_heads, dim))
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k: its {kv_heads} heads must divide the {heads} heads of q")
    self_attention = cu_seqlens_k is None
    if self_attention and tk != tq:
        raise ValueError(f"k has {tk} tokens but q has {tq}: pass cu_seqlens_k for cross-attention")
    max_seqlen_q = check.cu_seqlens("cu_seqlens_q", cu_seqlens_q, tq, device, max_seqlen_q, "max_seqlen_q")
    if self_attention:
        cu_seqlens_k = cu_seqlens_q
        if max_seqlen_k is None:
            max_seqlen_k = max_seqlen_q
        else:
            max_seqlen_k = check.cu_seqlens("cu_seqlens_q", cu_seqlens_q, tq, device, max_seqlen_k, "max_seqlen_k")
    else:
        max_seqlen_k = check.cu_seqlens("cu_seqlens_k", cu_seqlens_k, tk, device, max_seqlen_k, "max_seqlen_k")
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            raise ValueError(f"cu_seqlens_k has {cu_seqlens_k.numel() - 1} segments, "
                             f"cu_seqlens_q {cu_seqlens_q.numel() - 1}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    scale = dim ** -0.5 if softmax_scale is None else check.scale("softmax_scale", softmax_scale)
    theta = check.rope_theta("rope_theta", rope_theta)
    if rope_pos is not None:
        check.tensor("rope_pos", rope_pos, dtypes=(torch.int32,), ndim=2, device=device)
        check.shape("rope_pos", rope_pos, (tq, 2))
        if dim % 4:
            raise ValueError(f"rope_pos: 2D RoPE needs a head_dim multiple of 4, q has {dim}")
        if not self_attention and cu_seqlens_k is not cu_seqlens_q:
            raise ValueError("rope_pos needs self-attention: leave cu_seqlens_k as None")
    out = torch.ops.fastvl.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), causal, scale, rope_pos, theta,
        deterministic,
    )[0]
    return out


def _reference(q, k, v, cu_q, cu_k, causal, scale, rope_pos, theta, return_lse=False):
    return reference.varlen_attention(
        q, k, v, cu_q, cu_k, causal=causal, softmax_scale=scale, rope_pos=rope_pos, rope_theta=theta,
        return_lse=return_lse,
    )


def _kernel(q, k, v):
    return kernel_module("varlen_attention", q, k, v, arg="q", head_dim=q.shape[2])


def _saves_rotated(kernel, rope_pos):
    """The Triton kernels rotate q and k once and keep the rotated copies for the backward; the native
    kernels rotate inside their loops."""
    return rope_pos is not None and getattr(kernel, "SAVES_ROTATED", False)


def _rotates(q, k, v, rope_pos):
    return rope_pos is not None and _saves_rotated(_kernel(q, k, v), rope_pos)


@custom_op("fastvl::varlen_attention", mutates_args=())
def _forward(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    causal: bool, scale: float, rope_pos: Optional[Tensor], theta: float, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out [Tq, H, D], lse [H, Tq] fp32, rotated q, rotated k): the rotated copies, in the kernels' layout,
    when _rotates(), else empty. ``deterministic`` is the backward's."""
    kernel = _kernel(q, k, v)
    if kernel is not None:
        out, lse, q_saved, k_saved = kernel.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta)
        if _saves_rotated(kernel, rope_pos):
            return out, lse, q_saved, k_saved
    else:
        out, lse = _reference(q, k, v, cu_q, cu_k, causal, scale, rope_pos, theta, return_lse=True)
    return out, lse, q.new_empty(0), k.new_empty(0)


@_forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta, deterministic):
    rotated = _rotates(q, k, v, rope_pos)
    saved = (q.new_empty(q.shape), k.new_empty(k.shape)) if rotated else (q.new_empty(0), k.new_empty(0))
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32), *saved


@custom_op("fastvl::varlen_attention_backward", mutates_args=())
def _backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor,
    max_q: int, max_k: int, causal: bool, scale: float, rope_pos: Optional[Tensor], theta: float, rotated: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``rotated``: q and k are the kernels' rotated copies, which only the Triton backward takes."""
    kernel = _kernels() if rotated else _kernel(q, k, v)
    if kernel is not None:
        return kernel.backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta,
                               deterministic)
    dq, dk, dv = reference_vjp(_reference, [q, k, v], grad_out, cu_q, cu_k, causal, scale, rope_pos, theta)
    return dq, dk, dv


@_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta, rotated, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _kernels():
    import importlib

    return importlib.import_module("fastvl.kernels.varlen_attention")


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, rope_pos, theta, deterministic = inputs
    out, lse, q_rot, k_rot = output
    ctx.rotated = q_rot.dim() == 3  # the rotated copies replace q and k
    if ctx.rotated:
        q, k = q_rot, k_rot
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rope_pos)
    ctx.args = (max_q, max_k, causal, scale, theta, deterministic)


def _autograd_backward(ctx, grad_out, _grad_lse, _grad_q_rot, _grad_k_rot):
    q, k, v, out, lse, cu_q, cu_k, rope_pos = ctx.saved_tensors
    max_q, max_k, causal, scale, theta, deterministic = ctx.args
    dq, dk, dv = _backward(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale,
                           rope_pos, theta, ctx.rotated, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
