"""fastvl.nn modules: the math against plain float64 PyTorch, and state dicts of the original modules."""
import pytest
import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as Qwen2VLPatchMerger

from fastvl.nn import DeepStack, PatchMerger, SpatialAttentionPool, VisionAttention
from fastvl.reference.apply_rope_2d import apply_rope_2d
from fastvl.testing import assert_close, cu_seqlens, generator, randn


def _attention_naive(module, x, lengths, pos):
    """Per segment: split heads, rotate q/k by 2D RoPE, softmax attention, proj (float64)."""
    out, start = [], 0
    heads = module.num_heads
    for n in lengths:
        q, k, v = module.qkv(x[start:start + n]).view(n, 3, heads, -1).unbind(1)
        q, k = apply_rope_2d(q, pos[start:start + n]), apply_rope_2d(k, pos[start:start + n])
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1))
        start += n
    return module.proj(torch.cat(out))


def test_vision_attention_matches_naive_per_segment():
    gen = generator(0)
    torch.manual_seed(0)
    module = VisionAttention(128, 2).double()
    lengths = [7, 1, 13]
    x = randn(sum(lengths), 128, dtype=torch.float64, gen=gen, requires_grad=True)
    pos = torch.randint(0, 9, (sum(lengths), 2), generator=gen, dtype=torch.int32)
    out = module(x, cu_seqlens(lengths), max(lengths), rope_pos=pos)
    ref = _attention_naive(module, x, lengths, pos)
    assert_close(out, ref)
    grad = randn(*out.shape, dtype=torch.float64, gen=gen)
    got = torch.autograd.grad(out, [x, module.qkv.weight], grad)
    want = torch.autograd.grad(ref, [x, module.qkv.weight], grad)
    for g, w, name in zip(got, want, ["dx", "dqkv"]):
        assert_close(g, w, name=name)


def test_vision_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_heads"):
        VisionAttention(130, 3)


@pytest.mark.parametrize("norm, hf_class", [("layernorm", Qwen2VLPatchMerger), ("rmsnorm", Qwen2_5_VLPatchMerger)])
def test_patch_merger_loads_qwen_state_dict(norm, hf_class):
    torch.manual_seed(1)
    hf = hf_class(dim=48, context_dim=64, spatial_merge_size=2).double()
    for p in hf.parameters():  # non-trivial norm weights too
        nn.init.normal_(p, std=0.3)
    ours = PatchMerger(64, 48, merge_size=2, norm=norm).double()
    ours.load_state_dict(hf.state_dict())  # strict: identical names and shapes
    x = randn(4 * 7, 64, dtype=torch.float64, gen=generator(2), requires_grad=True)
    out, ref = ours(x), hf(x)
    tol = 1e-6  # Qwen2.5-VL's RMSNorm computes in float32 whatever the input dtype
    assert_close(out, ref, tol=tol)
    assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0], tol=tol, name="dx")


def test_patch_merger_options():
    m = PatchMerger(32, 16, merge_size=4, hidden_dim=40)
    assert m.mlp[0].weight.shape == (40, 16 * 32) and m.mlp[2].weight.shape == (16, 40)
    assert m(torch.randn(32, 32)).shape == (2, 16)
    with pytest.raises(ValueError, match="norm"):
        PatchMerger(32, 16, norm="batchnorm")


def _sap_naive(module, x, grids):
    """FlashSloth's loop: per image, per window (row-major), softmax of the window's scores."""
    scores = module.mlp(x).squeeze(-1)
    out, start, w = [], 0, module.window
    for h, wd in grids:
        s = scores[start:start + h * wd].view(h, wd)
        feats = x[start:start + h * wd].view(h, wd, -1)
        for i in range(0, h, w):
            for j in range(0, wd, w):
                a = s[i:i + w, j:j + w].reshape(-1).softmax(0)
                out.append((a[:, None] * feats[i:i + w, j:j + w].reshape(-1, x.shape[1])).sum(0))
        start += h * wd
    return torch.stack(out)


def test_spatial_attention_pool_names_and_math():
    torch.manual_seed(3)
    module = SpatialAttentionPool(24, dropout=0.1).double()
    assert set(module.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias"}
    grids = [(5, 7), (3, 3), (6, 6)]
    x = randn(sum(h * w for h, w in grids), 24, dtype=torch.float64, gen=generator(4), requires_grad=True)
    grid_hw = torch.tensor(grids)
    module.eval()
    out = module(x, grid_hw)
    assert out.shape == (2 * 3 + 1 + 4, 24)
    assert_close(out, _sap_naive(module, x, grids))
    # training with dropout: the unfused path, same dropout draw as the naive loop
    module.train()
    torch.manual_seed(5)
    out = module(x, grid_hw)
    torch.manual_seed(5)
    ref = _sap_naive(module, x, grids)
    assert_close(out, ref)
    assert (out - module.eval()(x, grid_hw)).abs().max() > 1e-6  # dropout really acted
    got = torch.autograd.grad(out.sum(), [x, module.mlp[0].weight, module.mlp[3].weight])
    want = torch.autograd.grad(ref.sum(), [x, module.mlp[0].weight, module.mlp[3].weight])
    for g, w, name in zip(got, want, ["dx", "dw1", "dw2"]):
        assert_close(g, w, name=name)
    # b2 cannot change the output: its gradient is exactly 0 on both paths, as in the fused op
    module.train()
    weight = randn(*out.shape, dtype=torch.float64, gen=generator(6))
    assert torch.autograd.grad((module(x, grid_hw) * weight).sum(), module.mlp[3].bias)[0].item() == 0.0


class _Recorder(nn.Module):
    """A decoder-layer stand-in that records the hidden states it receives."""

    def forward(self, hidden_states, scale=1.0):
        self.seen = hidden_states.clone()
        return hidden_states * scale


def test_deepstack_adds_group_k_before_layer_start_plus_k():
    layers = nn.ModuleList(_Recorder() for _ in range(5))
    ds = DeepStack(layers, start=1)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    index = torch.tensor([1, 2, 7, 11])  # rows of the flattened [2*6] positions
    stacked = torch.randn(3, 4, 8, dtype=torch.float64)
    ds.arm(index, stacked)

    def run(h, by_keyword):
        for layer in layers:
            h = layer(hidden_states=h) if by_keyword else layer(h)
        return h

    for by_keyword in (False, True):
        run(hidden, by_keyword)
        expected = hidden.clone().view(-1, 8)
        assert torch.equal(layers[0].seen, hidden)
        for k in range(3):
            expected[index] += stacked[k]
            assert torch.allclose(layers[1 + k].seen.view(-1, 8), expected)
        assert torch.allclose(layers[4].seen.view(-1, 8), expected)  # nothing added after the last group
    ds.disarm()
    run(hidden, False)
    assert all(torch.equal(layer.seen, hidden) for layer in layers)
    with pytest.raises(ValueError, match="decoder layers"):
        ds.arm(index, torch.randn(5, 4, 8))
    ds.remove()
    ds._state = (index, stacked)
    run(hidden, False)
    assert torch.equal(layers[2].seen, hidden)  # hooks gone
