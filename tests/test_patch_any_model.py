"""fastvl.patch on any Qwen2-VL / Qwen2.5-VL model transformers builds, as transformers' own tests build them.

Tiny configs like transformers' model testers (vision head_dim 8, merge sizes 1 and 2, one-patch and
multi-patch images, a two-frame video, a padded batch) in float64: for each behaviour the tests of
transformers exercise, the patched model must match its unpatched copy. Head dim 8 has no Triton
kernel, so these run the reference implementations of the ops (the automatic backend says so once).
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastvl  # noqa: E402
from fastvl.testing import assert_close, generator, randn, rel_err  # noqa: E402

TOL = 1e-6  # float64 models; transformers computes the vision RoPE tables in fp32
PATCH, TEMPORAL = 4, 2
PAD, START, END, IMAGE, VIDEO = 2, 3, 6, 4, 5
TEXT = dict(
    vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=PAD, bos_token_id=0, eos_token_id=1,
    rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
)
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
# (model, merge size); Qwen2.5-VL: windows of 2x2 merged tokens, block 1 full attention
KINDS = {"qwen2_vl-m1": ("qwen2_vl", 1), "qwen2_vl-m2": ("qwen2_vl", 2), "qwen2_5_vl-m2": ("qwen2_5_vl", 2)}


def build(kind):
    name, merge = KINDS[kind]
    vision = dict(depth=2, num_heads=4, patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=merge)
    if name == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=32, mlp_ratio=4, hidden_act="quick_gelu")
        config = transformers.Qwen2VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
        model_class = transformers.Qwen2VLForConditionalGeneration
    else:
        vision.update(hidden_size=32, intermediate_size=37, out_hidden_size=32, window_size=2 * merge * PATCH,
                      fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    return model_class(config).double().eval()


def inputs(kind):
    """A left-padded batch of two prompts: one-patch image + two-frame video, then a multi-patch image."""
    merge = KINDS[kind][1]
    grids = torch.tensor([[1, merge, merge], [1, 2 * merge, 3 * merge]])
    video = torch.tensor([[2, merge, 2 * merge]])

    def span(token, grid):
        return [START] + [token] * (int(grid.prod()) // merge**2) + [END]

    rows = [[7, *span(IMAGE, grids[0]), 8, *span(VIDEO, video[0]), 9], [10, *span(IMAGE, grids[1]), 11]]
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    gen = generator(0)
    return dict(
        input_ids=ids, attention_mask=(ids != PAD).long(), mm_token_type_ids=types, image_grid_thw=grids,
        pixel_values=randn(int(grids.prod(-1).sum()), 3 * TEMPORAL * PATCH**2, dtype=torch.float64, gen=gen),
        video_grid_thw=video,
        pixel_values_videos=randn(int(video.prod(-1).sum()), 3 * TEMPORAL * PATCH**2, dtype=torch.float64, gen=gen),
    )


def pair(kind):
    """(patched model, unpatched copy)."""
    model = build(kind)
    reference = copy.deepcopy(model)
    return fastvl.patch(model), reference


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvl.FallbackWarning)
        yield


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_backward(kind):
    """Logits and the gradients of every parameter and of the pixels."""
    batch = inputs(kind)
    results = []
    for model in pair(kind):
        pixels = {k: batch[k].clone().requires_grad_() for k in ("pixel_values", "pixel_values_videos")}
        logits = model(**{**batch, **pixels}).logits
        (logits * randn(*logits.shape, dtype=torch.float64, gen=generator(1))).sum().backward()
        grads = {k: p.grad for k, p in model.named_parameters()} | {k: p.grad for k, p in pixels.items()}
        results.append((logits, grads))
    (logits, grads), (ref, ref_grads) = results
    assert_close(logits, ref, tol=TOL, name="logits")
    for key, g in grads.items():
        assert g is not None, f"{key}: no gradient"
        assert_close(g, ref_grads[key], tol=TOL, name=f"{key}.grad")


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_states_and_attentions(kind):
    """output_hidden_states / output_attentions of the model and of the vision tower, as transformers defines them
    (eager attention, which returns the weights; the first prompt, which has no padding)."""
    batch = {k: v[:1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in inputs(kind).items()}
    batch["pixel_values"], batch["image_grid_thw"] = batch["pixel_values"][:KINDS[kind][1] ** 2], batch["image_grid_thw"][:1]
    outputs = []
    for model in pair(kind):
        model.set_attn_implementation("eager")
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        vision = model.model.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"],
                                    output_hidden_states=True, output_attentions=True)
        outputs.append((("", out, TEXT["num_hidden_layers"]), ("vision ", vision, 2)))
    for (prefix, out, depth), (_, ref, _) in zip(*outputs):
        for name in ("hidden_states", "attentions"):
            assert len(getattr(out, name)) == len(getattr(ref, name)) == depth + (name == "hidden_states")
            for i, (a, b) in enumerate(zip(getattr(out, name), getattr(ref, name))):
                assert_close(a, b, tol=TOL, name=f"{prefix}{name}[{i}]")


@pytest.mark.parametrize("kind", KINDS)
def test_generate(kind):
    """Greedy, sampling (same seed), beam search and assisted decoding produce the same tokens and scores."""
    batch = inputs(kind)
    modes = {
        "greedy": dict(do_sample=False),
        "sample": dict(do_sample=True, top_k=0),
        "beam": dict(do_sample=False, num_beams=2),
    }
    runs = []
    for model in pair(kind):
        run = {}
        for mode, options in modes.items():
            torch.manual_seed(3)
            run[mode] = model.generate(**batch, max_new_tokens=4, output_scores=True, return_dict_in_generate=True,
                                       **options)
        run["assisted"] = model.generate(**{k: v[:1] for k, v in batch.items() if k.endswith("_ids") or k == "attention_mask"},
                                         max_new_tokens=4, do_sample=False, assistant_model=model)
        runs.append(run)
    patched, unpatched = runs
    for mode in modes:
        assert torch.equal(patched[mode].sequences, unpatched[mode].sequences), mode
        assert_close(torch.stack(patched[mode].scores), torch.stack(unpatched[mode].scores), tol=TOL, name=mode)
    assert torch.equal(patched["assisted"], unpatched["assisted"])


def test_text_attention():
    """attn_implementation="fastvl" on the language model too (head dim 8): logits of the real tokens, decoding."""
    kind = "qwen2_5_vl-m2"
    batch = inputs(kind)
    model, reference = pair(kind)
    fastvl.patch(model, text_attention=True)
    keep = batch["attention_mask"].bool()
    assert_close(model(**batch).logits[keep], reference(**batch).logits[keep], tol=TOL, name="logits")
    runs = [m.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
            for m in (model, reference)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert_close(torch.stack(runs[0].scores), torch.stack(runs[1].scores), tol=TOL, name="scores")


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing(kind):
    batch = inputs(kind)
    grads = []
    for model in pair(kind):
        model.train()
        model.activation_checkpointing_enable()
        assert all(block.gradient_checkpointing for block in model.model.visual.blocks)
        model(**batch).logits.square().mean().backward()
        grads.append({k: p.grad for k, p in model.model.visual.named_parameters()})
    for key, g in grads[0].items():
        assert_close(g, grads[1][key], tol=TOL, name=f"{key}.grad")


def test_save_load_deepcopy_and_resized_embeddings(tmp_path):
    kind = "qwen2_5_vl-m2"
    batch = inputs(kind)
    model, reference = pair(kind)
    expected = reference(**batch).logits
    model.save_pretrained(tmp_path)  # the checkpoint is transformers' own: loads unpatched, patches again
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not fastvl.integrations.is_patched(loaded)
    assert_close(fastvl.patch(loaded)(**batch).logits, expected, tol=TOL, name="loaded")
    clone = copy.deepcopy(model)
    assert fastvl.integrations.is_patched(clone)
    assert_close(clone(**batch).logits, expected, tol=TOL, name="deepcopy")
    for m in (model, reference):
        torch.manual_seed(1)  # the new rows are initialised randomly
        m.resize_token_embeddings(TEXT["vocab_size"] + 5)
    assert fastvl.integrations.is_patched(model)
    assert_close(model(**batch).logits, reference(**batch).logits, tol=TOL, name="resized embeddings")


@pytest.mark.slow
def test_compiled_tower():
    """torch.compile traces the patched tower (Qwen2.5-VL with partial windows): the blocks and the ops; only the
    host-side layout stays eager."""
    model, reference = pair("qwen2_5_vl-m2")
    batch = inputs("qwen2_5_vl-m2")
    x, grid = batch["pixel_values"], batch["image_grid_thw"]
    out = torch.compile(model.model.visual)(x, grid_thw=grid).pooler_output
    assert_close(out, reference.model.visual(x, grid_thw=grid).pooler_output, tol=TOL)


def test_fallback_is_announced_once(monkeypatch):
    """The automatic backend runs head dim 8 on the reference and says so once, naming the fast path's needs."""
    monkeypatch.setattr(fastvl._backend, "_warned", set())
    model, reference = pair("qwen2_vl-m2")
    batch = inputs("qwen2_vl-m2")
    x, grid = batch["pixel_values"].float(), batch["image_grid_thw"]
    model.float(), reference.float()
    with fastvl.use_backend(None), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.model.visual(x, grid_thw=grid).pooler_output
        model.model.visual(x, grid_thw=grid)
    messages = [str(w.message) for w in caught if issubclass(w.category, fastvl.FallbackWarning)]
    assert len(messages) == len(set(messages)) >= 1, messages
    expected = "head_dim 8 has no Triton kernel" if fastvl._backend.interpreting() else "need CUDA tensors"
    assert any(expected in m for m in messages), messages
    assert_close(out, reference.model.visual(x, grid_thw=grid).pooler_output, tol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2_vl-m2", "qwen2_5_vl-m2"])
def test_precomputed_layout(kind):
    """The layout inputs transformers lets callers precompute (for torch.compile / export) are honoured."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    model, reference = pair(kind)
    batch = inputs(kind)
    x, grid, tower = batch["pixel_values"], batch["image_grid_thw"], reference.model.visual
    merge = tower.spatial_merge_size
    given = dict(position_ids=get_vision_position_ids(grid, merge), cu_seqlens=get_vision_cu_seqlens(grid))
    if KINDS[kind][0] == "qwen2_5_vl":
        given["window_index"], given["cu_window_seqlens"] = get_vision_window_index(
            grid, merge, tower.window_size, tower.patch_size)
    for subset in (given, {"position_ids": given["position_ids"]}):
        out = model.model.visual(x, grid_thw=grid, **subset).pooler_output
        ref = tower(x, grid_thw=grid, **dict(subset)).pooler_output
        assert_close(out, ref, tol=TOL)
    swapped = {**given, "position_ids": given["position_ids"].flip(-1)}  # used, not derived again
    out = model.model.visual(x, grid_thw=grid, **swapped).pooler_output
    assert_close(out, tower(x, grid_thw=grid, **dict(swapped)).pooler_output, tol=TOL)
    assert rel_err(out, ref) > 100 * TOL, "the swapped positions must change the output"
