"""Varlen attention kernels (forward, lse, dq/dk/dv; fused 2D RoPE) against the float64 reference."""
import pytest
import torch

import fastvl
from fastvl import reference
from fastvl.testing import assert_close, cu_seqlens, generator, randn, tolerance


def _attend(q, k, v, cu_q, cu_k, causal, rope_pos, theta=10000.0, deterministic=True):
    """(out, lse) of the custom op (whose backward is the kernel's on the triton backend)."""
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    return torch.ops.fastvl.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, q.shape[-1] ** -0.5,
                                             rope_pos, theta, deterministic)[:2]


def _check(device, dtype, lens_q, lens_k=None, heads=2, kv_heads=1, dim=80, causal=False, rope=False, seed=0,
           packed_qkv=False, positions=(0, 64), theta=10000.0, deterministic=True):
    """Kernel out, lse, dq, dk, dv vs the reference on float64 copies of the same inputs."""
    gen = generator(seed)
    cu_q = cu_seqlens(lens_q, device)
    cu_k = cu_q if lens_k is None else cu_seqlens(lens_k, device)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    if packed_qkv:  # q, k, v: strided views of one [T, 3, H, D] projection
        qkv = randn(tq, 3, heads, dim, dtype=dtype, device=device, gen=gen)
        q, k, v = (t.requires_grad_() for t in qkv.unbind(1))
    else:
        q = randn(tq, heads, dim, dtype=dtype, device=device, gen=gen, requires_grad=True)
        k, v = (randn(tk, kv_heads, dim, dtype=dtype, device=device, gen=gen, requires_grad=True) for _ in range(2))
    pos = torch.randint(*positions, (tq, 2), generator=gen, dtype=torch.int32).to(device) if rope else None
    grad = randn(tq, heads, dim, dtype=dtype, device=device, gen=gen)

    with fastvl.use_backend("triton"):
        out, lse = _attend(q, k, v, cu_q, cu_k, causal, pos, theta, deterministic)
        got = [out, lse, *torch.autograd.grad(out, (q, k, v), grad)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.varlen_attention(q64, k64, v64, cu_q, cu_k, causal=causal, rope_pos=pos,
                                                  rope_theta=theta, return_lse=True)
    want = [ref_out, ref_lse, *torch.autograd.grad(ref_out, (q64, k64, v64), grad.double())]

    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf exactly where a query sees no key"
    assert_close(lse[finite], ref_lse[finite], tol=tolerance(torch.float32, device) if dtype == torch.float32 else 1e-3, name="lse")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, tol=tolerance(dtype, device), name=name)


# Each head dim once per dtype, each with a different mix of the options (GQA, causal, RoPE).
CASES = {
    64: dict(heads=2, kv_heads=2, causal=True, rope=True),
    72: dict(heads=2, kv_heads=1, causal=False, rope=False),  # SigLIP
    80: dict(heads=2, kv_heads=2, causal=False, rope=True),  # Qwen2-VL vision
    96: dict(heads=2, kv_heads=1, causal=True, rope=False),
    128: dict(heads=2, kv_heads=1, causal=False, rope=True),
}


