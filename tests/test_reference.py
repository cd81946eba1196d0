"""The references are the specification: each is checked in float64, forward and every gradient, against
an independent implementation (Hugging Face Qwen2-VL / Qwen2.5-VL modules, SDPA per segment, Python loops).

The public ops run here on the reference backend (conftest), so the custom-op plumbing (schema, autograd
through the recomputed reference backward) is covered too. Hugging Face computes the rotary embedding and
RMSNorm in fp32 whatever the input dtype: comparisons that go through them use HF_FP32_TOL.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import fastvl
from fastvl import reference
from fastvl.testing import assert_close, cu_seqlens, generator, randn, sap_window_loop

F64 = torch.float64
HF_FP32_TOL = 1e-6
# t=2 frames, odd merged sizes (h/2 = 3, w/2 = 5), several images per pack
GRIDS = [[[1, 6, 10]], [[2, 6, 10]], [[1, 6, 10], [2, 4, 6], [1, 2, 2]]]


def grads(outputs, inputs, gen):
    """Gradients of <outputs, g> for a seeded random cotangent g (the same for two implementations)."""
    cotangent = randn(*outputs.shape, dtype=outputs.dtype, gen=gen)
    return torch.autograd.grad(outputs, inputs, cotangent)


def assert_all_close(outs, refs, names, tol=None):
    for out, ref, name in zip(outs, refs, names):
        assert_close(out, ref, F64, tol=tol, name=name)


def randomize(module, gen):
    """Random parameters (norm weights of ones and zero biases would hide mistakes), O(1) activations."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(*p.shape, dtype=p.dtype, gen=gen, scale=p.shape[-1] ** -0.5 if p.dim() == 2 else 0.5))
    return module


def qwen2_vision_config(embed_dim=160, heads=2, theta=10000.0, attn="sdpa"):
    config = Qwen2VLVisionConfig(
        embed_dim=embed_dim, num_heads=heads, depth=1, hidden_size=64,
        rope_parameters={"rope_type": "axial", "rope_theta": theta},
    )
    config._attn_implementation = attn
    return config


# ---------------------------------------------------------------- Hugging Face Qwen2-VL / Qwen2.5-VL


@pytest.mark.parametrize("merge_size", [2, 1, 3])
@pytest.mark.parametrize("grid", GRIDS, ids=["t1", "t2", "pack"])
def test_vision_positions_match_transformers(grid, merge_size):
    if merge_size == 3:
        grid = [[t, 3 * h // 2, 3 * w // 2] for t, h, w in grid]
    grid_thw = torch.tensor(grid)
    ours = fastvl.vision_positions(grid_thw, merge_size)
    theirs = get_vision_position_ids(grid_thw, merge_size)
    assert ours.dtype == torch.int32
    assert torch.equal(ours, theirs.to(torch.int32))


@pytest.mark.parametrize("theta", [10000.0, 100.0])
@pytest.mark.parametrize("head_dim", [80, 64])
def test_rope_matches_transformers(head_dim, theta):
    gen = generator(0)
    grid_thw = torch.tensor(GRIDS[2])
    config = qwen2_vision_config(embed_dim=3 * head_dim, heads=3, theta=theta)
    pos = get_vision_position_ids(grid_thw, 2)
    T = pos.shape[0]
    q, k = (randn(T, 3, head_dim, dtype=F64, gen=gen, requires_grad=True) for _ in range(2))
    cos, sin = qwen2.Qwen2VLVisionRotaryEmbedding(config)(q, pos)
    q_hf, k_hf = qwen2.apply_rotary_pos_emb_vision(q, k, cos, sin)
    q_ours, k_ours = (fastvl.apply_rope_2d(t, fastvl.vision_positions(grid_thw), theta) for t in (q, k))
    assert_all_close([q_ours, k_ours], [q_hf, k_hf], ["q", "k"], HF_FP32_TOL)
    out_ours, out_hf = torch.cat([q_ours, k_ours]), torch.cat([q_hf, k_hf])
    assert_all_close(grads(out_ours, (q, k), generator(1)), grads(out_hf, (q, k), generator(1)), ["dq", "dk"], HF_FP32_TOL)


def _check_attention(attn, hidden, cu, pos, cos, sin):
    """transformers' attention module vs ours on its projected q/k/v with fused RoPE: output, every gradient."""
    theirs = attn(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))
    T = hidden.shape[0]
    q, k, v = attn.qkv(hidden).reshape(T, 3, attn.num_heads, -1).unbind(1)
    ours = attn.proj(fastvl.varlen_attention(q, k, v, cu, rope_pos=pos.to(torch.int32)).reshape(T, -1))
    assert_close(ours, theirs, F64, tol=HF_FP32_TOL)
    names = ["hidden", *(name for name, _ in attn.named_parameters())]
    inputs = [hidden, *attn.parameters()]
    assert_all_close(grads(ours, inputs, generator(1)), grads(theirs, inputs, generator(1)), names, HF_FP32_TOL)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_vision_attention_matches_transformers(attn_impl):
    gen = generator(0)
    grid_thw = torch.tensor([[1, 6, 10], [2, 4, 6], [1, 2, 2]])
    config = qwen2_vision_config(attn=attn_impl)
    attn = randomize(qwen2.VisionAttention(config).to(F64), gen)
    pos = get_vision_position_ids(grid_thw, 2)
    cu = get_vision_cu_seqlens(grid_thw)  # one segment per frame
    hidden = randn(pos.shape[0], config.embed_dim, dtype=F64, gen=gen, requires_grad=True)
    cos, sin = qwen2.Qwen2VLVisionRotaryEmbedding(config)(hidden, pos)
    _check_attention(attn, hidden, cu, pos, cos, sin)


def test_window_attention_matches_qwen25():
    """Qwen2.5-VL window attention: tokens permuted into windows, positions travel with them."""
    gen = generator(0)
    grid_thw = torch.tensor([[1, 12, 10], [1, 6, 4]])
    config = Qwen2_5_VLVisionConfig(hidden_size=160, num_heads=2, depth=1, out_hidden_size=64, window_size=112)
    config._attn_implementation = "sdpa"
    attn = randomize(qwen25.Qwen2_5_VLVisionAttention(config).to(F64), gen)
    window_index, cu = get_vision_window_index(grid_thw, 2, config.window_size, config.patch_size)
    assert cu.numel() > 3, "the grid must span several windows"
    order = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1)  # merge units stay together
    pos = get_vision_position_ids(grid_thw, 2)[order]
    hidden = randn(pos.shape[0], config.hidden_size, dtype=F64, gen=gen, requires_grad=True)
    cos, sin = qwen25.Qwen2_5_VLVisionRotaryEmbedding(config)(hidden, pos)
    _check_attention(attn, hidden, cu.to(torch.int32), pos, cos, sin)


