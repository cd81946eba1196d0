"""The native CPU backend (fastvl._C) against the float64 references: every op, every gradient, odd
lengths, several images per pack, GQA, causal and cross lengths, head dims 64-128 and small ones,
strided inputs, fp32/bf16/fp16; opcheck and torch.compile on it; its automatic selection."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastvl
from fastvl import _native
from fastvl.reference.apply_rope_2d import apply_rope_2d as rope_reference
from fastvl.reference.varlen_attention import varlen_attention as attention_reference
from fastvl.testing import assert_close, cu_seqlens, generator, randn, sap_window_loop

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SKIPPED = os.environ.get("FASTVL_NATIVE", "1") in ("0", "")
pytestmark = pytest.mark.skipif(not _native.available(), reason=f"fastvl._C is not built: {_native.ERROR}")


@pytest.fixture(autouse=True)
def native_backend():
    with fastvl.use_backend("native"):
        yield


@pytest.mark.skipif(SKIPPED, reason="FASTVL_NATIVE=0")
def test_extension_is_built():
    """An install without FASTVL_NATIVE=0 has the extension (else every test here would skip)."""
    assert _native.available(), _native.ERROR


def _ids(dtype):
    return str(dtype).replace("torch.", "")


def _grads(fn, inputs, dtype, seed=1):
    """fn's output and the gradients of every floating input, with inputs cast to ``dtype`` (float64
    on the reference backend); the cotangent is the same seeded tensor."""
    leaves = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    cotangent = randn(*out.shape, dtype=dtype, gen=generator(seed))
    diff = [t for t in leaves if t.requires_grad]
    return out, torch.autograd.grad(out, diff, cotangent)


def _check_against_reference(fn, inputs, dtype, skip_grads=()):
    out, grads = _grads(fn, inputs, dtype)
    with fastvl.use_backend("reference"):  # on the same values: inputs rounded to dtype
        ref, ref_grads = _grads(fn, [t.to(dtype).to(t.dtype) if t.is_floating_point() else t for t in inputs], F64)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    for i, (g, ref_g) in enumerate(zip(grads, ref_grads)):
        if i not in skip_grads:
            assert g.dtype == dtype
            assert_close(g, ref_g, dtype, name=f"grad {i}")


# ---------------------------------------------------------------- attention


def _pack(gen, count):
    lengths = torch.randint(1, 151, (count,), generator=gen).tolist()
    grids = torch.tensor([[1, n, 1] for n in lengths])  # any (row, col) pairs serve the rotation
    pos = torch.randint(0, 40, (sum(lengths), 2), generator=gen, dtype=torch.int32)
    return lengths, grids, pos


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
def test_attention_rope_pack(dtype, head_dim):
    gen = generator(head_dim)
    lengths, _, pos = _pack(gen, 4)
    cu = cu_seqlens(lengths)
    t = sum(lengths)
    q, k, v = (randn(t, 3, head_dim, dtype=F64, gen=gen) for _ in range(3))
    _check_against_reference(lambda q, k, v: fastvl.varlen_attention(q, k, v, cu, rope_pos=pos), [q, k, v], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_gqa_cross_lengths(dtype, causal):
    gen = generator(7 + causal)
    lq, lk = [5, 0, 130, 7, 1], [9, 4, 70, 0, 33]  # empty segments; causal rows without a visible key
    q = randn(sum(lq), 6, 80, dtype=F64, gen=gen)
    k, v = (randn(sum(lk), 2, 80, dtype=F64, gen=gen) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    _check_against_reference(
        lambda q, k, v: fastvl.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=0.3), [q, k, v], dtype)


def test_attention_long_segment_spans_key_blocks():
    """Segments longer than the forward's key block (1024) and with several backward blocks."""
    gen = generator(3)
    lengths = [1100, 300]
    q, k, v = (randn(sum(lengths), 1, 64, dtype=F64, gen=gen) for _ in range(3))
    cu = cu_seqlens(lengths)
    for causal in (False, True):
        _check_against_reference(lambda q, k, v: fastvl.varlen_attention(q, k, v, cu, causal=causal), [q, k, v],
                                 torch.float32)


