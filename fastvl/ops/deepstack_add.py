"""Public op: DeepStack injection, hidden[index] += stacked, differentiable."""
import torch
from torch import Tensor

from .. import reference
from . import _checks as check
from ._dispatch import kernel_module


def deepstack_add(hidden, index, stacked):
    """hidden [..., C] with rows ``index`` [K] (unique, into the flattened leading dims) increased by stacked [K, C]."""
    check.tensor("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be at least 2-D ([..., C]), got shape {tuple(hidden.shape)}")
    check.tensor("index", index, dtypes=check.INTS, ndim=1, device=hidden.device)
    check.tensor("stacked", stacked, ndim=2, device=hidden.device)
    check.same_dtype("stacked", stacked, "hidden", hidden)
    check.shape("stacked", stacked, (index.shape[0], hidden.shape[-1]))
    rows = hidden.numel() // hidden.shape[-1]
    if index.numel():
        ordered = index.sort().values
        low, high, repeats = torch.stack([ordered[0], ordered[-1], (ordered[1:] == ordered[:-1]).sum()]).tolist()
        if low < 0 or high >= rows:
            raise ValueError(f"index must lie in [0, {rows}) (rows of hidden), got values in [{low}, {high}]")
        if repeats:
            raise ValueError(f"index must not repeat a position, found {repeats} repeats")
    return torch.ops.fastvl.deepstack_add(hidden, index, stacked)


@torch.library.custom_op("fastvl::deepstack_add", mutates_args=())
def _forward(hidden: Tensor, index: Tensor, stacked: Tensor) -> Tensor:
    kernel = kernel_module("deepstack_add", hidden)
    if kernel is not None:
        return kernel.forward(hidden, index, stacked)
    return reference.deepstack_add(hidden, index, stacked)


@_forward.register_fake
def _(hidden, index, stacked):
    return torch.empty_like(hidden)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _autograd_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return grad, None, grad.reshape(-1, grad.shape[-1]).index_select(0, index)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
