"""Public op: Qwen2-VL PatchMerger (norm, m*m neighbour concat, Linear-GELU-Linear)."""
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks as check
from ._dispatch import custom_op, kernel_module, reference_vjp

NORMS = ("layernorm", "rmsnorm")


def patch_merge(x, ln_w, ln_b, w1, b1, w2, b2, merge_size=2, eps=1e-6, *, norm="layernorm"):
    """x [T, C] in window order -> [T / m^2, Out] = Linear2(GELU(Linear1(norm(x).view(-1, m*m*C)))).

    nn.Linear weight layout: w1 [Hid, m*m*C], b1 [Hid], w2 [Out, Hid], b2 [Out]. ``norm`` is
    'layernorm' (Qwen2-VL, ln_b given) or 'rmsnorm' (Qwen2.5-VL, ln_b None). ``eps`` must lie in float32's
    normal range (the norm runs in fp32: a smaller eps is 0 there, and a constant row divides by it).
    """
    check.tensor("x", x, ndim=2)
    tokens, channels = x.shape
    if not channels:
        raise ValueError(f"x must have at least one channel, got shape {list(x.shape)}")
    m = check.positive_int("merge_size", merge_size)
    if tokens % (m * m):
        raise ValueError(f"x: {tokens} tokens are not divisible by merge_size**2 = {m * m}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "rmsnorm" and ln_b is not None:
        raise ValueError("ln_b must be None with norm='rmsnorm'")
    if norm == "layernorm" and ln_b is None:
        raise ValueError("ln_b is required with norm='layernorm' (use norm='rmsnorm' for a bias-free RMSNorm)")
    params = {"ln_w": ln_w, "ln_b": ln_b, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, p in params.items():
        check.tensor(name, p, device=x.device, optional=name == "ln_b")
        check.same_dtype(name, p, "x", x)
    hidden = w1.shape[0] if w1.dim() == 2 else None
    check.shape("ln_w", ln_w, (channels,))
    if ln_b is not None:
        check.shape("ln_b", ln_b, (channels,))
    check.shape("w1", w1, (None, m * m * channels))
    check.shape("b1", b1, (hidden,))
    check.shape("w2", w2, (None, hidden))
    check.shape("b2", b2, (w2.shape[0],))
    # the kernel keeps activations for backward only when a gradient will be asked for
    save = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, *params.values()))
    return torch.ops.fastvl.patch_merge(x, ln_w, ln_b, w1, b1, w2, b2, m, check.scale("eps", eps), norm, save)[0]


def _reference(x, ln_w, ln_b, w1, b1, w2, b2, m, eps, norm):
    return reference.patch_merge(x, ln_w, ln_b, w1, b1, w2, b2, m, eps, norm=norm)


def _saves(x, save):
    """Whether the forward keeps the kernel's activations: fc1's pre-GELU output z and GELU(z) [T / m^2, Hid]."""
    return save and kernel_module("patch_merge", x) is not None


def _unsaved(x):
    return x.new_empty(0), x.new_empty(0)


@custom_op("fastvl::patch_merge", mutates_args=())
def _forward(
    x: Tensor, ln_w: Tensor, ln_b: Optional[Tensor], w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    merge_size: int, eps: float, norm: str, save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, pre, act); the last two are empty 1-D tensors unless _saves() (the reference backward recomputes)."""
    kernel = kernel_module("patch_merge", x)
    if kernel is not None:
        out, pre, act = kernel.forward(x, ln_w, ln_b, w1, b1, w2, b2, merge_size, eps, norm, save)
        return (out, pre, act) if save else (out, *_unsaved(x))
    return _reference(x, ln_w, ln_b, w1, b1, w2, b2, merge_size, eps, norm), *_unsaved(x)


@_forward.register_fake
def _(x, ln_w, ln_b, w1, b1, w2, b2, merge_size, eps, norm, save):
    rows, hidden = x.shape[0] // (merge_size * merge_size), w1.shape[0]
    out = x.new_empty(rows, w2.shape[0])
    if _saves(x, save):
        return out, x.new_empty(rows, hidden), x.new_empty(rows, hidden)
    return out, *_unsaved(x)


@custom_op("fastvl::patch_merge_backward", mutates_args=())
def _backward(
    grad: Tensor, x: Tensor, ln_w: Tensor, ln_b: Optional[Tensor], w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    pre: Tensor, act: Tensor, merge_size: int, eps: float, norm: str,
) -> list[Tensor]:
    """Gradients of the seven inputs; an empty tensor stands for ln_b's when it is None."""
    # the kernel backward needs the forward kernel's activations ([rows, Hid]; absent when the reference ran it)
    kernel = kernel_module("patch_merge", x) if pre.dim() == 2 else None
    if kernel is not None:
        grads = kernel.backward(grad, x, ln_w, ln_b, w1, b1, w2, b2, pre, act, merge_size, eps, norm)
    else:
        grads = reference_vjp(_reference, [x, ln_w, ln_b, w1, b1, w2, b2], grad, merge_size, eps, norm)
    return [x.new_empty(0) if g is None else g for g in grads]


@_backward.register_fake
def _(grad, x, ln_w, ln_b, w1, b1, w2, b2, pre, act, merge_size, eps, norm):
    return [torch.empty_like(t) if t is not None else x.new_empty(0) for t in (x, ln_w, ln_b, w1, b1, w2, b2)]


def _setup_context(ctx, inputs, output):
    *tensors, merge_size, eps, norm, _ = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*tensors, *output[1:])
    ctx.args = (merge_size, eps, norm)


def _autograd_backward(ctx, grad, *_):
    *tensors, pre, act = ctx.saved_tensors
    # the kernels read grad through its strides (an expanded gradient has stride 0): no copy
    grads = _backward(grad, *tensors, pre, act, *ctx.args)
    grads = [None if t is None else g for t, g in zip(tensors, grads)]
    return (*grads, None, None, None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