@pytest.mark.parametrize(
    "merger, norm, merge_size",
    [(qwen2.PatchMerger, "layernorm", 2), (qwen2.PatchMerger, "layernorm", 3), (qwen25.Qwen2_5_VLPatchMerger, "rmsnorm", 2)],
    ids=["qwen2-ln", "qwen2-ln-m3", "qwen25-rms"],
)
def test_patch_merge_matches_transformers(merger, norm, merge_size):
    gen = generator(0)
    C, out_dim, T = 12, 20, 7 * merge_size * merge_size
    module = randomize(merger(dim=out_dim, context_dim=C, spatial_merge_size=merge_size).to(F64), gen)
    x = randn(T, C, dtype=F64, gen=gen, scale=2.0, requires_grad=True)
    ln, fc1, fc2 = module.ln_q, module.mlp[0], module.mlp[2]
    ln_b = ln.bias if norm == "layernorm" else None
    ours = fastvl.patch_merge(
        x, ln.weight, ln_b, fc1.weight, fc1.bias, fc2.weight, fc2.bias, merge_size, 1e-6, norm=norm
    )
    theirs = module(x)
    # LayerNorm runs in float64 in transformers; its RMSNorm in fp32
    tol = None if norm == "layernorm" else HF_FP32_TOL
    assert_close(ours, theirs, F64, tol=tol)
    names = ["x", *(name for name, _ in module.named_parameters())]
    inputs = [x, *module.parameters()]
    assert_all_close(grads(ours, inputs, generator(1)), grads(theirs, inputs, generator(1)), names, tol)


# ---------------------------------------------------------------- varlen attention vs SDPA per segment


