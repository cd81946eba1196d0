"""deepstack_add / deepstack_add_: Triton kernel vs the float64 reference, in place and out of place, gradients."""
import pytest
import torch

import fastvl
from fastvl.testing import assert_close, generator, randn

B, L, C = 3, 41, 300  # C spans two channel tiles, the last one partial


def _case(dtype, device, seed=0, count=37, index_dtype=torch.int64):
    gen = generator(seed)
    hidden = randn(B, L, C, dtype=dtype, device=device, gen=gen)
    index = torch.randperm(B * L, generator=gen)[:count].to(device=device, dtype=index_dtype)
    stacked = randn(count, C, dtype=dtype, device=device, gen=gen)
    return hidden, index, stacked


def _reference(hidden, index, stacked):
    with fastvl.use_backend("reference"):
        return fastvl.deepstack_add(hidden.double(), index, stacked.double())


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_out_of_place_and_gradients(triton_backend, kernel_dtype, device, index_dtype):
    hidden, index, stacked = _case(kernel_dtype, device, index_dtype=index_dtype)
    hidden.requires_grad_()
    stacked.requires_grad_()
    out = fastvl.deepstack_add(hidden, index, stacked)
    assert_close(out, _reference(hidden, index, stacked), kernel_dtype)
    assert not torch.equal(out, hidden.detach()) and hidden.detach().ne(out.detach()).any(-1).sum() == index.numel()
    grad = randn(B, L, C, dtype=kernel_dtype, device=device, gen=generator(9))
    out.backward(grad)
    assert torch.equal(hidden.grad, grad)
    assert torch.equal(stacked.grad, grad.reshape(-1, C)[index.long()])


def test_out_of_place_no_grad(triton_backend, kernel_dtype, device):
    """Inference: hidden untouched, the result a new contiguous tensor."""
    hidden, index, stacked = _case(kernel_dtype, device, seed=13)
    before = hidden.clone()
    with torch.no_grad():
        out = fastvl.deepstack_add(hidden, index, stacked)
    assert torch.equal(hidden, before) and out.is_contiguous() and out.data_ptr() != hidden.data_ptr()
    assert_close(out, _reference(hidden, index, stacked), kernel_dtype)


def test_in_place_no_grad(triton_backend, kernel_dtype, device):
    hidden, index, stacked = _case(kernel_dtype, device, seed=1)
    expected = _reference(hidden, index, stacked)
    version = hidden._version
    with torch.no_grad():
        result = fastvl.deepstack_add_(hidden, index, stacked)
    assert result is hidden and hidden._version > version
    assert_close(hidden, expected, kernel_dtype)


def _strided(layout, device):
    """[B, L, C]-like hidden whose rows are not one stride apart: a transpose (two row strides), a channel
    slice of a wider buffer, and a 4-D permutation whose rows need three strides."""
    if layout == "transposed":
        return randn(L, B, C, device=device, gen=generator(3)).transpose(0, 1)
    if layout == "sliced":
        return randn(B, L, C + 20, device=device, gen=generator(4))[..., :C]
    return randn(L, 3, 2, C, device=device, gen=generator(5)).permute(2, 1, 0, 3)[:, :, :L - 1]


