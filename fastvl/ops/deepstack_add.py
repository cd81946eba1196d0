"""Public op: DeepStack injection, hidden[index] += stacked, differentiable."""
import torch
from torch import Tensor

from .. import reference
from . import _checks as check
from ._dispatch import custom_op, kernel_module


def deepstack_add(hidden, index, stacked, *, check_index=True):
    """hidden [..., C] with rows ``index`` [K] (unique, into the flattened leading dims) increased by stacked [K, C].

    Out-of-place: returns a new tensor and is always safe under autograd. See ``deepstack_add_``
    for the in-place variant that saves the copy of hidden. Checking ``index``'s values reads them on
    the host (one device-to-host sync on CUDA); ``check_index=False`` trusts them instead, for an index
    valid by construction (e.g. ``mask.flatten().nonzero()`` over hidden's own tokens): the kernels
    then still never touch a row out of range, but a bad index gives a wrong sum.
    """
    _check(hidden, index, stacked, check_index)
    return torch.ops.fastvl.deepstack_add(hidden, index, stacked)


def deepstack_add_(hidden, index, stacked, *, check_index=True):
    """In place: hidden[index] += stacked (same contract as ``deepstack_add``); returns hidden.

    Saves writing a copy of hidden. Use it without autograd (inference, prefill, torch.no_grad) and
    inside a model when hidden is a non-leaf activation that no recorded backward needs unchanged
    (the residual stream between decoder layers): autograd tracks the update and raises if a saved
    tensor was modified or hidden is a leaf that requires grad. Use ``deepstack_add`` otherwise.
    hidden's rows must not share memory (an expanded tensor cannot be updated in place).
    """
    _check(hidden, index, stacked, check_index)
    if _overlapping(hidden):
        raise ValueError(f"hidden: its elements may share memory (strides {hidden.stride()} over shape "
                         f"{list(hidden.shape)}, e.g. an expanded tensor), so it cannot be updated in place; "
                         "use deepstack_add, which returns a new tensor")
    if torch.is_grad_enabled() and (hidden.requires_grad or stacked.requires_grad):
        return _DeepstackAddInPlace.apply(hidden, index, stacked)
    torch.ops.fastvl.deepstack_add_(hidden, index, stacked)
    return hidden


def _check(hidden, index, stacked, check_index):
    check.tensor("hidden", hidden)
    if hidden.dim() < 2 or not hidden.shape[-1]:
        raise ValueError(f"hidden must be at least 2-D with at least one channel ([..., C], C >= 1), "
                         f"got shape {list(hidden.shape)}")
    check.tensor("index", index, dtypes=check.INTS, ndim=1, device=hidden.device)
    check.tensor("stacked", stacked, ndim=2, device=hidden.device)
    check.same_dtype("stacked", stacked, "hidden", hidden)
    check.shape("stacked", stacked, (index.shape[0], hidden.shape[-1]))
    if not isinstance(check_index, bool):
        raise TypeError(f"check_index must be a bool, got {type(check_index).__name__}")
    rows = hidden.numel() // hidden.shape[-1]
    # values cannot be read while tracing; the kernels stay in bounds whatever they are
    if check_index and index.numel() and not torch.compiler.is_compiling():
        ordered = index.sort().values
        low, high, repeats = torch.stack([ordered[0], ordered[-1], (ordered[1:] == ordered[:-1]).sum()]).tolist()
        if low < 0 or high >= rows:
            raise ValueError(f"index must lie in [0, {rows}) (rows of hidden), got values in [{low}, {high}]")
        if repeats:
            raise ValueError(f"index must not repeat a position, found {repeats} repeats")


def _overlapping(t):
    """Whether elements of t may share memory: sorted by stride, each dim must step past the span of the
    smaller ones, as dense, sliced and transposed tensors do (an expanded one, stride 0, does not)."""
    span = 0
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


@custom_op("fastvl::deepstack_add", mutates_args=())
def _forward(hidden: Tensor, index: Tensor, stacked: Tensor) -> Tensor:
    kernel = kernel_module("deepstack_add", hidden, arg="hidden")
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


@custom_op("fastvl::deepstack_add_", mutates_args=("hidden",))
def _forward_(hidden: Tensor, index: Tensor, stacked: Tensor) -> None:
    kernel = kernel_module("deepstack_add", hidden, arg="hidden")
    if kernel is not None:
        kernel.forward(hidden, index, stacked, inplace=True)
    else:
        hidden.copy_(reference.deepstack_add(hidden, index, stacked))


@_forward_.register_fake
def _(hidden, index, stacked):
    return None


class _DeepstackAddInPlace(torch.autograd.Function):
    """The in-place op under autograd: hidden is marked dirty, so its history moves to this node."""

    @staticmethod
    def forward(ctx, hidden, index, stacked):
        torch.ops.fastvl.deepstack_add_(hidden, index, stacked)
        ctx.mark_dirty(hidden)
        ctx.save_for_backward(index)
        return hidden

    backward = staticmethod(_autograd_backward)