def test_attention_strided_views_and_lse():
    """q/k/v as slices of a packed [T, 3, H, D] projection; the saved log-sum-exp matches."""
    gen = generator(11)
    lengths, _, pos = _pack(gen, 3)
    cu = cu_seqlens(lengths)
    qkv = randn(sum(lengths), 3, 4, 80, dtype=torch.float32, gen=gen)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    out, lse, *_ = torch.ops.fastvl.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), False, 0.1, pos, 1e4,
                                                     True)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), cu, softmax_scale=0.1, rope_pos=pos,
                                       return_lse=True)
    assert_close(out, ref, torch.float32)
    assert_close(lse, ref_lse, torch.float32, name="lse")
    with fastvl.use_backend("reference"):
        _, grads_ref = _grads(lambda q, k, v: fastvl.varlen_attention(q, k, v, cu, rope_pos=pos), [q, k, v], F64)
    qkv = qkv.detach().requires_grad_()
    out = fastvl.varlen_attention(*qkv.unbind(1), cu, rope_pos=pos)
    (grad,) = torch.autograd.grad(out, qkv, randn(*out.shape, gen=generator(1)))
    for i, ref_g in enumerate(grads_ref):
        assert_close(grad[:, i], ref_g, torch.float32, name=f"grad {i}")


@pytest.mark.parametrize("head_dim", [4, 8, 20, 36])
def test_attention_small_head_dims(head_dim):
    """The kernels take any head dim the reference does (the public op admits model sizes only)."""
    gen = generator(head_dim)
    lengths, _, pos = _pack(gen, 3)
    cu, m = cu_seqlens(lengths), max(lengths)
    q, k, v = (randn(sum(lengths), 2, head_dim, dtype=torch.float32, gen=gen, requires_grad=True) for _ in range(3))
    out = torch.ops.fastvl.varlen_attention(q, k, v, cu, cu, m, m, True, 0.5, pos, 100.0, True)[0]
    grads = torch.autograd.grad(out, (q, k, v), randn(*out.shape, gen=generator(2)))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, cu, causal=True, softmax_scale=0.5, rope_pos=pos, rope_theta=100.0)
    ref_grads = torch.autograd.grad(ref, leaves, randn(*out.shape, dtype=F64, gen=generator(2)))
    assert_close(out, ref, torch.float32)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, torch.float32, name=f"grad {i}")


# ---------------------------------------------------------------- apply_rope_2d


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_apply_rope_2d(dtype):
    gen = generator(5)
    pos = torch.randint(-5, 60, (257, 2), generator=gen, dtype=torch.int32)
    x = randn(257, 3, 2, 20, dtype=F64, gen=gen)[:, :, 1]  # a strided head slice
    _check_against_reference(lambda x: fastvl.apply_rope_2d(x, pos, 500.0), [x], dtype)
    # the backward is the inverse rotation
    y = fastvl.apply_rope_2d(x.to(torch.float32), pos, 500.0)
    assert_close(torch.ops.fastvl.apply_rope_2d(y, pos, 500.0, True), x, torch.float32)
    assert_close(y, rope_reference(x, pos, 500.0), torch.float32)