@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted"])
def test_strided_hidden(triton_backend, device, layout):
    """Out of place and in place on strided hidden: same values as the reference, no write elsewhere."""
    hidden = _strided(layout, device)
    rows = hidden.numel() // C
    gen = generator(6)
    index = torch.randperm(rows, generator=gen)[:rows // 3].to(device)
    stacked = randn(index.numel(), C, device=device, gen=gen)
    expected = _reference(hidden, index, stacked)
    assert_close(fastvl.deepstack_add(hidden, index, stacked), expected, torch.float32)
    base = hidden._base.clone()
    fastvl.deepstack_add_(hidden, index, stacked)
    assert_close(hidden, expected, torch.float32)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched.view(-1)[torch.as_strided(torch.arange(base.numel(), device=device), hidden.shape, hidden.stride(),
                                        hidden.storage_offset()).reshape(-1)] = False
    assert torch.equal(hidden._base[untouched], base[untouched])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_in_place_under_autograd(backend, device):
    """Non-leaf hidden: same values and gradients as the out-of-place op, without a copy of hidden."""
    hidden, index, stacked = _case(torch.float32, device, seed=5)
    weight = randn(C, device=device, gen=generator(6))
    grads = []
    for op in (fastvl.deepstack_add, fastvl.deepstack_add_):
        leaf = hidden.clone().requires_grad_()
        extra = stacked.clone().requires_grad_()
        with fastvl.use_backend(backend):
            h = leaf * 2.0
            out = op(h, index, extra)
        if op is fastvl.deepstack_add_:
            assert out is h
        (out * weight).square().sum().backward()
        grads.append((out.detach(), leaf.grad, extra.grad))
    for a, b in zip(*grads):
        assert_close(b, a, torch.float32)


def test_in_place_into_constant_hidden(triton_backend, device):
    """hidden without grad (a frozen embedding), stacked trainable: the result joins the graph."""
    hidden, index, stacked = _case(torch.float32, device, seed=10)
    stacked.requires_grad_()
    out = fastvl.deepstack_add_(hidden, index, stacked)
    assert out is hidden and out.requires_grad
    grad = randn(B, L, C, device=device, gen=generator(11))
    out.backward(grad)
    assert torch.equal(stacked.grad, grad.reshape(-1, C)[index])


def test_in_place_autograd_errors(triton_backend, device):
    hidden, index, stacked = _case(torch.float32, device, seed=7)
    leaf = hidden.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fastvl.deepstack_add_(leaf, index, stacked)
    saved = leaf.sigmoid()  # sigmoid's backward needs its output unchanged
    fastvl.deepstack_add_(saved, index, stacked)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_empty_index(triton_backend, device):
    hidden, _, _ = _case(torch.float16, device)
    index = torch.zeros(0, dtype=torch.long, device=device)
    stacked = hidden.new_zeros(0, C)
    assert torch.equal(fastvl.deepstack_add(hidden, index, stacked), hidden)
    before = hidden.clone()
    assert torch.equal(fastvl.deepstack_add_(hidden, index, stacked), before)


@pytest.mark.parametrize("op", [fastvl.deepstack_add, fastvl.deepstack_add_], ids=["out_of_place", "in_place"])
def test_index_validation(op, device):
    hidden, index, stacked = _case(torch.float32, device)
    bad = index.clone()
    bad[3] = B * L
    with pytest.raises(ValueError, match=r"index must lie in \[0, 123\)"):
        op(hidden, bad, stacked)
    bad[3] = -1
    with pytest.raises(ValueError, match="index must lie in"):
        op(hidden, bad, stacked)
    bad[3] = index[5]
    with pytest.raises(ValueError, match="must not repeat"):
        op(hidden, bad, stacked)
    with pytest.raises(TypeError, match="index must have dtype"):
        op(hidden, index.float(), stacked)
    with pytest.raises(ValueError, match="stacked must have shape"):
        op(hidden, index, stacked[:, :-1])
    with pytest.raises(TypeError, match="stacked must have the dtype of hidden"):
        op(hidden, index, stacked.half())


def test_in_place_registration(device):
    """torch.library.opcheck: the mutating op declares its mutation and its fake impl agrees."""
    hidden, index, stacked = _case(torch.float32, device, seed=12)
    torch.library.opcheck(torch.ops.fastvl.deepstack_add_.default, (hidden, index, stacked))


def test_compile_in_place(device):
    """The mutating op traces without graph breaks (reference kernel on CPU)."""
    hidden, index, stacked = _case(torch.float32, device, seed=8)
    expected = _reference(hidden, index, stacked)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def inject(h, i, s):
        torch.ops.fastvl.deepstack_add_(h, i, s)
        return h

    with torch.no_grad():
        inject(hidden, index, stacked)
    assert_close(hidden, expected, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_in_place_overlapping_rows(backend, device):
    """An expanded hidden (rows sharing memory) cannot be updated in place: a clear error, on every backend;
    out of place it is an ordinary input."""
    row = randn(1, 1, C, device=device, gen=generator(14))
    hidden = row.expand(B, L, C)
    index = torch.tensor([0, 5, 7], device=device)
    stacked = randn(3, C, device=device, gen=generator(15))
    with fastvl.use_backend(backend):
        with pytest.raises(ValueError, match="^hidden: its elements may share memory"):
            fastvl.deepstack_add_(hidden, index, stacked)
        out = fastvl.deepstack_add(hidden, index, stacked)
    assert_close(out, _reference(hidden.contiguous(), index, stacked), torch.float32)


@pytest.mark.parametrize("op", [fastvl.deepstack_add, fastvl.deepstack_add_], ids=["out_of_place", "in_place"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_zero_channels(op, backend, device):
    hidden = torch.zeros(4, 0, device=device)
    with fastvl.use_backend(backend), pytest.raises(ValueError, match="^hidden must be at least 2-D with at least one"):
        op(hidden, torch.tensor([1], device=device), torch.zeros(1, 0, device=device))


@pytest.mark.parametrize("op", [fastvl.deepstack_add, fastvl.deepstack_add_], ids=["out_of_place", "in_place"])
def test_unchecked_index(triton_backend, device, op):
    """check_index=False reads no index values on the host; a valid index gives the same sum, and an
    invalid one never makes the kernels touch memory outside hidden (rows out of range are skipped)."""
    hidden, index, stacked = _case(torch.float32, device, seed=16)
    expected = _reference(hidden, index, stacked)

    def host_read(*args):
        raise AssertionError("index read on the host")

    with pytest.MonkeyPatch.context() as patch:
        for method in ("tolist", "item", "__bool__", "__int__"):
            patch.setattr(torch.Tensor, method, host_read)
        out = op(hidden.clone(), index, stacked, check_index=False)
    assert_close(out, expected, torch.float32)

    buffer = randn(B * L + 8, C, device=device, gen=generator(17))
    hidden = buffer[4:-4]
    before = buffer.clone()
    bad = torch.tensor([-3, 0, B * L, B * L + 3, 9], device=device)
    out = op(hidden, bad, stacked[:5], check_index=False)
    assert torch.equal(buffer[:4], before[:4]) and torch.equal(buffer[-4:], before[-4:])
    keep = [1, 4]  # the entries in range
    assert_close(out, _reference(before[4:-4], bad[keep], stacked[keep]), torch.float32)
    with pytest.raises(TypeError, match="^check_index must be a bool"):
        op(hidden, index, stacked, check_index=1)


@pytest.mark.gpu
def test_bf16_llm_shape(triton_backend):
    """An LLM of width 1536, 4 x 2048 tokens, 3980 image rows, bf16: out of place with gradients, and in place."""
    gen = generator(18)
    hidden = randn(4, 2048, 1536, dtype=torch.bfloat16, device="cuda", gen=gen, requires_grad=True)
    index = torch.randperm(4 * 2048, generator=gen)[:3980].cuda()
    stacked = randn(3980, 1536, dtype=torch.bfloat16, device="cuda", gen=gen, requires_grad=True)
    out = fastvl.deepstack_add(hidden, index, stacked, check_index=False)
    assert_close(out, _reference(hidden.detach(), index, stacked.detach()), torch.bfloat16)
    grad = randn(*out.shape, dtype=torch.bfloat16, device="cuda", gen=gen)
    out.backward(grad)
    assert torch.equal(hidden.grad, grad) and torch.equal(stacked.grad, grad.view(-1, 1536)[index])
    with torch.no_grad():
        target = hidden.detach().clone()
        fastvl.deepstack_add_(target, index, stacked.detach())
    assert torch.equal(target, out.detach())