def sdpa_segments(q, k, v, cu_q, cu_k, causal, scale):
    """Per segment: SDPA (enable_gqa) with an explicit bottom-right causal mask; rows with no key give 0."""
    outs = []
    for (qs, qe), (ks, ke) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        lq, lk = qe - qs, ke - ks
        mask = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            mask = mask.tril(diagonal=lk - lq)
        rows = mask.any(dim=1).nonzero().squeeze(1)
        out = q.new_zeros(q.shape[1], lq, q.shape[2])
        if rows.numel():
            seen = F.scaled_dot_product_attention(
                q[qs:qe][rows].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1),
                attn_mask=mask[rows], scale=scale, enable_gqa=True,
            )
            out = out.index_copy(1, rows, seen)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def explicit_lse(q, k, cu_q, cu_k, causal, scale):
    """[H, Tq] log-sum-exp of the visible scaled scores, -inf for rows without a key."""
    group = q.shape[1] // k.shape[1]
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=F64)
    for (qs, qe), (ks, ke) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        for i in range(qs, qe):
            last = ke if not causal else min(ke, ks + (i - qs) + (ke - ks) - (qe - qs) + 1)
            for h in range(q.shape[1]):
                if last > ks:
                    scores = k[ks:last, h // group] @ q[i, h] * scale
                    lse[h, i] = torch.logsumexp(scores, 0)
    return lse


ATTENTION_CASES = {
    # name: (q lengths, k lengths or None for self-attention, heads, kv heads, causal, scale)
    "self-gqa": ([7, 1, 31], None, 4, 2, False, None),
    "self-causal-mqa": ([7, 1, 31], None, 4, 1, True, None),
    "cross": ([5, 9, 3], [8, 4, 3], 2, 2, False, 0.3),
    "cross-causal": ([5, 9, 3], [8, 4, 3], 4, 2, True, None),  # 9 queries, 4 keys: 5 rows see no key
    "empty-segments": ([0, 4, 3, 2], [2, 0, 3, 5], 2, 1, False, None),
    "empty-causal": ([0, 4, 3, 6], [2, 0, 3, 1], 2, 2, True, 0.2),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_varlen_attention_matches_sdpa(case):
    lengths_q, lengths_k, H, Hk, causal, scale = ATTENTION_CASES[case]
    gen = generator(0)
    cu_q = cu_seqlens(lengths_q)
    cu_k = cu_q if lengths_k is None else cu_seqlens(lengths_k)
    q = randn(int(cu_q[-1]), H, 64, dtype=F64, gen=gen, requires_grad=True)
    k, v = (randn(int(cu_k[-1]), Hk, 64, dtype=F64, gen=gen, requires_grad=True) for _ in range(2))
    ours = fastvl.varlen_attention(
        q, k, v, cu_q, None if lengths_k is None else cu_k, causal=causal, softmax_scale=scale
    )
    theirs = sdpa_segments(q, k, v, cu_q.tolist(), cu_k.tolist(), causal, 64 ** -0.5 if scale is None else scale)
    assert_close(ours, theirs, F64)
    assert_all_close(grads(ours, (q, k, v), generator(1)), grads(theirs, (q, k, v), generator(1)), ["dq", "dk", "dv"])

    lse = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=scale, return_lse=True)[1]
    expected = explicit_lse(q.detach(), k.detach(), cu_q.tolist(), cu_k.tolist(), causal, 64 ** -0.5 if scale is None else scale)
    keyless = expected.isinf()
    assert lse.dtype == torch.float32 and torch.equal(lse.isneginf(), keyless)
    assert_close(lse[~keyless], expected[~keyless], torch.float32, tol=1e-6, name="lse")


def test_varlen_attention_keyless_rows_are_zero_without_nan():
    """Queries that see no key (causal, more queries than keys) output exactly 0; no NaN anywhere."""
    gen = generator(0)
    cu_q, cu_k = cu_seqlens([6, 3]), cu_seqlens([2, 0])
    q = randn(9, 2, 64, dtype=F64, gen=gen, requires_grad=True)
    k, v = (randn(2, 2, 64, dtype=F64, gen=gen, requires_grad=True) for _ in range(2))
    out = fastvl.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    keyless = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)  # rows r < Lq - Lk, and the empty-k segment
    assert torch.equal(out[keyless], torch.zeros_like(out[keyless]))
    assert out[~keyless].abs().sum() > 0
    dq, dk, dv = grads(out, (q, k, v), gen)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[keyless], torch.zeros_like(dq[keyless]))


# ---------------------------------------------------------------- spatial attention pooling vs a window loop


@pytest.mark.parametrize(
    "grids, window",
    [([[27, 27]], 3), ([[5, 7], [1, 4], [4, 4]], 3), ([[5, 7], [1, 4], [27, 27], [4, 4]], 2), ([[1, 4]], 2)],
    ids=["27x27-w3", "pack-w3", "pack-w2", "1x4-w2"],
)
def test_spatial_attention_pool_matches_window_loop(grids, window):
    gen = generator(0)
    C, hidden = 8, 6
    T = sum(h * w for h, w in grids)
    x = randn(T, C, dtype=F64, gen=gen, requires_grad=True)
    weights = [randn(*s, dtype=F64, gen=gen, requires_grad=True) for s in ((hidden, C), (hidden,), (1, hidden), (1,))]
    ours = fastvl.spatial_attention_pool(x, torch.tensor(grids), *weights, window=window)
    theirs = sap_window_loop(x, grids, *weights, window)
    assert_close(ours, theirs, F64)
    inputs = [x, *weights]
    (*ours_grads, ours_db2), (*their_grads, their_db2) = (grads(out, inputs, generator(1)) for out in (ours, theirs))
    assert_all_close(ours_grads, their_grads, ["x", "w1", "b1", "w2"])
    # the softmax of each window ignores the shared shift b2: its gradient is 0 up to rounding
    assert ours_db2.abs().item() < 1e-12 and their_db2.abs().item() < 1e-12


