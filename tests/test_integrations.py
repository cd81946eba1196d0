"""fastvl.patch on Hugging Face Qwen2-VL / Qwen2.5-VL, and the "fastvl" attention implementation.

Tiny random models in float64: the patched model must match its unpatched deep copy. transformers
computes the vision RoPE tables in fp32 whatever the model dtype, which bounds the agreement at ~1e-7.
"""
import collections
import copy
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastvl  # noqa: E402
from fastvl.integrations import attention, qwen2_vl  # noqa: E402
from fastvl.testing import assert_close, cu_seqlens, generator, randn, rel_err, tolerance  # noqa: E402

ROPE_TOL = 1e-6  # float64 models, fp32 RoPE tables in transformers
PATCH, TEMPORAL, MERGE = 4, 2, 2
IMAGE, VIDEO, START, END = 290, 291, 292, 293
TEXT = dict(
    vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, rope_parameters={"rope_type": "default", "mrope_section": [16, 8, 8], "rope_theta": 10000.0},
)
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
# three images of different grids (patches); Qwen2.5-VL windows are 2x2 merged tokens here, so the
# first image has partial edge windows and the second exactly one window
GRID = torch.tensor([[1, 6, 10], [1, 4, 4], [1, 2, 6]])


def tiny_qwen2_vl(depth=2):
    vision = dict(
        depth=depth, embed_dim=128, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=PATCH,
        temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE,
    )
    config = transformers.Qwen2VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(config).double()


def tiny_qwen2_5_vl(depth=3):
    vision = dict(
        depth=depth, hidden_size=128, intermediate_size=160, num_heads=2, patch_size=PATCH,
        temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, window_size=16, fullatt_block_indexes=[1],
        out_hidden_size=128,
    )
    config = transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).double()


MODELS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


def pixels(grid, seed=0):
    rows = int(grid.prod(-1).sum())
    return randn(rows, 3 * TEMPORAL * PATCH * PATCH, dtype=torch.float64, gen=generator(seed))


