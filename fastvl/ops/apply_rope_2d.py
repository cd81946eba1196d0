"""Public op: standalone 2D rotary embedding of vision tokens."""
import torch
from torch import Tensor

from .. import reference
from . import _checks as check
from ._dispatch import custom_op, kernel_module


def apply_rope_2d(x, pos, theta=10000.0):
    """Rotate x [T, H, D] (D % 4 == 0) by the (row, col) positions pos [T, 2] int32, Qwen2-VL convention.

    ``theta`` >= 2^-96: the frequencies theta^(-4j/D) are below 1/theta, so every angle (an int32 position
    times a frequency) is finite in float32.
    """
    check.tensor("x", x, ndim=3)
    if x.shape[-1] % 4:
        raise ValueError(f"x: head_dim must be a multiple of 4 for 2D RoPE, got {x.shape[-1]}")
    check.tensor("pos", pos, dtypes=(torch.int32,), ndim=2, device=x.device)
    check.shape("pos", pos, (x.shape[0], 2))
    return torch.ops.fastvl.apply_rope_2d(x, pos, check.rope_theta("theta", theta), False)


@custom_op("fastvl::apply_rope_2d", mutates_args=())
def _rope(x: Tensor, pos: Tensor, theta: float, inverse: bool) -> Tensor:
    kernel = kernel_module("apply_rope_2d", x)
    if kernel is not None:
        return kernel.forward(x, pos, theta, inverse)
    return reference.apply_rope_2d(x, pos, theta, inverse=inverse)


@_rope.register_fake
def _(x, pos, theta, inverse):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    _, pos, theta, inverse = inputs
    ctx.save_for_backward(pos)
    ctx.args = (theta, inverse)


def _backward(ctx, grad):
    (pos,) = ctx.saved_tensors
    theta, inverse = ctx.args
    return _rope(grad.contiguous(), pos, theta, not inverse), None, None, None


_rope.register_autograd(_backward, setup_context=_setup_context)
