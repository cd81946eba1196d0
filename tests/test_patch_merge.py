"""patch_merge: the fused Triton kernels against the float64 reference (forward, all seven gradients)."""
import pytest
import torch

import fastvl
from fastvl import reference
from fastvl.ops._dispatch import kernel_module
from fastvl.testing import TOLERANCE, assert_close, generator, randn, tolerance

# (t, h, w) grids of a pack; tokens = sum(t*h*w), every h and w a multiple of the merge size
PACKS = {
    2: [[2, 10, 14], [1, 2, 6], [1, 4, 2]],  # 2x5x7 + 3 + 2 = 75 merged rows
    4: [[1, 12, 20], [2, 4, 4]],  # 15 + 2 = 17 merged rows of 16 patches
}
NAMES = ("x", "ln_w", "ln_b", "w1", "b1", "w2", "b2")


def _inputs(tokens, channels, hidden, out, merge, norm, dtype, device, seed=0):
    """x with a per-channel offset (the norm must centre it), norm weights near 1, fan-in scaled Linear weights."""
    gen = generator(seed)
    k = merge * merge * channels
    r = lambda *shape, scale=1.0: randn(*shape, dtype=torch.float64, gen=gen, scale=scale)  # noqa: E731
    params = [
        r(tokens, channels, scale=2.0) + r(channels), 1 + r(channels, scale=0.2),
        r(channels, scale=0.2) if norm == "layernorm" else None,
        r(hidden, k, scale=k ** -0.5), r(hidden, scale=0.2), r(out, hidden, scale=max(hidden, 1) ** -0.5),
        r(out, scale=0.2),
    ]
    return [None if p is None else p.to(device=device, dtype=dtype).requires_grad_() for p in params]


def _check(params, grad, merge, norm, dtype, device):
    """Kernel output and gradients vs the float64 reference; grad None: backward of out.sum() (stride 0)."""
    out = fastvl.patch_merge(*params, merge_size=merge, norm=norm)
    if grad is None:
        out.sum().backward()
        grad = torch.ones_like(out)
    else:
        out.backward(grad)
    _compare(out, params, grad, merge, norm, tolerance(dtype, device))


def _compare(out, params, grad, merge, norm, tol):
    ref_params = [None if p is None else p.detach().double().requires_grad_() for p in params]
    ref = reference.patch_merge(*ref_params, merge_size=merge, norm=norm)
    ref.backward(grad.double())
    assert out.dtype == params[0].dtype
    assert_close(out, ref, tol=tol)
    for name, p, r in zip(NAMES, params, ref_params):
        if p is not None:
            assert_close(p.grad, r.grad, tol=tol, name=f"grad {name}")