def prompt(grid):
    """input_ids [1, L] with text around each image's placeholder tokens, and mm_token_type_ids."""
    ids = [5, 6]
    for t, h, w in grid.tolist():
        ids += [START] + [IMAGE] * (t * h * w // MERGE**2) + [END, 7]
    ids = torch.tensor([ids + [8, 9]])
    return ids, (ids == IMAGE).int()


@pytest.fixture
def spy(monkeypatch):
    """Record the calls of fastvl ops made by the patched tower: {op name: [(args, kwargs)]}."""
    calls = collections.defaultdict(list)
    for name in ("varlen_attention", "patch_merge", "vision_layout"):
        original = getattr(qwen2_vl, name)

        def record(*args, _name=name, _original=original, **kwargs):
            calls[_name].append((args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(qwen2_vl, name, record)
    return calls


@pytest.mark.parametrize("name", MODELS)
def test_vision_tower_matches_transformers(name, spy):
    model = MODELS[name]()
    reference = copy.deepcopy(model)
    assert fastvl.patch(model) is model
    grid = torch.cat([GRID, torch.tensor([[2, 4, 6]])])  # and a two-frame video: one segment per frame
    x = pixels(grid)
    conv = model.model.visual.patch_embed.proj.register_forward_hook(lambda *_: pytest.fail("the Conv3d ran"))
    out = model.model.visual(x, grid_thw=grid)
    conv.remove()
    ref = reference.model.visual(x, grid_thw=grid)
    assert_close(out.pooler_output, ref.pooler_output, tol=ROPE_TOL, name="merged tokens")
    assert_close(out.last_hidden_state, ref.last_hidden_state, tol=ROPE_TOL, name="last hidden state")
    depth = len(model.model.visual.blocks)
    assert len(spy["varlen_attention"]) == depth and len(spy["patch_merge"]) == 1


@pytest.mark.parametrize("name", MODELS)
def test_model_logits_and_vision_gradients_match(name):
    model = MODELS[name]()
    reference = copy.deepcopy(model)
    fastvl.patch(model)
    ids, types = prompt(GRID)
    weight = randn(1, ids.shape[1], TEXT["vocab_size"], dtype=torch.float64, gen=generator(1))
    results = []
    for m in (model, reference):
        x = pixels(GRID).requires_grad_()
        logits = m(input_ids=ids, pixel_values=x, image_grid_thw=GRID, mm_token_type_ids=types).logits
        (logits * weight).sum().backward()
        results.append((logits, x.grad, dict(m.model.visual.named_parameters())))
    (logits, dx, params), (ref_logits, ref_dx, ref_params) = results
    assert_close(logits, ref_logits, tol=ROPE_TOL, name="logits")
    assert_close(dx, ref_dx, tol=ROPE_TOL, name="pixel_values.grad")
    for key, p in params.items():
        assert p.grad is not None, f"{key}: no gradient"
        assert_close(p.grad, ref_params[key].grad, tol=ROPE_TOL, name=f"{key}.grad")


@pytest.mark.parametrize("window_size", [16, 24])  # windows of 2x2 and 3x3 merged tokens
@pytest.mark.parametrize("grid", [
    [[1, 6, 10], [1, 4, 4], [1, 2, 6]],
    [[1, 8, 12], [3, 4, 4]],  # merged sides divisible by the 2x2 windows
    [[2, 10, 6], [1, 2, 2], [1, 14, 18]],
])
def test_layout_matches_transformers(grid, window_size):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    grid = torch.tensor(grid)
    layout = qwen2_vl.vision_layout(grid, MERGE, window=window_size // MERGE // PATCH)
    order, cu_windows = get_vision_window_index(grid, MERGE, window_size=window_size, patch_size=PATCH)
    positions = get_vision_position_ids(grid, MERGE).view(-1, MERGE * MERGE, 2)[order].view(-1, 2)
    cu_seqlens = get_vision_cu_seqlens(grid)
    assert torch.equal(layout.window_index, order)
    assert torch.equal(layout.cu_window_seqlens, cu_windows)
    assert torch.equal(layout.positions, positions.int())
    assert torch.equal(layout.cu_seqlens, cu_seqlens)
    assert torch.equal(order[layout.reverse_index], torch.arange(len(order)))
    assert layout.max_window_seqlen == cu_windows.diff().max() and layout.max_seqlen == cu_seqlens.diff().max()


HOST_READS = ("tolist", "item", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__")


def count_host_reads(monkeypatch):
    """Count tensor reads to the host made outside the ops (whose CPU-only checks do not run on CUDA)."""
    counts = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not caller.startswith(("fastvl.ops", "fastvl.reference")):
                counts[caller, _name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counts


def test_host_work_does_not_grow_with_depth(monkeypatch, spy):
    x = pixels(GRID)
    reads = []
    for depth in (3, 6):
        tower = fastvl.patch(tiny_qwen2_5_vl(depth)).model.visual
        spy.clear()
        with monkeypatch.context() as m:
            counts = count_host_reads(m)
            tower(x, grid_thw=GRID)
        reads.append(counts)
        assert len(spy["vision_layout"]) == 1, "the layout must be built once per forward"
        calls = spy["varlen_attention"]
        assert len(calls) == depth
        # every block reuses the same device tensors and gets host ints: no sync inside the op on CUDA
        assert len({id(kw["rope_pos"]) for _, kw in calls}) == 1
        assert len({id(args[3]) for args, _ in calls}) == 2  # window and full-attention segments
        assert all(type(kw["max_seqlen_q"]) is int for _, kw in calls)
    assert reads[0] == reads[1], f"host reads grow with depth: {reads[0]} vs {reads[1]}"
    assert sum(reads[0].values()) > 0, "the counter saw nothing: the test would not catch a per-block read"


def test_patch_is_idempotent_reversible_and_shares_weights():
    model = tiny_qwen2_vl()
    tower = model.model.visual
    before = {k: p.data_ptr() for k, p in model.named_parameters()}
    x = pixels(GRID)
    ref = tower(x, grid_thw=GRID).pooler_output
    fastvl.patch(model)
    forward = tower.forward
    assert fastvl.patch(model) is model and tower.forward == forward and fastvl.integrations.is_patched(model)
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == before
    clone = copy.deepcopy(model)  # the patch travels with a copy, bound to the copy
    assert fastvl.integrations.is_patched(clone) and clone.model.visual.forward.__self__ is clone.model.visual
    fastvl.unpatch(model)
    assert not fastvl.integrations.is_patched(model)
    assert "forward" not in tower.__dict__ and all("forward" not in b.attn.__dict__ for b in tower.blocks)
    assert torch.equal(tower(x, grid_thw=GRID).pooler_output, ref)
    assert_close(clone.model.visual(x, grid_thw=GRID).pooler_output, ref, tol=ROPE_TOL)


def test_patch_accepts_the_inner_model_and_the_tower():
    model = tiny_qwen2_5_vl()
    assert fastvl.patch(model.model) is model.model and fastvl.integrations.is_patched(model)
    fastvl.unpatch(model.model.visual)
    assert not fastvl.integrations.is_patched(model)


def test_unsupported_models_and_inputs():
    with pytest.raises(TypeError, match="model"):
        fastvl.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        fastvl.patch("Qwen/Qwen2-VL-2B-Instruct")
    text_only = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**TEXT, "rope_parameters": None}))
    with pytest.raises(TypeError, match="model.*Qwen2ForCausalLM"):
        fastvl.patch(text_only)
    model = fastvl.patch(tiny_qwen2_vl())
    with pytest.raises(ValueError, match="cu_seqlens"):  # a precomputed layout is used, so checked
        model.model.visual(pixels(GRID), grid_thw=GRID, cu_seqlens=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="grid_thw"):  # odd grid: not divisible by the merge size
        model.model.visual(pixels(torch.tensor([[1, 3, 4]])), grid_thw=torch.tensor([[1, 3, 4]]))
    with pytest.raises(TypeError, match="model"):
        fastvl.patch(model.model.visual, text_attention=True)


def test_autocast_matches_transformers():
    model = tiny_qwen2_5_vl().float()
    reference = copy.deepcopy(model)
    fastvl.patch(model)
    x = pixels(GRID).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.model.visual(x, grid_thw=GRID).pooler_output
        ref = reference.model.visual(x, grid_thw=GRID).pooler_output
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out, ref, tol=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_vision_tower_on_the_kernels(name, device, triton_backend):
    """fp32 forward and backward through the Triton kernels (the interpreter on CPU)."""
    reference = MODELS[name]().float()
    model = fastvl.patch(copy.deepcopy(reference).to(device))
    x = pixels(GRID).float()
    ref = reference.model.visual(x, grid_thw=GRID).pooler_output
    out = model.model.visual(x.to(device), grid_thw=GRID.to(device)).pooler_output
    ref.square().sum().backward()
    out.square().sum().backward()
    tol = tolerance(torch.float32, device)
    assert_close(out.cpu(), ref, tol=tol, name="merged tokens")
    for (key, p), q in zip(model.model.visual.named_parameters(), reference.model.visual.parameters()):
        assert_close(p.grad.cpu(), q.grad, tol=tol, name=f"{key}.grad")


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_vision_tower_bf16_on_gpu(name, triton_backend):
    """bf16 on the kernels errs no more than transformers' own bf16 tower (both against float64)."""
    reference = MODELS[name]()
    x = pixels(GRID)
    ref = reference.model.visual(x, grid_thw=GRID).pooler_output
    x16, grid = x.to("cuda", torch.bfloat16), GRID.cuda()
    hf = copy.deepcopy(reference).to("cuda", torch.bfloat16)
    model = fastvl.patch(copy.deepcopy(hf))
    hf_err = rel_err(hf.model.visual(x16, grid_thw=grid).pooler_output.cpu(), ref)
    assert_close(model.model.visual(x16, grid_thw=grid).pooler_output.cpu(), ref, tol=max(2 * hf_err, 1e-2))


@pytest.mark.gpu
def test_no_per_block_sync_on_gpu(triton_backend):
    syncs = []
    for depth in (3, 6):
        tower = fastvl.patch(tiny_qwen2_5_vl(depth)).model.visual.to("cuda", torch.float32)
        x, grid = pixels(GRID).to("cuda", torch.float32), GRID.cuda()
        tower(x, grid_thw=grid)  # compiles and autotunes the kernels
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tower(x, grid_thw=grid)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs.append(len(caught))
    assert syncs[0] == syncs[1], f"synchronisations grow with depth: {syncs}"


# ---- the "fastvl" attention implementation (language model side) ----

def qwen2_lm(implementation):
    attention.register()
    config = transformers.Qwen2Config(**{**TEXT, "rope_parameters": None}, attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def lms():
    sdpa = qwen2_lm("sdpa")
    fast = copy.deepcopy(sdpa)
    fast.set_attn_implementation("fastvl")
    assert fast.config._attn_implementation == "fastvl"
    return sdpa, fast


def test_lm_plain_batch_matches_sdpa_with_gradients(lms):
    sdpa, fast = lms
    ids = torch.randint(0, TEXT["vocab_size"], (2, 13), generator=generator(2))
    weight = randn(2, 13, TEXT["vocab_size"], dtype=torch.float64, gen=generator(3))
    grads = []
    for m in lms:
        m.zero_grad()
        logits = m(ids, use_cache=False).logits
        (logits * weight).sum().backward()
        grads.append((logits, {k: p.grad.clone() for k, p in m.named_parameters()}))
    assert_close(grads[1][0], grads[0][0], name="logits")
    for key, g in grads[1][1].items():
        assert_close(g, grads[0][1][key], name=f"{key}.grad")


def test_lm_packed_sequences(lms, monkeypatch):
    sdpa, fast = lms
    lengths = [5, 9, 1, 4]
    ids = torch.randint(0, TEXT["vocab_size"], (1, sum(lengths)), generator=generator(4))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    separate = torch.cat([sdpa(chunk).logits for chunk in ids.split(lengths, dim=1)], dim=1)
    builds = []
    original = attention._from_positions
    monkeypatch.setattr(attention, "_from_positions", lambda *args: builds.append(1) or original(*args))
    assert_close(fast(ids, position_ids=positions, use_cache=False).logits, separate, name="packed by position_ids")
    assert len(builds) == 1, "the segments must be read once per forward, not once per layer"
    assert_close(sdpa(ids, position_ids=positions, use_cache=False).logits, separate, name="sdpa, packed")
    cu = cu_seqlens(lengths)
    packed = fast(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=max(lengths), max_length_k=max(lengths)).logits
    assert_close(packed, separate, name="packed by cu_seq_lens")


def test_lm_padding_and_cached_decoding_match_sdpa(lms):
    sdpa, fast = lms
    ids = torch.randint(0, TEXT["vocab_size"], (3, 11), generator=generator(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    keep = mask.bool()
    assert_close(fast(ids, attention_mask=mask).logits[keep], sdpa(ids, attention_mask=mask).logits[keep])
    runs = [m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                       return_dict_in_generate=True) for m in lms]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert_close(torch.stack(runs[1].logits), torch.stack(runs[0].logits), name="decoding logits")


def test_lm_under_inference_mode(lms):
    """Inference tensors (no version counter) as the padding mask and the position ids."""
    sdpa, fast = lms
    ids = torch.randint(0, TEXT["vocab_size"], (2, 9), generator=generator(6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = torch.cat([torch.arange(4), torch.arange(5)])[None]
    expected = [sdpa(ids, attention_mask=mask).logits, sdpa(ids[:1], position_ids=positions, use_cache=False).logits]
    with torch.inference_mode():
        got = [fast(ids, attention_mask=mask.clone()).logits,
               fast(ids[:1], position_ids=positions.clone(), use_cache=False).logits]
    keep = mask.bool()
    assert_close(got[0][keep], expected[0][keep], name="padding mask")
    separate = torch.cat([sdpa(chunk).logits for chunk in ids[:1].split([4, 5], dim=1)], dim=1)
    assert_close(got[1], separate, name="packed by position_ids")


def test_lm_attention_function_against_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    gen = generator(6)
    for tq, tk in [(7, 7), (1, 9), (3, 12)]:  # prefill, one-token and three-token decoding with a cache
        q = randn(2, 4, tq, 64, dtype=torch.float64, gen=gen)
        k, v = (randn(2, 2, tk, 64, dtype=torch.float64, gen=gen) for _ in range(2))
        out, _ = attention.fastvl_attention(module, q, k, v, None, scaling=0.125)
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)  # queries are the last tq keys
        ref, _ = sdpa_attention_forward(module, q, k, v, mask[None, None], scaling=0.125)
        assert_close(out, ref, name=f"tq={tq}, tk={tk}")


def test_lm_attention_rejects_what_it_cannot_do():
    module = torch.nn.Module()
    q = k = v = torch.zeros(1, 2, 5, 64)
    with pytest.raises(ValueError, match="dropout"):
        attention.fastvl_attention(module, q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        attention.fastvl_attention(module, q, k, v, None, sliding_window=4)
    with pytest.raises(ValueError, match="attention_mask"):
        attention.fastvl_attention(module, q, k, v, torch.zeros(1, 1, 5, 5))


@pytest.mark.parametrize("name", MODELS)
def test_patch_text_attention(name, monkeypatch):
    model = MODELS[name]()
    reference = copy.deepcopy(model)
    assert fastvl.patch(model, text_attention=True).config.text_config._attn_implementation == "fastvl"
    ids, types = prompt(GRID)
    x = pixels(GRID)
    calls = []
    original = attention.varlen_attention
    monkeypatch.setattr(attention, "varlen_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = model(input_ids=ids, pixel_values=x, image_grid_thw=GRID, mm_token_type_ids=types).logits
    assert len(calls) == TEXT["num_hidden_layers"]
    ref = reference(input_ids=ids, pixel_values=x, image_grid_thw=GRID, mm_token_type_ids=types).logits
    assert_close(out, ref, tol=ROPE_TOL, name="logits")
    fastvl.unpatch(model)
    assert model.config.text_config._attn_implementation == "sdpa"