# ---------------------------------------------------------------- compression ops


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("merge, norm", [(2, "layernorm"), (4, "layernorm"), (2, "rmsnorm"), (4, "rmsnorm")])
def test_patch_merge(dtype, merge, norm):
    gen = generator(merge)
    tokens, channels, hidden, out = 3 * merge * merge * 7, 13, 40, 9
    x = randn(tokens, channels, dtype=F64, gen=gen) * 2 + 0.5
    ln_w, ln_b = 1 + 0.1 * randn(channels, dtype=F64, gen=gen), 0.1 * randn(channels, dtype=F64, gen=gen)
    k = merge * merge * channels
    w1, b1 = randn(hidden, k, dtype=F64, gen=gen, scale=k ** -0.5), randn(hidden, dtype=F64, gen=gen, scale=0.1)
    w2, b2 = randn(out, hidden, dtype=F64, gen=gen, scale=hidden ** -0.5), randn(out, dtype=F64, gen=gen, scale=0.1)
    if norm == "rmsnorm":
        fn = lambda x, w, *a: fastvl.patch_merge(x, w, None, *a, merge_size=merge, norm=norm)  # noqa: E731
        inputs = [x, ln_w, w1, b1, w2, b2]
    else:
        fn = lambda *a: fastvl.patch_merge(*a, merge_size=merge)  # noqa: E731
        inputs = [x, ln_w, ln_b, w1, b1, w2, b2]
    _check_against_reference(fn, inputs, dtype)
    with torch.no_grad():  # inference saves nothing
        assert all(t.numel() == 0 for t in torch.ops.fastvl.patch_merge(
            *[t.to(dtype) for t in (x, ln_w, ln_b, w1, b1, w2, b2)], merge, 1e-6, "layernorm", False)[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("window", [2, 3])
def test_spatial_attention_pool(dtype, window):
    gen = generator(window)
    grids = [(7, 5), (3, 3), (1, 4), (6, 8)]  # edge windows of every size
    channels, hid = 19, 23
    x = randn(sum(h * w for h, w in grids), channels, dtype=F64, gen=gen)
    w1, b1 = randn(hid, channels, dtype=F64, gen=gen, scale=0.3), randn(hid, dtype=F64, gen=gen, scale=0.1)
    w2, b2 = randn(1, hid, dtype=F64, gen=gen, scale=0.3), randn(1, dtype=F64, gen=gen)
    fn = lambda x, *a: fastvl.spatial_attention_pool(x, grids, *a, window=window)  # noqa: E731
    _check_against_reference(fn, [x, w1, b1, w2, b2], dtype, skip_grads=(4,))
    out, grads = _grads(fn, [x, w1, b1, w2, b2], dtype)
    assert torch.count_nonzero(grads[4]) == 0  # b2 shifts every score of a window alike
    assert_close(out, sap_window_loop(x, grids, w1, b1, w2, b2, window), dtype, name="window loop")
    # a frozen x: no dx, the weight gradients unchanged
    frozen = [t.to(dtype).requires_grad_(i > 0) for i, t in enumerate((x, w1, b1, w2, b2))]
    out = fn(*frozen)
    weights = torch.autograd.grad(out, frozen[1:], randn(*out.shape, dtype=dtype, gen=generator(1)))
    for g, ref in zip(weights[:3], grads[1:4]):
        assert torch.equal(g, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_deepstack_add(dtype):
    gen = generator(2)
    hidden = randn(3, 41, 24, dtype=F64, gen=gen)
    index = torch.randperm(123, generator=gen)[:37]
    stacked = randn(37, 24, dtype=F64, gen=gen)
    _check_against_reference(lambda h, s: fastvl.deepstack_add(h, index, s), [hidden, stacked], dtype)
    # in place, also on a hidden whose leading dims no single stride spans
    for h in (hidden.to(dtype), hidden.to(dtype).transpose(0, 1)):
        expected = fastvl.reference.deepstack_add(h, index, stacked.to(dtype))
        assert fastvl.deepstack_add_(h, index, stacked.to(dtype)) is h
        assert torch.equal(h, expected)


# ---------------------------------------------------------------- registration, compile, selection


def _native_samples():
    from test_ops_registration import _record

    with fastvl.use_backend("native"):
        return [pytest.param(f, a, k, id=f"{f.name()}-{i}") for i, (f, a, k) in enumerate(_record(torch.float32))]


@pytest.mark.parametrize("func, args, kwargs", _native_samples() if _native.available() else [])
def test_opcheck_native(func, args, kwargs):
    torch.library.opcheck(func, args, kwargs)


@pytest.mark.parametrize("name", ["varlen_attention-rope", "varlen_attention-cross-causal", "apply_rope_2d",
                                  "patch_merge-layernorm", "spatial_attention_pool", "deepstack_add"])
def test_compile_fullgraph_native(name):
    """Compiled (no graph break) equals eager on the native kernels; inductor on the attention."""
    from test_ops_registration import assert_compiled_matches_eager

    assert_compiled_matches_eager(name, "inductor" if name == "varlen_attention-rope" else "aot_eager")


_SELECTION = r"""
import json, os, torch, fastvl
from fastvl.ops._dispatch import kernel_module
x = torch.empty(2, 1, 8)
print(json.dumps({"backend": fastvl._backend.resolve(x.device),
                  "native_module": kernel_module("varlen_attention", x) is fastvl._native.module("varlen_attention"),
                  "float64": kernel_module("varlen_attention", x.double()) is None}))
"""


@pytest.mark.parametrize("env, expected", [({}, "native"), ({"FASTVL_BACKEND": "reference"}, "reference")])
def test_native_is_chosen_for_cpu_tensors(env, expected):
    """Automatic on CPU (no Triton interpreter): native; FASTVL_BACKEND=reference still forces the specification."""
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", _SELECTION], env={**base, **env}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == expected and result["float64"]
    assert result["native_module"] == (expected == "native")


def test_native_backend_needs_cpu_tensors():
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        fastvl._backend.resolve(torch.device("cuda"))


def test_validation_before_dispatch():
    q = torch.randn(5, 2, 48)
    with pytest.raises(ValueError, match="rope_pos needs a head_dim that is a multiple of 4|rope_pos must"):
        fastvl.varlen_attention(q, q, q, cu_seqlens([5]), rope_pos=torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the token count 5"):
        fastvl.varlen_attention(torch.randn(5, 2, 64), torch.randn(5, 2, 64), torch.randn(5, 2, 64), cu_seqlens([4]))
