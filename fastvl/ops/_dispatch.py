"""Backend choice per call, and the reference backward used until (or instead of) a kernel."""
import contextlib
import importlib

import torch

from .. import _native
from .._backend import resolve


def kernel_module(name, *tensors):
    """The kernels of op ``name`` for these inputs: ``fastvl.kernels.<name>`` on the Triton backend, the
    native CPU module (same interface) on the native one; None for the reference.

    float64 always runs the reference: the kernels compute in fp16/bf16/fp32.
    """
    first = tensors[0]
    backend = resolve(first.device)
    if backend == "reference" or any(t is not None and t.dtype == torch.float64 for t in tensors):
        return None
    if backend == "native":
        return _native.module(name)
    try:
        return importlib.import_module(f"fastvl.kernels.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"fastvl.kernels.{name}":
            raise
        return None  # no kernel for this op yet: its reference runs


def reference_vjp(fn, inputs, grad_outputs, *args, **kwargs):
    """Gradients of ``fn(*inputs, *args, **kwargs)`` w.r.t. each floating-point input, by recomputation.

    Non-float inputs (and None) get None; unused inputs get zeros.
    """
    with _autograd_on():
        leaves = [x.detach().requires_grad_() if _diff(x) else x for x in inputs]
        outputs = fn(*leaves, *args, **kwargs)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        wrt = [x for x in leaves if _diff(x)]
        grads = iter(torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True))
    result = []
    for x in leaves:
        if not _diff(x):
            result.append(None)
            continue
        g = next(grads)
        result.append(torch.zeros_like(x) if g is None else g)
    return result


@contextlib.contextmanager
def _autograd_on():
    """Record autograd again inside a custom op's implementation (which runs below the Autograd key)."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradFunctionality, C.DispatchKey.AutogradOther, C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _diff(x):
    return isinstance(x, torch.Tensor) and x.is_floating_point()