# ---------------------------------------------------------------- deepstack


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("shape, count", [((2, 9, 16), 7), ((11, 5), 11), ((4, 3), 0)])
def test_deepstack_add_matches_indexed_add(shape, count, index_dtype):
    gen = generator(0)
    hidden = randn(*shape, dtype=F64, gen=gen, requires_grad=True)
    rows = hidden.numel() // shape[-1]
    index = torch.randperm(rows, generator=gen)[:count].to(index_dtype)
    stacked = randn(count, shape[-1], dtype=F64, gen=gen, requires_grad=True)
    ours = fastvl.deepstack_add(hidden, index, stacked)
    theirs = hidden.clone()
    theirs.view(-1, shape[-1])[index.long()] += stacked
    assert_close(ours, theirs, F64)
    assert_all_close(grads(ours, (hidden, stacked), generator(1)), grads(theirs, (hidden, stacked), generator(1)), ["dhidden", "dstacked"])


# ---------------------------------------------------------------- gradcheck of every differentiable public op


def _attention_inputs(gen, causal, rope):
    cu_q, cu_k = cu_seqlens([3, 2]), cu_seqlens([2, 4])
    q = randn(5, 2, 64, dtype=F64, gen=gen, requires_grad=True)
    k = randn(6 if not rope else 5, 1, 64, dtype=F64, gen=gen, requires_grad=True)
    v = randn(k.shape[0], 1, 64, dtype=F64, gen=gen, requires_grad=True)
    if rope:
        pos = fastvl.vision_positions(torch.tensor([[1, 2, 2]]))
        pos = torch.cat([pos, pos[:1]])
        return (lambda q, k, v: fastvl.varlen_attention(q, k, v, cu_q, causal=causal, rope_pos=pos)), (q, k, v)
    return (lambda q, k, v: fastvl.varlen_attention(q, k, v, cu_q, cu_k, causal=causal)), (q, k, v)


def _gradcheck_cases():
    gen = generator(0)
    pos = torch.tensor([[0, 0], [3, 1], [2, 5]], dtype=torch.int32)
    sap = [randn(*s, dtype=F64, gen=gen, requires_grad=True) for s in ((10, 3), (4, 3), (4,), (1, 4), (1,))]
    merge_ln = [randn(*s, dtype=F64, gen=gen, requires_grad=True) for s in ((8, 3), (3,), (3,), (5, 12), (5,), (2, 5), (2,))]
    merge_rms = [t for i, t in enumerate(merge_ln) if i != 2]
    deep = [randn(*s, dtype=F64, gen=gen, requires_grad=True) for s in ((2, 3, 4), (3, 4))]
    return {
        "varlen_attention": _attention_inputs(gen, False, False),
        "varlen_attention-causal": _attention_inputs(gen, True, False),
        "varlen_attention-rope": _attention_inputs(gen, False, True),
        "apply_rope_2d": ((lambda x: fastvl.apply_rope_2d(x, pos, 100.0)), (randn(3, 2, 8, dtype=F64, gen=gen, requires_grad=True),)),
        "patch_merge-layernorm": ((lambda *a: fastvl.patch_merge(*a)), merge_ln),
        "patch_merge-rmsnorm": ((lambda x, w, *a: fastvl.patch_merge(x, w, None, *a, norm="rmsnorm")), merge_rms),
        "spatial_attention_pool": ((lambda x, *a: fastvl.spatial_attention_pool(x, torch.tensor([[2, 3], [1, 4]]), *a, window=2)), sap),
        "deepstack_add": ((lambda h, s: fastvl.deepstack_add(h, torch.tensor([4, 0, 2]), s)), deep),
        "deepstack_add_": ((lambda h, s: fastvl.deepstack_add_(h * 1, torch.tensor([4, 0, 2]), s)), deep),
    }


GRADCHECK = _gradcheck_cases()


@pytest.mark.parametrize("name", GRADCHECK)
def test_gradcheck(name):
    fn, inputs = GRADCHECK[name]
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)
