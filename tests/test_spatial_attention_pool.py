"""spatial_attention_pool: Triton kernels vs the float64 reference and a per-window loop oracle, every gradient."""
import pytest
import torch

import fastvl
from fastvl.testing import assert_close, generator, randn, sap_window_loop, tolerance

C, HID = 72, 100  # neither a power of two nor a multiple of the K tile; HID a partial GEMM tile

CASES = {  # name: (grids (h, w) per image, window)
    "siglip27": ([(27, 27)], 3),
    "pack-w3": ([(5, 7), (1, 4), (9, 6), (2, 2), (4, 11)], 3),
    "pack-w2": ([(5, 7), (1, 4), (3, 3), (8, 1)], 2),
}


def _inputs(grids, dtype, device, seed=0, stride_pad=0, channels=C, hidden=HID):
    gen = generator(seed)
    tokens = sum(h * w for h, w in grids)
    x = randn(tokens, channels + stride_pad, dtype=dtype, device=device, gen=gen)[:, :channels]
    params = [
        randn(hidden, channels, dtype=dtype, device=device, gen=gen, scale=channels ** -0.5),
        randn(hidden, dtype=dtype, device=device, gen=gen, scale=0.1),
        randn(1, hidden, dtype=dtype, device=device, gen=gen, scale=hidden ** -0.5 * 2),
        randn(1, dtype=dtype, device=device, gen=gen),
    ]
    grid_hw = torch.tensor(grids, dtype=torch.int64)
    return x, grid_hw, params


