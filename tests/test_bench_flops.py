"""FLOP counting: every fastvl op has a formula, and each formula counts what the plain PyTorch reference does."""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fastvl
from fastvl import reference
from fastvl.bench import flops
from fastvl.testing import cu_seqlens, generator, randn


def _plain_count(fn):
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


def test_every_fastvl_op_has_a_formula():
    names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastvl::")]
    assert names and all(getattr(torch.ops.fastvl, n) in flops.FORMULAS for n in names), names


def test_varlen_attention_forward_and_backward():
    lengths, heads, dim = [7, 31, 1], 2, 64
    gen = generator(0)
    q, k, v = (randn(sum(lengths), heads, dim, gen=gen, requires_grad=True) for _ in range(3))
    cu = cu_seqlens(lengths)
    pos = fastvl.vision_positions(torch.tensor([[1, 1, 7], [1, 31, 1], [1, 1, 1]]), 1)

    def step():
        fastvl.varlen_attention(q, k, v, cu, rope_pos=pos).sum().backward()

    _, counted = flops.count(step)
    assert counted == (4 + 10) * sum(n * n for n in lengths) * heads * dim


def test_cpu_sdpa_is_counted_like_the_gpu_kernels():
    q, k, v = (randn(1, 2, 9, 16, gen=generator(i), requires_grad=True) for i in range(3))
    _, counted = flops.count(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    assert counted == (2 + 5) * 2 * 2 * 9 * 9 * 16  # torch's convention: the full score matrix, backward 2.5x


def test_patch_merge_and_sap_count_the_reference_matmuls():
    gen = generator(1)
    c, hid, out = 8, 24, 6
    x = randn(16, c, gen=gen)
    ln_w, ln_b, b1, b2 = randn(c, gen=gen), randn(c, gen=gen), randn(hid, gen=gen), randn(out, gen=gen)
    w1, w2 = randn(hid, 4 * c, gen=gen), randn(out, hid, gen=gen)
    args = (x, ln_w, ln_b, w1, b1, w2, b2)
    assert flops.count(lambda: fastvl.patch_merge(*args))[1] == _plain_count(lambda: reference.patch_merge(*args))
    xs, grid = randn(9 * 6, c, gen=gen), torch.tensor([[9, 6]])
    sap = (randn(c, c, gen=gen), randn(c, gen=gen), randn(1, c, gen=gen), randn(1, gen=gen))
    expected = 2 * xs.shape[0] * (c * c + c)
    assert flops.count(lambda: fastvl.spatial_attention_pool(xs, grid, *sap))[1] == expected
    assert _plain_count(lambda: reference.spatial_attention_pool(xs, grid, *sap)) == expected