def test_triton_backend_runs_the_kernel(triton_backend):
    from fastvl.kernels import patch_merge as kernel

    assert kernel_module("patch_merge", torch.zeros(4, 8)) is kernel


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("merge,channels,hidden", [(2, 40, 48), (4, 72, 40)])
def test_forward_and_gradients(triton_backend, kernel_dtype, device, norm, merge, channels, hidden):
    """Non-power-of-two C, Hid != m*m*C, odd merged row counts over several images."""
    tokens = sum(t * h * w for t, h, w in PACKS[merge])
    params = _inputs(tokens, channels, hidden, 24, merge, norm, kernel_dtype, device)
    grad = randn(tokens // merge**2, 24, dtype=kernel_dtype, device=device, gen=generator(1))
    _check(params, grad, merge, norm, kernel_dtype, device)


def test_expanded_gradient(triton_backend, device):
    """out.sum() hands backward a stride-0 gradient: the kernels read it through its strides."""
    params = _inputs(4 * 21, 24, 40, 12, 2, "layernorm", torch.float32, device, seed=2)
    _check(params, None, 2, "layernorm", torch.float32, device)


def test_strided_x(triton_backend, kernel_dtype, device):
    """x a column slice of a wider buffer (row stride > C), as when it is cut out of a larger activation."""
    params = _inputs(4 * 9, 20, 24, 8, 2, "rmsnorm", kernel_dtype, device, seed=3)
    wide = torch.cat([params[0].detach(), torch.full_like(params[0], float("nan"))[:, :5]], dim=1)
    params[0] = wide[:, :20].requires_grad_()
    assert not params[0].is_contiguous()
    _check(params, randn(9, 8, dtype=kernel_dtype, device=device, gen=generator(4)), 2, "rmsnorm", kernel_dtype, device)


def test_saved_activations(triton_backend, device):
    """Training keeps fc1's pre-activation and GELU output (nothing per token: x is normalised again in
    backward); inference keeps nothing."""
    params = _inputs(4 * 5, 8, 16, 6, 2, "layernorm", torch.float32, device)
    x, ln_w, ln_b, w1, b1, w2, b2 = (p.detach() for p in params)
    out, pre, act = torch.ops.fastvl.patch_merge(x, ln_w, ln_b, w1, b1, w2, b2, 2, 1e-6, "layernorm", True)
    assert (pre.shape, act.shape) == ((5, 16), (5, 16))
    assert_close(act, torch.nn.functional.gelu(pre), torch.float32)
    assert_close(out, reference.patch_merge(*(p.double() for p in (x, ln_w, ln_b, w1, b1, w2, b2))), torch.float32)
    out, *saved = torch.ops.fastvl.patch_merge(x, ln_w, ln_b, w1, b1, w2, b2, 2, 1e-6, "layernorm", False)
    assert [t.numel() for t in saved] == [0, 0]
    with torch.no_grad():
        assert_close(fastvl.patch_merge(x, ln_w, ln_b, w1, b1, w2, b2), out.double(), torch.float32)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastvl.patch_merge(*params)
    extra = [tuple(t.shape) for t in saved if not any(t is p for p in params)]
    assert extra == [(5, 16), (5, 16)]


def test_zero_hidden_width(triton_backend, device):
    """An MLP of hidden width 0: out is b2 on every row; every gradient is written (b2's: the sums of dy)."""
    for norm in ("layernorm", "rmsnorm"):
        params = _inputs(4 * 5, 8, 0, 6, 2, norm, torch.float32, device, seed=7)
        _check(params, randn(5, 6, device=device, gen=generator(8)), 2, norm, torch.float32, device)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_zero_channels(backend, device):
    params = _inputs(8, 1, 4, 3, 2, "layernorm", torch.float32, device)
    params[0] = params[0].detach()[:, :0]
    with fastvl.use_backend(backend), pytest.raises(ValueError, match="^x must have at least one channel"):
        fastvl.patch_merge(*params)


def test_backward_outside_the_triton_backend(device):
    """A kernel forward whose backward runs under the reference backend still gets every gradient right."""
    params = _inputs(4 * 7, 12, 20, 6, 2, "layernorm", torch.float32, device, seed=5)
    grad = randn(7, 6, device=device, gen=generator(6))
    with fastvl.use_backend("triton"):
        out = fastvl.patch_merge(*params)
    out.backward(grad)
    _compare(out, params, grad, 2, "layernorm", tolerance(torch.float32, device))


def test_empty(triton_backend, device):
    params = _inputs(0, 8, 16, 6, 2, "layernorm", torch.float32, device)
    out = fastvl.patch_merge(*params)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert params[0].grad.shape == (0, 8)
    assert all(not p.grad.any() for p in params[1:])


def test_opcheck(triton_backend, device):
    """Schema, fake implementation (saved shapes included) and autograd registration on the kernel path."""
    params = [p.detach().requires_grad_() for p in _inputs(4 * 3, 8, 16, 6, 2, "layernorm", torch.float32, device)]
    torch.library.opcheck(torch.ops.fastvl.patch_merge.default, (*params, 2, 1e-6, "layernorm", True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
@pytest.mark.parametrize("merge,norm", [(2, "layernorm"), (4, "rmsnorm")])
def test_bf16_qwen2vl_merger(triton_backend, merge, norm):
    """Qwen2-VL-2B merger widths (C=1280 -> 5120 -> 1536) in bf16 on a pack of two images."""
    grids = [[1, 32, 48], [2, 16, 24]] if merge == 2 else [[1, 32, 48], [1, 16, 24]]
    tokens = sum(t * h * w for t, h, w in grids)
    params = _inputs(tokens, 1280, 5120, 1536, merge, norm, torch.bfloat16, "cuda")
    grad = randn(tokens // merge**2, 1536, dtype=torch.bfloat16, device="cuda", gen=generator(1))
    _check(params, grad, merge, norm, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_compiled(triton_backend):
    params = _inputs(4 * 75, 40, 48, 24, 2, "layernorm", torch.bfloat16, "cuda")
    grad = randn(75, 24, dtype=torch.bfloat16, device="cuda", gen=generator(1))
    out = torch.compile(lambda *a: fastvl.patch_merge(*a, merge_size=2), fullgraph=True)(*params)
    out.backward(grad)
    _compare(out, params, grad, 2, "layernorm", TOLERANCE[torch.bfloat16])