@pytest.mark.parametrize("dim", sorted(CASES))
def test_head_dims(triton_backend, device, kernel_dtype, dim):
    _check(device, kernel_dtype, [7, 1, 31, 18], dim=dim, seed=dim, **CASES[dim])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rope_gqa_causal(triton_backend, device, causal):
    _check(device, torch.float32, [31, 5, 40], heads=4, kv_heads=2, dim=80, causal=causal, rope=True, seed=3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nondeterministic_dq(triton_backend, device, causal):
    """deterministic=False: dq summed with atomics by the dk/dv programs, then converted (GQA, RoPE)."""
    _check(device, torch.float32, [9, 1, 40], heads=4, kv_heads=2, dim=72, causal=causal, rope=True, seed=6,
           deterministic=False)


@pytest.mark.parametrize("theta", [1e-2, 10000.0, 1e30])
def test_rope_huge_positions(triton_backend, device, theta):
    """Any int32 position and finite theta rotate as the float64 reference does (dq/dk rotated back)."""
    _check(device, torch.float32, [5, 20], heads=2, kv_heads=2, dim=80, rope=True, seed=9, positions=(-2**31, 2**31 - 1),
           theta=theta)


def test_short_segments(triton_backend, device, kernel_dtype):
    """Segments no longer than the short block (Qwen2.5-VL windows): one short block each."""
    from fastvl.kernels import varlen_attention as kernel

    lens = [16, 3, 16, 11, 16]
    assert max(lens) <= kernel.block_size(1) < kernel.block_size(max(lens) + 1)
    _check(device, kernel_dtype, lens, heads=2, kv_heads=1, dim=64, rope=True, seed=10)


def test_work_list(device):
    """(segment, block) items: longest segments first (ties by index), every block once, unused tail -1;
    REVERSE lists a segment's blocks last first."""
    from fastvl.kernels import varlen_attention as kernel

    lens = [5, 40, 0, 33, 40, 16, 1]
    cu = cu_seqlens(lens, device)
    for reverse in (False, True):
        work = kernel._work_list(cu, sum(lens), 16, reverse).tolist()
        assert len(work) == -(-sum(lens) // 16) + len(lens)
        blocks = [[b for b in range(-(-n // 16))] for n in lens]
        want = [[i, b] for i in sorted(range(len(lens)), key=lambda i: -lens[i])
                for b in (reversed(blocks[i]) if reverse else blocks[i])]
        assert work[:len(want)] == want and all(seg == -1 for seg, _ in work[len(want):])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cross_lengths(triton_backend, device, kernel_dtype, causal):
    """cu_seqlens_k != cu_seqlens_q: Lq > Lk (causal rows with no visible key), Lq < Lk, empty q or k segments."""
    _check(device, kernel_dtype, [20, 3, 0, 9, 33], lens_k=[6, 37, 5, 0, 33], heads=2, kv_heads=1, dim=72,
           causal=causal, seed=4)


def test_packed_qkv_views(triton_backend, device):
    """q, k, v as strided slices of one [T, 3, H, D] tensor (no copies), RoPE and causal."""
    _check(device, torch.float16, [13, 29, 2], heads=2, kv_heads=2, dim=64, causal=True, rope=True, seed=5,
           packed_qkv=True)


@pytest.mark.slow
def test_long_segment(triton_backend, device):
    """A 257-token image among small ones: many q and k blocks per segment, every causal diagonal block."""
    _check(device, torch.float32, [5, 257, 1, 40], heads=1, kv_heads=1, dim=80, causal=True, rope=True, seed=6)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", sorted(CASES))
def test_bf16(triton_backend, device, dim):
    _check(device, torch.bfloat16, [7, 1, 31, 300, 18], dim=dim, seed=dim, **CASES[dim])


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [72, 80, 128])
def test_bf16_nondeterministic(triton_backend, device, dim):
    """The TMA-reduced atomic dq of sm_90 (the interpreter adds through pointers)."""
    _check(device, torch.bfloat16, [7, 300, 18, 129], dim=dim, heads=4, kv_heads=2, causal=dim == 128, rope=dim < 128,
           seed=dim, deterministic=False)


def test_deterministic_must_be_bool():
    q = torch.zeros(4, 1, 64)
    with pytest.raises(TypeError, match="deterministic"):
        fastvl.varlen_attention(q, q, q, cu_seqlens([4]), deterministic=1)


def test_public_op_runs_the_kernel(triton_backend, device, monkeypatch):
    """The public function reaches the kernel module (a missing kernel would silently run the reference)."""
    from fastvl.kernels import varlen_attention as kernel

    calls = []
    for name in ("forward", "backward"):
        fn = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    gen = generator(7)
    q, k, v = (randn(9, 2, 64, device=device, gen=gen, requires_grad=True) for _ in range(3))
    cu = cu_seqlens([4, 5], device)
    fastvl.varlen_attention(q, k, v, cu, max_seqlen_q=5).sum().backward()
    assert calls == ["forward", "backward"]


def test_backward_strided_grad(triton_backend, device):
    """kernel.backward reads grad_out (and out) through their strides: an expanded gradient works."""
    from fastvl.kernels import varlen_attention as kernel

    gen = generator(8)
    q, k, v = (randn(12, 1, 96, device=device, gen=gen) for _ in range(3))
    cu = cu_seqlens([5, 7], device)
    out, lse, *_ = kernel.forward(q, k, v, cu, cu, 7, 7, False, 96 ** -0.5, None, 10000.0)
    grad = randn(1, 1, 96, device=device, gen=gen).expand(12, 1, 96)
    strided = kernel.backward(grad, q, k, v, out, lse, cu, cu, 7, 7, False, 96 ** -0.5, None, 10000.0)
    dense = kernel.backward(grad.contiguous(), q, k, v, out, lse, cu, cu, 7, 7, False, 96 ** -0.5, None, 10000.0)
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)