def _windows(h, w, r):
    return -(-h // r) * -(-w // r)


def _check_against_reference(grids, r, dtype, device, **shape):
    """Output and every gradient of the kernels (dtype) against the float64 reference."""
    x, grid_hw, params = _inputs(grids, dtype, device, **shape)
    inputs = [x.requires_grad_(), *(p.requires_grad_() for p in params)]
    out = fastvl.spatial_attention_pool(inputs[0], grid_hw, *inputs[1:], window=r)
    assert out.shape == (sum(_windows(h, w, r) for h, w in grids), x.shape[1])
    grad = randn(*out.shape, dtype=dtype, device=device, gen=generator(1))
    out.backward(grad)

    exact = [t.detach().double().requires_grad_() for t in inputs]
    with fastvl.use_backend("reference"):
        ref = fastvl.spatial_attention_pool(exact[0], grid_hw, *exact[1:], window=r)
    ref.backward(grad.double())
    tol = tolerance(dtype, device)
    assert_close(out, ref, tol=tol)
    for name, got, want in zip(("dx", "dw1", "db1", "dw2"), inputs, exact):
        assert_close(got.grad, want.grad, tol=tol, name=name)
    # b2 shifts all scores of a window alike: its gradient is exactly 0 here and ~0 in the reference
    assert torch.equal(inputs[4].grad, torch.zeros_like(inputs[4]))
    assert exact[4].grad.abs().item() < 1e-12 * ref.abs().sum().item()


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(triton_backend, kernel_dtype, device, case):
    grids, r = CASES[case]
    # a strided x; C = 64, a multiple of the K tile (the GEMM loop without a masked tail)
    shape = {"pack-w3": dict(stride_pad=8), "pack-w2": dict(channels=64)}.get(case, {})
    _check_against_reference(grids, r, kernel_dtype, device, **shape)


@pytest.mark.gpu
def test_flashsloth_hd_shapes(triton_backend, device):
    """FlashSloth-HD at full width: 5 crops of 27x27, C = Hid = 1152, bf16, the autotuned GEMM tiles."""
    _check_against_reference([(27, 27)] * 5, 3, torch.bfloat16, device, channels=1152, hidden=1152)


def test_frozen_features(triton_backend, device):
    """x without grad (a frozen tower, FlashSloth stage 1): the weights' gradients alone, dx never formed."""
    grids, r = CASES["pack-w3"]
    x, grid_hw, params = _inputs(grids, torch.float32, device, seed=8)
    weights = [p.requires_grad_() for p in params]
    out = fastvl.spatial_attention_pool(x, grid_hw, *weights, window=r)
    grad = randn(*out.shape, device=device, gen=generator(9))
    out.backward(grad)
    exact = [p.detach().double().requires_grad_() for p in params]
    with fastvl.use_backend("reference"):
        fastvl.spatial_attention_pool(x.double(), grid_hw, *exact, window=r).backward(grad.double())
    assert x.grad is None
    for name, got, want in zip(("dw1", "db1", "dw2"), weights, exact):
        assert_close(got.grad, want.grad, tol=tolerance(torch.float32, device), name=name)


def test_kernel_matches_window_loop(triton_backend, device):
    """fp32 kernel against the independent loop oracle (float64), which the reference also matches."""
    grids, r = [(7, 5), (3, 3), (2, 7), (1, 1)], 3
    x, grid_hw, params = _inputs(grids, torch.float32, device, seed=2)
    exact = sap_window_loop(x.double(), grids, *(p.double() for p in params), r)
    out = fastvl.spatial_attention_pool(x, grid_hw, *params, window=r)
    assert_close(out, exact, tol=tolerance(torch.float32, device))
    with fastvl.use_backend("reference"):
        ref = fastvl.spatial_attention_pool(x.double(), grid_hw, *(p.double() for p in params), window=r)
    assert_close(ref, exact, torch.float64)


@pytest.mark.parametrize("window", [4, 1500])
def test_window_larger_than_image(triton_backend, device, window):
    """Windows larger than the grids (beyond 1024 too): one window per image holding all of its tokens."""
    grids = [(3, 2), (1, 3), (2, 2)]
    x, grid_hw, params = _inputs(grids, torch.float32, device, seed=3)
    out = fastvl.spatial_attention_pool(x, grid_hw, *params, window=window)
    exact = sap_window_loop(x.double(), grids, *(p.double() for p in params), window)
    assert_close(out, exact, tol=tolerance(torch.float32, device))
    _check_against_reference(grids, window, torch.float32, device)


def test_large_partial_windows(triton_backend, device):
    """Window 6 (36 tokens a window, partial at the right and bottom edges) on a pack with a strided x."""
    _check_against_reference([(13, 8), (6, 6), (2, 15)], 6, torch.float32, device, stride_pad=4)


def _saved(fn):
    """Tensors autograd saves while running fn()."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def test_saves_only_scores(triton_backend, device):
    """Training saves the inputs and the [T] fp32 scores (no [T, Hid] activation); inference saves nothing."""
    grids = [(5, 7), (4, 4)]
    x, grid_hw, params = _inputs(grids, torch.float16, device, seed=4)
    tokens = x.shape[0]
    leaves = [x, *(p.clone().requires_grad_() for p in params)]

    def pool():
        return fastvl.spatial_attention_pool(leaves[0], grid_hw, *leaves[1:])

    saved = _saved(pool)
    extra = [t for t in saved if not any(t is leaf for leaf in (*leaves, grid_hw))]
    assert [(tuple(t.shape), t.dtype) for t in extra] == [((tokens,), torch.float32)]
    with torch.no_grad():
        assert _saved(pool) == []
        assert pool().grad_fn is None


def test_empty_pack(triton_backend, device):
    x, grid_hw, params = _inputs([(1, 1)], torch.float32, device)
    x = x[:0].requires_grad_()
    out = fastvl.spatial_attention_pool(x, grid_hw[:0], *params)
    assert out.shape == (0, C)
    out.sum().backward()
    assert x.grad.shape == (0, C)


def test_mixed_backends_share_scores(device):
    """Forward on the reference, backward on the kernels (and back): the saved scores mean the same."""
    grids, r = [(5, 7), (2, 3)], 3
    x, grid_hw, params = _inputs(grids, torch.float32, device, seed=5)
    grad = randn(_windows(5, 7, r) + _windows(2, 3, r), C, device=device, gen=generator(6))
    results = []
    for forward, backward in (("reference", "triton"), ("triton", "reference")):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        with fastvl.use_backend(forward):
            out = fastvl.spatial_attention_pool(leaves[0], grid_hw, *leaves[1:], window=r)
        with fastvl.use_backend(backward):
            out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves[:4]])
    for a, b in zip(*results):
        assert_close(a, b, tol=tolerance(torch.float32, device))


def test_fake_and_autograd_registration():
    """torch.library.opcheck: schema, fake impl and autograd agree with the real op (reference kernel)."""
    x, grid_hw, params = _inputs([(5, 7), (2, 3)], torch.float64, "cpu", seed=7)
    args = (x.requires_grad_(), grid_hw, *(p.requires_grad_() for p in params), 3, _windows(5, 7, 3) + 1)
    torch.library.opcheck(torch.ops.fastvl.spatial_attention_pool.default, args)
