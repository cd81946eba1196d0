"""apply_rope_2d: the Triton kernel against the float64 reference (forward, gradient, inverse, strides)."""
import math

import pytest
import torch

import fastvl
from fastvl import _native, reference
from fastvl.ops._dispatch import kernel_module
from fastvl.testing import assert_close, generator, randn

# (t, h, w) grids of a pack, window order with merge_size 2, and odd raster packs (merge_size 1)
PACK = ([[1, 4, 6], [2, 2, 2], [1, 6, 4]], 2)  # 24 + 8 + 24 = 56 tokens
ODD_PACK = ([[1, 1, 7], [1, 3, 5], [1, 1, 1], [1, 15, 13]], 1)  # 7 + 15 + 1 + 195 = 218 tokens


def _positions(pack, device):
    grids, merge = pack
    return fastvl.vision_positions(torch.tensor(grids), merge).to(device)


def _random_positions(tokens, gen, device, high=200):
    return torch.randint(0, high, (tokens, 2), generator=gen, dtype=torch.int32).to(device)


def _kernel():
    from fastvl.kernels import apply_rope_2d as kernel

    return kernel


def test_triton_backend_runs_the_kernel(triton_backend):
    assert kernel_module("apply_rope_2d", torch.zeros(1, 1, 4)) is _kernel()


def test_head_dim_parts():
    """The half head dim splits into two power-of-two parts with no idle lanes at the model head dims."""
    for head_dim in (64, 72, 80, 96, 128):
        blocks = _kernel()._blocks(head_dim)
        assert blocks["WA"] + blocks["WB"] == head_dim // 2, (head_dim, blocks)


@pytest.mark.parametrize("head_dim", [4, 16, 20, 28, 64, 72, 80, 96, 128])
def test_forward(triton_backend, kernel_dtype, device, head_dim):
    gen = generator(head_dim)
    pos = _positions(ODD_PACK, device)
    x = randn(pos.shape[0], 3, head_dim, dtype=kernel_dtype, device=device, gen=gen)
    out = fastvl.apply_rope_2d(x, pos, 10000.0)
    assert out.dtype == kernel_dtype
    assert_close(out, reference.apply_rope_2d(x.double(), pos, 10000.0), kernel_dtype)


@pytest.mark.parametrize("tokens", [1, 7, 257])
@pytest.mark.parametrize("theta", [100.0, 10000.0])
def test_forward_random_positions(triton_backend, device, tokens, theta):
    gen = generator(tokens)
    pos = _random_positions(tokens, gen, device)
    x = randn(tokens, 5, 80, device=device, gen=gen)
    assert_close(fastvl.apply_rope_2d(x, pos, theta), reference.apply_rope_2d(x.double(), pos, theta), torch.float32)


