"""Backend choice per call, and the reference backward used until (or instead of) a kernel."""
import contextlib
import importlib
import sys

import torch

from .. import _native
from .._backend import fallback, get_backend, interpreting, resolve


def custom_op(name, mutates_args=()):
    """``torch.library.custom_op`` whose first call does not import torch._dynamo (seconds).

    torch wraps an op's implementation in ``torch._disable_dynamo``, which imports torch._dynamo on
    the first call to keep Dynamo from compiling the implementation's frames. Before torch.compile has
    been used (it imports torch._dynamo) no such compilation can happen: the implementation then runs
    as is, and after that under ``torch.compiler.disable`` as torch does. Where torch keeps its
    implementations otherwise, its own wrapper stays.
    """
    def register(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        for impl in getattr(op, "_backend_fns", {}).values():
            inner = getattr(impl, "__wrapped__", None)  # what torch._disable_dynamo disables on first call
            if inner is not None:
                setattr(inner, "__dynamo_disable", _disable_once_compiling(inner))
        return op
    return register


def _disable_once_compiling(fn):
    disabled = []

    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)
    return run


def kernel_module(name, *tensors, arg="x", head_dim=None):
    """The kernels of op ``name`` for these inputs: ``fastvl.kernels.<name>`` on the Triton backend, the
    native CPU module (same interface) on the native one; None when the reference runs.

    Inputs the kernels do not cover run the reference: float64 (the kernels compute in fp16, bf16
    or fp32), bf16 in the Triton interpreter (which computes it wrongly), a ``head_dim`` outside
    the module's ``HEAD_DIMS``. When the backend was chosen automatically the first such call warns
    (FallbackWarning); with 'triton' forced, bf16 and head_dim raise, naming ``arg``, and float64
    runs the reference silently.
    """
    first = tensors[0]
    backend = resolve(first.device)
    if backend == "reference":
        return None
    if backend == "native":  # float64 is the specification's precision: the reference runs it
        return None if any(t is not None and t.dtype == torch.float64 for t in tensors) else _native.module(name)
    try:
        module = importlib.import_module(f"fastvl.kernels.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"fastvl.kernels.{name}":
            raise
        return None  # no kernel for this op yet: its reference runs
    error = None
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        reason = f"{arg}: float64 has no Triton kernel (they compute in float16, bfloat16 and float32)"
    elif first.dtype == torch.bfloat16 and first.device.type == "cpu" and interpreting():
        reason, error = f"{arg}: bfloat16 on CPU: the Triton interpreter computes bfloat16 wrongly", TypeError
    elif head_dim is not None and head_dim not in module.HEAD_DIMS:
        reason, error = f"{arg}: head_dim {head_dim} has no Triton kernel (head dims {module.HEAD_DIMS})", ValueError
    else:
        return module
    forced = get_backend() == "triton"
    if forced and error is not None:
        raise error(f"{reason}; the reference backend runs these inputs")
    if not forced:
        fallback(f"{name}: {reason}; running the reference implementation")
    return None


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
