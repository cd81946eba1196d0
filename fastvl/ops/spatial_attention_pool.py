"""Public op: FlashSloth spatial attention pooling over packed images of any grid."""
import torch
from torch import Tensor

from .. import reference
from ..reference.spatial_attention_pool import sap_pool, sap_scores
from . import _checks as check
from ._dispatch import custom_op, kernel_module, reference_vjp


def spatial_attention_pool(x, grid_hw, w1, b1, w2, b2, window=3):
    """x [T, C] (images in order, row-major tokens) -> [num_windows, C].

    ``grid_hw``: (h, w) per image, sum(h*w) == T, as an int tensor [N, 2] or a list of (h, w) pairs
    (a list is static under torch.compile: no graph break). Score MLP weights in nn.Linear layout:
    w1 [Hid, C], b1 [Hid], w2 [1, Hid], b2 [1]. Each window x window block (partial at the edges)
    becomes the softmax(score)-weighted sum of its raw features; windows row-major per image.
    """
    check.tensor("x", x, ndim=2)
    tokens, channels = x.shape
    r = check.positive_int("window", window)
    rows = check.grid("grid_hw", grid_hw, 2, sequences=True)
    total = sum(h * w for h, w in rows)
    if total != tokens:
        raise ValueError(f"grid_hw covers {total} tokens but x has {tokens}")
    for name, p in {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items():
        check.tensor(name, p, device=x.device)
        check.same_dtype(name, p, "x", x)
    check.shape("w1", w1, (None, channels))
    check.shape("b1", b1, (w1.shape[0],))
    check.shape("w2", w2, (1, w1.shape[0]))
    check.shape("b2", b2, (1,))
    num_windows = sum(-(-h // r) * -(-w // r) for h, w in rows)
    if not isinstance(grid_hw, torch.Tensor):
        grid_hw = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
    out, _ = torch.ops.fastvl.spatial_attention_pool(x, grid_hw, w1, b1, w2, b2, r, num_windows)
    return out


def _score_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


@custom_op("fastvl::spatial_attention_pool", mutates_args=())
def _forward(
    x: Tensor, grid_hw: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, window: int, num_windows: int
) -> tuple[Tensor, Tensor]:
    """Pooled windows and the per-token scores (fp32 or wider), which backward reuses instead of a second GEMM."""
    kernel = kernel_module("spatial_attention_pool", x)
    if kernel is not None:
        return kernel.forward(x, grid_hw, w1, b1, w2, b2, window, num_windows)
    scores = sap_scores(x, w1, b1, w2, b2)
    return sap_pool(x, scores, grid_hw, window), scores.to(_score_dtype(x))


@_forward.register_fake
def _(x, grid_hw, w1, b1, w2, b2, window, num_windows):
    return x.new_empty(num_windows, x.shape[1]), x.new_empty(x.shape[0], dtype=_score_dtype(x))


@custom_op("fastvl::spatial_attention_pool_backward", mutates_args=())
def _backward(
    grad: Tensor, x: Tensor, grid_hw: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, window: int,
    num_windows: int, scores: Tensor, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x (an empty tensor unless need_dx), w1, b1, w2, b2."""
    kernel = kernel_module("spatial_attention_pool", x)
    if kernel is not None:
        return kernel.backward(grad, x, grid_hw, w1, b1, w2, b2, window, num_windows, scores, need_dx)
    inputs = [x, grid_hw, w1, b1, w2, b2]
    dx, _, dw1, db1, dw2, db2 = reference_vjp(reference.spatial_attention_pool, inputs, grad, window)
    return dx if need_dx else x.new_empty(0), dw1, db1, dw2, db2


@_backward.register_fake
def _(grad, x, grid_hw, w1, b1, w2, b2, window, num_windows, scores, need_dx):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), *(torch.empty_like(t) for t in (w1, b1, w2, b2)))


def _setup_context(ctx, inputs, output):
    x, grid_hw, w1, b1, w2, b2, window, num_windows = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, grid_hw, w1, b1, w2, b2, output[1])
    ctx.args = (window, num_windows)


def _autograd_backward(ctx, grad, _grad_scores):
    x, grid_hw, w1, b1, w2, b2, scores = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dw1, db1, dw2, db2 = _backward(grad.contiguous(), x, grid_hw, w1, b1, w2, b2, *ctx.args, scores, need_dx)
    return dx if need_dx else None, None, dw1, db1, dw2, db2, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