@pytest.mark.parametrize("theta", [1e-3, 0.5, 10000.0, 1e30, 1e300])
def test_huge_positions_and_thetas(triton_backend, device, theta):
    """Every int32 position and any finite positive theta rotate (norms kept) as the float64 reference does."""
    gen = generator(13)
    edges = torch.tensor([2**31 - 1, -2**31, 2**28, 2**28 + 1, -(2**30) - 7, 0, 1, 2**24 + 1])
    pos = torch.cat([torch.stack([edges, edges.flip(0)], 1),
                     torch.randint(-2**31, 2**31, (9, 2), generator=gen)]).to(torch.int32).to(device)
    x = randn(pos.shape[0], 3, 80, device=device, gen=gen)
    out = fastvl.apply_rope_2d(x, pos, theta)
    assert_close(out.norm(dim=-1), x.norm(dim=-1), torch.float32, name="norms")
    assert_close(out, reference.apply_rope_2d(x.double(), pos, theta), torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton", "native"])
def test_smallest_theta(device, backend):
    """theta = 2^-96, the smallest the op takes: every angle (int32 position x frequency < 1/theta) is below
    2^127, finite in fp32 on every backend, so the rotation keeps norms at any position; smaller is refused."""
    if backend == "native" and (device != "cpu" or not _native.available()):
        pytest.skip("the native backend runs CPU tensors, with fastvl._C built")
    edges = torch.tensor([2**31 - 1, -2**31, 2**30 + 3, -1, 0, 1])
    pos = torch.stack([edges, edges.flip(0)], 1).to(torch.int32).to(device)
    x = randn(6, 2, 1024, device=device, gen=generator(4))  # a large head dim: frequencies up to theta^(-255/256)
    with fastvl.use_backend(backend):
        out = fastvl.apply_rope_2d(x, pos, 2.0**-96)
        with pytest.raises(ValueError, match=r"^theta must be >= 2\*\*-96"):
            fastvl.apply_rope_2d(x, pos, math.nextafter(2.0**-96, 0))
    assert_close(out.norm(dim=-1), x.norm(dim=-1), torch.float32, name="norms")


@pytest.mark.parametrize("head_dim", [16, 72, 80])
@pytest.mark.parametrize("pack", [PACK, ODD_PACK], ids=["window", "odd"])
def test_gradient(triton_backend, kernel_dtype, device, head_dim, pack):
    gen = generator(7)
    pos = _positions(pack, device)
    x = randn(pos.shape[0], 3, head_dim, dtype=kernel_dtype, device=device, gen=gen, requires_grad=True)
    grad = randn(*x.shape, dtype=kernel_dtype, device=device, gen=gen)
    fastvl.apply_rope_2d(x, pos).backward(grad)
    x64 = x.detach().double().requires_grad_()
    reference.apply_rope_2d(x64, pos).backward(grad.double())
    assert_close(x.grad, x64.grad, kernel_dtype, name="grad x")


def test_gradient_of_expanded_grad(triton_backend, device):
    """The backward of sum() hands over a stride-0 gradient."""
    pos = _positions(ODD_PACK, device)
    x = randn(pos.shape[0], 2, 72, device=device, gen=generator(3), requires_grad=True)
    fastvl.apply_rope_2d(x, pos).sum().backward()
    expected = reference.apply_rope_2d(torch.ones_like(x, dtype=torch.float64), pos, inverse=True)
    assert_close(x.grad, expected, torch.float32, name="grad x")


@pytest.mark.parametrize("heads_per_program", [None, 1, 2])
def test_inverse_undoes_rotation(kernel_dtype, device, heads_per_program):
    gen = generator(11)
    pos = _random_positions(61, gen, device)
    x = randn(61, 3, 80, dtype=kernel_dtype, device=device, gen=gen)
    kernel = _kernel()
    y = kernel.forward(x, pos, 10000.0, False, heads_per_program)
    assert_close(y, reference.apply_rope_2d(x.double(), pos), kernel_dtype)
    back = kernel.forward(y, pos, 10000.0, True, heads_per_program)
    assert_close(back, x.double(), kernel_dtype, name="inverse(rotate(x))")


def test_head_slice_of_qkv(triton_backend, kernel_dtype, device):
    """A head slice of a packed [T, 3, H, D] projection (token stride 3*H*D); positions with token stride 3."""
    gen = generator(5)
    pos = torch.nn.functional.pad(_positions(ODD_PACK, device), (0, 1), value=-1)[:, :2]
    assert pos.stride() == (3, 1)
    qkv = randn(pos.shape[0], 3, 4, 72, dtype=kernel_dtype, device=device, gen=gen, requires_grad=True)
    k = qkv[:, 1]
    assert not k.is_contiguous()
    out = fastvl.apply_rope_2d(k, pos)
    assert_close(out, reference.apply_rope_2d(k.detach().double(), pos), kernel_dtype)
    grad = randn(*out.shape, dtype=kernel_dtype, device=device, gen=gen)
    out.backward(grad)
    expected = torch.zeros_like(qkv, dtype=torch.float64)
    expected[:, 1] = reference.apply_rope_2d(grad.double(), pos, inverse=True)
    assert_close(qkv.grad, expected, kernel_dtype, name="grad qkv")


def test_empty(triton_backend, device):
    x = torch.zeros(0, 2, 80, device=device)
    assert fastvl.apply_rope_2d(x, torch.zeros(0, 2, dtype=torch.int32, device=device)).shape == (0, 2, 80)


@pytest.mark.gpu
def test_bf16_vision_tower_pack(triton_backend):
    """A ~16k-token pack of Qwen2-VL ViT q (16 heads, D=80) in bf16, forward and backward."""
    grids = torch.tensor([[1, 64, 92], [1, 48, 64], [1, 36, 36], [1, 20, 28], [1, 16, 16]])
    pos = fastvl.vision_positions(grids).cuda()
    x = randn(pos.shape[0], 16, 80, dtype=torch.bfloat16, device="cuda", gen=generator(0), requires_grad=True)
    out = fastvl.apply_rope_2d(x, pos)
    assert_close(out, reference.apply_rope_2d(x.detach().double(), pos), torch.bfloat16)
    grad = randn(*x.shape, dtype=torch.bfloat16, device="cuda", gen=generator(1))
    out.backward(grad)
    assert_close(x.grad, reference.apply_rope_2d(grad.double(), pos, inverse=True), torch.bfloat16, name="grad x")


@pytest.mark.gpu
def test_compiled(triton_backend):
    pos = _positions(ODD_PACK, "cuda")
    x = randn(pos.shape[0], 4, 80, dtype=torch.bfloat16, device="cuda", gen=generator(2))
    compiled = torch.compile(fastvl.apply_rope_2d, fullgraph=True)
    assert_close(compiled(x, pos), reference.apply_rope_2d(x.double(), pos), torch.bfloat16)
