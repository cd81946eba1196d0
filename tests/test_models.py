"""The FastVL model: token counts of every compressor, DeepStack/EmbQ placement, save/load, generate,
vision weights from tiny Hugging Face checkpoints, and the ``fastvl generate`` command."""
import math
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

import fastvl
from fastvl.cli import main as cli
from fastvl.models import FastVLConfig, FastVLForConditionalGeneration, FastVLVisionConfig
from fastvl.models import load_vision_weights, vision_config_from_hf
from fastvl.layout import vision_layout
from fastvl.testing import assert_close, generator, randn

IMAGE, QUERY, PAD = 3, 4, 0
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=40, pad_token_id=PAD)
VISION = dict(depth=3, embed_dim=128, num_heads=2, intermediate_size=160)  # head_dim 64
GRIDS = [[1, 4, 8], [1, 8, 4], [2, 4, 4]]  # three images, one a two-frame video-like grid


def tiny_config(vision=None, **kwargs):
    return FastVLConfig(vision_config={**VISION, **(vision or {})}, text_config=dict(TEXT), image_token_id=IMAGE,
                        **kwargs)


def tiny_model(vision=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return FastVLForConditionalGeneration(tiny_config(vision, **kwargs)).eval()


def pixels(model, grids=GRIDS, images=3, seed=1):
    """(pixel_values, image_grid_thw or None) of random images for the model's tower."""
    vision = model.config.vision_config
    if vision.tower == "fixed":
        crops = images * model.crops_per_image
        return randn(crops, 3, vision.image_size, vision.image_size, gen=generator(seed)), None
    grid = torch.tensor(grids)
    return randn(int(grid.prod(1).sum()), 3 * 2 * 14 * 14, gen=generator(seed)), grid


def prompt(counts, per_sample=None, query=0):
    """input_ids [B, L]: text, each sample's images, a question, optional query block, text."""
    per_sample = per_sample or [len(counts)]
    rows, it = [], iter(counts)
    for b, n in enumerate(per_sample):
        ids = [5 + b, 6] + [IMAGE] * sum(next(it) for _ in range(n)) + [7, 8, 9] + [QUERY] * query + [10, 11]
        rows.append(ids)
    width = max(map(len, rows))
    return torch.tensor([[PAD] * (width - len(r)) + r for r in rows]), torch.tensor(
        [[0] * (width - len(r)) + [1] * len(r) for r in rows])


CASES = {
    "none": (dict(compressor="none"), lambda t, h, w: t * h * w, 0),
    "patch_merge": (dict(compressor="patch_merge"), lambda t, h, w: t * h * w // 4, 0),
    "sap": (dict(compressor="sap"), lambda t, h, w: t * math.ceil(h / 3) * math.ceil(w / 3), 0),
    "midlayers": (dict(compressor="deepstack"), lambda t, h, w: t * h * w // 4, 4),
    "efficient": (dict(compressor="deepstack", deepstack_type="efficient"), lambda t, h, w: t * h * w // 16, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_native_compressor_token_counts_and_shapes(case):
    kwargs, per_grid, groups = CASES[case]
    model = tiny_model(**kwargs)
    pv, grid = pixels(model)
    counts = model.num_image_tokens(grid)
    assert counts == [per_grid(*g) for g in GRIDS]
    main, stacked, vit, vit_per_image = model.encode_images(pv, grid)
    assert main.shape == (sum(counts), TEXT["hidden_size"])
    assert vit.shape == (pv.shape[0], VISION["embed_dim"]) and vit_per_image == [t * h * w for t, h, w in GRIDS]
    assert (stacked is None) == (groups == 0)
    if groups:
        assert stacked.shape == (groups, sum(counts), TEXT["hidden_size"])
    ids, mask = prompt(counts, per_sample=[2, 1])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    assert out.logits.shape == (2, ids.shape[1], TEXT["vocab_size"]) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("hd", [False, True])
@pytest.mark.parametrize("compressor", ["none", "sap"])
def test_fixed_tower_token_counts(compressor, hd):
    vision = dict(tower="fixed", image_size=9 * 14 + 5, hidden_act="gelu_pytorch_tanh")  # 9x9 patches, 5 px unused
    model = tiny_model(vision, compressor=compressor, image_hd=hd)
    images, crops = (1, 5) if hd else (2, 1)
    pv, _ = pixels(model, images=images)
    per_crop = 81 if compressor == "none" else 9
    assert model.num_image_tokens(images) == model.num_image_tokens(pv) == [per_crop * crops] * images
    main, stacked, vit, vit_per_image = model.encode_images(pv)
    assert main.shape == (images * crops * per_crop, TEXT["hidden_size"]) and stacked is None
    assert vit.shape == (images * crops * 81, VISION["embed_dim"]) and vit_per_image == [81 * crops] * images
    ids, mask = prompt(model.num_image_tokens(images), per_sample=[1] * images)
    assert model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits.shape[:2] == ids.shape
    with pytest.raises(ValueError, match="pixel_values"):
        model.encode_images(torch.zeros(2, 3, 64, 64))


def test_image_token_mismatch_and_bad_grids():
    model = tiny_model()
    pv, grid = pixels(model)
    ids, _ = prompt([n - 1 if i == 0 else n for i, n in enumerate(model.num_image_tokens(grid))])
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=ids, pixel_values=pv, image_grid_thw=grid)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.encode_images(pv, None)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.encode_images(pv[:-4], grid)
    efficient = tiny_model(compressor="deepstack", deepstack_type="efficient")
    pv, grid = pixels(efficient, grids=[[1, 2, 4]])
    with pytest.raises(ValueError, match="divisible by 4"):
        efficient.encode_images(pv, grid)


@pytest.mark.parametrize("bad, match", [
    (dict(compressor="pool"), "compressor"),
    (dict(vision=dict(tower="fixed"), compressor="patch_merge"), "compressor"),
    (dict(compressor="deepstack", deepstack_start=2), "deepstack_start"),
    (dict(compressor="deepstack", deepstack_vit_layers=[1, 3]), "deepstack_vit_layers"),
    (dict(compressor="deepstack", deepstack_type="v1"), "deepstack_type"),
    (dict(use_embq=True), "query_token_id"),
    (dict(use_embq=True, query_token_id=QUERY, embq_layer=5), "embq_layer"),
    (dict(use_embq=True, query_token_id=QUERY, embq_layer=2, embq_dim=33), "embq_dim"),
    (dict(chat_template="llava"), "chat_template"),
    (dict(vision=dict(num_heads=3)), "num_heads"),
    (dict(vision=dict(embed_dim=132, num_heads=2)), "vision_config: head_dim 66"),  # 2D RoPE needs D % 4 == 0
    (dict(vision=dict(depth=0)), "vision_config.depth"),
    (dict(vision=dict(input_patch_size=14)), "vision_config: input_patch_size"),
    (dict(mrope_section=[4, 6]), "mrope_section"),
    (dict(vision=dict(tower="fixed"), compressor="sap", mrope_section=[4, 6, 6]), "native"),
    (dict(tokens_per_second=2), "tokens_per_second"),
    (dict(embq_without_image="drop"), "embq_without_image"),
    (dict(embq_image="first"), "embq_image"),
    (dict(embq_question_start=-1), "embq_question_start"),
])
def test_config_validation(bad, match):
    bad = dict(bad)
    with pytest.raises(ValueError, match=match):
        tiny_config(bad.pop("vision", None), **bad)


def test_mrope_section_must_fit_the_llm_rotary():
    with pytest.raises(ValueError, match=r"mrope_section \[4, 4, 4\] must sum to .* 16"):
        tiny_model(mrope_section=[4, 4, 4])  # head_dim 32: 16 rotary frequencies


@pytest.mark.parametrize("tower", ["native", "fixed"])
def test_batch_without_images_runs_as_text(tower):
    """pixel_values with no rows (the processor's, LlavaDataset's and Collator's text-only batches) run as text."""
    if tower == "native":
        model = tiny_model(compressor="deepstack")
        empty = dict(pixel_values=torch.zeros(0, 1176), image_grid_thw=torch.zeros(0, 3, dtype=torch.int64))
    else:
        model = tiny_model(dict(tower="fixed", image_size=6 * 14, hidden_act="gelu_pytorch_tanh"), compressor="sap")
        empty = dict(pixel_values=torch.zeros(0, 3, 6 * 14, 6 * 14))
    ids, mask = prompt([], per_sample=[0, 0])
    ids[1, -3:] = 12
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecation notices stay quiet
        assert torch.equal(model(input_ids=ids, attention_mask=mask, **empty).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
        out = model.generate(input_ids=ids, attention_mask=mask, **empty, max_new_tokens=2, do_sample=False,
                             pad_token_id=PAD)
    assert out.shape == (2, ids.shape[1] + 2)


def test_image_token_outside_the_vocabulary():
    """Image tokens are never looked up: FlashSloth's -200 works as an image token id."""
    model = tiny_model()
    pv, grid = pixels(model)
    ids, mask = prompt(model.num_image_tokens(grid), per_sample=[2, 1])
    ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid).logits
    model.config.image_token_id = -200
    got = model(input_ids=ids.masked_fill(ids == IMAGE, -200), attention_mask=mask, pixel_values=pv,
                image_grid_thw=grid).logits
    assert torch.equal(got, ref)


def test_midlayer_taps_and_their_mergers():
    assert tiny_config(compressor="deepstack").vit_taps == [1, 2, 2, 2]  # 8/16/24/30 of 32, scaled to depth 3
    assert FastVLConfig(text_config=dict(TEXT), image_token_id=IMAGE).vit_taps == [8, 16, 24, 30]
    model = tiny_model(compressor="deepstack", deepstack_vit_layers=[2, 1])
    pv, grid = pixels(model)
    inputs = {}
    for i, block in enumerate(model.vision_tower.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
    main, stacked, vit, _ = model.encode_images(pv, grid)
    assert stacked.shape[0] == 2
    assert_close(stacked[0], model.compressor.deepstack_mergers[0](inputs[2]))
    assert_close(stacked[1], model.compressor.deepstack_mergers[1](inputs[1]))
    assert_close(main, model.compressor.merger(vit))


@pytest.mark.parametrize("order", ["spatial", "slimm"])
def test_efficient_main_tokens_and_groups(order):
    model = tiny_model(compressor="deepstack", deepstack_type="efficient", deepstack_order=order)
    grids = [[1, 4, 8], [1, 8, 4]]
    pv, grid = pixels(model, grids=grids)
    main, stacked, vit, _ = model.encode_images(pv, grid)
    # main: the 16 patches of each 4x4 cell, ordered (2x2 window, patch in window), cells row-major
    pos = fastvl.vision_positions(grid).long()
    image = torch.repeat_interleave(torch.arange(2), torch.tensor([32, 32]))
    r, c = pos[:, 0], pos[:, 1]
    key = [image, r // 4, c // 4, r // 2 % 2, c // 2 % 2, r % 2, c % 2]
    order_idx = torch.tensor(sorted(range(64), key=lambda i: [k[i].item() for k in key]))
    assert_close(main, model.compressor.merger_deepstack(vit[order_idx]))
    merged = model.compressor.merger(vit)  # one token per 2x2 window, raster order per image
    assert stacked.shape == (4, 4, TEXT["hidden_size"])
    if order == "spatial":  # group k of main token j: window k (row-major) of its cell
        image0 = merged[:8].view(1, 2, 2, 2, -1)  # 2x4 windows -> (cell row, window row, cell col, window col)
        assert_close(stacked[1, 1], image0[0, 0, 1, 1])  # cell (0, 1), window (0, 1)
        assert_close(stacked[2, 0], image0[0, 1, 0, 0])  # cell (0, 0), window (1, 0)
        assert_close(stacked[3, 3], merged[8:].view(4, 2, -1)[3, 1])  # image 1 (4x2 windows), cell (1, 0)
    else:  # SliMM's released order: main token j gets windows 4j..4j+3
        assert_close(stacked.transpose(0, 1).reshape(16, -1), merged)


def _layer_io(model):
    """Record the input (after fastvl's hooks) and output of every LLM decoder layer."""
    seen = {}
    for i, layer in enumerate(model.get_decoder().layers):
        layer.register_forward_pre_hook(lambda mod, args, kw, i=i: seen.__setitem__(("in", i), args[0]),
                                        with_kwargs=True)
        layer.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(
            ("out", i), out[0] if isinstance(out, tuple) else out))
    return seen


def test_deepstack_adds_at_layers_start_to_start_plus_3():
    model = tiny_model(compressor="deepstack")
    pv, grid = pixels(model)
    counts = model.num_image_tokens(grid)
    ids, mask = prompt(counts, per_sample=[1, 2])
    seen = _layer_io(model)
    model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    _, stacked, _, _ = model.encode_images(pv, grid)
    image = (ids == IMAGE).reshape(-1)
    for i in range(1, TEXT["num_hidden_layers"]):
        before, after = seen[("out", i - 1)].reshape(-1, 64), seen[("in", i)].reshape(-1, 64)
        assert torch.equal(before[~image], after[~image])
        expected = before[image] + stacked[i - 1] if i <= 4 else before[image]
        assert_close(after[image], expected, tol=1e-6, name=f"layer {i}")
    # decode steps (no pixel_values) add nothing
    model(input_ids=ids[:, -1:], attention_mask=None)
    for i in range(1, TEXT["num_hidden_layers"]):
        assert torch.equal(seen[("out", i - 1)], seen[("in", i)])


def test_activation_checkpointing_gives_the_same_gradients():
    """Checkpointed ViT blocks and LLM layers recompute with the DeepStack groups still armed."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(compressor="deepstack").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        pv, grid = pixels(model, grids=[[1, 4, 4], [1, 4, 6]])
        ids, mask = prompt(model.num_image_tokens(grid))
        model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("deepstack_mergers" in n for n in grads[0])
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], tol=1e-5, name=name)


def embq_model(**kwargs):
    return tiny_model(compressor="sap", use_embq=True, query_token_id=QUERY, num_query_tokens=3, embq_layer=2,
                      embq_dim=32, **kwargs)


def test_embq_changes_only_query_positions_and_only_at_prefill():
    model = embq_model()
    pv, grid = pixels(model)
    counts = model.num_image_tokens(grid)
    ids, mask = prompt(counts, per_sample=[2, 1], query=6)  # two query blocks per sample
    seen = _layer_io(model)
    calls = []
    model.embq.register_forward_hook(lambda *a: calls.append(1))
    model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    with_embq = seen[("in", 2)].clone()
    assert len(calls) == 4
    assert torch.equal(seen[("out", 1)].flatten()[:0], with_embq.flatten()[:0])
    before = seen[("out", 1)]
    changed = (with_embq - before).abs().amax(-1) > 0
    assert torch.equal(changed, ids == QUERY)
    # the update is what EmbQ computes from the question and the sample's un-pooled image tokens
    _, _, vit, per_image = model.encode_images(pv, grid)
    sample0 = vit[: per_image[0] + per_image[1]]
    q = (ids[0] == QUERY).nonzero().squeeze(1)[:3]
    question = torch.arange(q[0] - 3, q[0])  # the three tokens after the images
    update = model.embq(before[0, q], before[0, question], sample0)
    assert_close(with_embq[0, q], before[0, q] + update, tol=1e-6)
    # decode: no EmbQ
    calls.clear()
    model(input_ids=ids[:, -1:])
    assert not calls
    # without images the queries are placed but EmbQ does not run
    model(input_ids=ids, attention_mask=mask)
    assert not calls


def test_embq_rejects_image_tokens_split_across_samples():
    model = embq_model()
    pv, grid = pixels(model)
    a, b, c = model.num_image_tokens(grid)
    ids, mask = prompt([a + 1, b - 1, c], per_sample=[1, 2], query=3)
    with pytest.raises(ValueError, match="inside an image"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)


def test_embq_question_spans():
    model = embq_model()
    ids = torch.tensor([[PAD, 5, IMAGE, IMAGE, 7, 8, QUERY, QUERY, QUERY, 9, 10, 11, QUERY, QUERY, QUERY, 12]])
    mask = (ids != PAD).long()
    assert model._query_blocks(ids, mask, None) == [(0, 6, [4, 5]), (0, 12, [9, 10, 11])]
    question = torch.ones_like(ids)
    question[0, 9] = 0  # e.g. the end of the previous answer
    assert model._query_blocks(ids, mask, question) == [(0, 6, [4, 5]), (0, 12, [10, 11])]
    with pytest.raises(ValueError, match="multiple of 3"):
        model._query_blocks(torch.tensor([[5, QUERY, QUERY, 6]]), None, None)


def test_embq_attention_matches_naive_heads():
    model = embq_model()
    embq = model.embq.double()
    gen = generator(7)
    hq, ht, img = randn(3, 64, dtype=torch.float64, gen=gen), randn(5, 64, dtype=torch.float64, gen=gen), randn(
        20, 128, dtype=torch.float64, gen=gen)

    def mha(att, q, k, v):
        heads = att.heads
        q, k, v = (x.view(x.shape[0], heads, -1) for x in (att.q_proj(q), att.k_proj(k), att.v_proj(v)))
        w = (torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5).softmax(-1)
        return torch.einsum("hqk,khd->qhd", w, v).reshape(q.shape[0], -1)

    u = mha(embq.t2q_attn, embq.ln_q(embq.down_projector_learnable_text(hq)),
            *[embq.ln_text(embq.down_projector_learnable_text(ht))] * 2)
    o = mha(embq.i2q_attn, u, embq.ln_kv(embq.down_projector_image(img)), img)
    assert_close(embq(hq, ht, img), embq.up_projector(o))


def test_save_load_round_trip(tmp_path):
    model = embq_model()
    pv, grid = pixels(model)
    ids, mask = prompt(model.num_image_tokens(grid), query=3)
    ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid).logits
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FastVLConfig)
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, FastVLForConditionalGeneration) and loaded.config.use_embq
        out = loaded(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid).logits
        assert torch.equal(out, ref)


def test_generate_with_kv_cache_matches_full_forward():
    model = tiny_model(compressor="deepstack", deepstack_type="efficient")
    pv, grid = pixels(model, grids=[[1, 4, 8], [1, 8, 8]])
    ids, mask = prompt(model.num_image_tokens(grid), per_sample=[1, 1])
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, max_new_tokens=4,
                         do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, ids.shape[1] + 4)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    logits = model(input_ids=out, attention_mask=full_mask, pixel_values=pv, image_grid_thw=grid).logits
    assert torch.equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), out[:, ids.shape[1]:])


VOCAB = ["[PAD]", "[UNK]", "</s>", "<image>", "<learnable>", "USER:", "ASSISTANT:", "what", "is", "this", "?"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>",
                                   additional_special_tokens=["<image>", "<learnable>"])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("fastvl-tiny")
    torch.manual_seed(0)
    config = tiny_config(use_embq=True, query_token_id=VOCAB.index("<learnable>"), num_query_tokens=3, embq_layer=2,
                         embq_dim=32, chat_template="phi2")
    config.image_token_id = VOCAB.index("<image>")
    FastVLForConditionalGeneration(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "image.png"
    Image.fromarray((torch.rand(70, 100, 3) * 255).byte().numpy()).save(path)
    return path


def test_cli_generate(saved_model, image_file, capsys):
    assert cli(["generate", "--model", str(saved_model), "--image", str(image_file), "--prompt", "what is this ?",
                "--max-new-tokens", "3"]) == 0
    words = capsys.readouterr().out.split()
    assert len(words) <= 3 and all(w in VOCAB for w in words)


def test_cli_generate_errors(saved_model, image_file, tmp_path, capsys):
    def run(model, image):
        code = cli(["generate", "--model", str(model), "--image", str(image), "--prompt", "what"])
        return code, capsys.readouterr().err

    missing = tmp_path / "nowhere"
    code, err = run(missing, image_file)
    assert code == 2 and str(missing) in err
    code, err = run(saved_model, missing / "x.png")
    assert code == 2 and str(missing / "x.png") in err
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    code, err = run(saved_model, garbage)
    assert code == 2 and str(garbage) in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    code, err = run(broken, image_file)
    assert code == 2 and str(broken) in err


def _qwen_vision_checkpoint(path, qwen25=False):
    """A tiny random Qwen2-VL (or Qwen2.5-VL, windows of 2x2 merged tokens, block 1 full) saved by transformers."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig
    from transformers import Qwen2VLForConditionalGeneration

    text = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, vocab_size=40,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6})
    torch.manual_seed(0)
    if qwen25:
        vision = dict(depth=3, hidden_size=128, num_heads=2, intermediate_size=96, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=[1])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text))
    else:
        vision = dict(depth=3, embed_dim=128, num_heads=2, hidden_size=64, mlp_ratio=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text))
    with torch.no_grad():  # non-trivial norms
        for name, p in model.model.visual.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return model.model.visual.eval()


@pytest.mark.parametrize("qwen25", [False, True], ids=["qwen2_vl", "qwen2_5_vl"])
def test_vision_weights_from_qwen_checkpoint(tmp_path, qwen25):
    hf = _qwen_vision_checkpoint(tmp_path, qwen25)
    vision = vision_config_from_hf(tmp_path)
    assert vision.window_size == (56 if qwen25 else 0)
    model = FastVLForConditionalGeneration(FastVLConfig(vision_config=vision, text_config=dict(TEXT),
                                                        image_token_id=IMAGE)).eval()
    ignored = load_vision_weights(model, tmp_path)
    assert not [k for k in ignored if "blocks" in k or "patch_embed" in k]
    grid = torch.tensor([[1, 6, 10], [1, 4, 4], [2, 2, 6]])  # windows with partial edges, a two-frame grid
    pv = randn(int(grid.prod(1).sum()), 1176, gen=generator(3))
    with torch.no_grad():
        ref = hf(pv, grid_thw=grid)
        x, _, _ = model.vision_tower(pv, grid)
    assert_close(model.compressor(x, [], grid.tolist())[0], ref.pooler_output, tol=1e-5)
    if qwen25:  # transformers returns the ViT tokens in window order
        x = x.view(-1, 4, x.shape[-1])[vision_layout(grid, 2, 2).window_index].flatten(0, 1)
    assert_close(x, ref.last_hidden_state, tol=1e-5)


def test_vision_weights_from_siglip_checkpoint(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(hidden_size=128, intermediate_size=160, num_hidden_layers=3,
                                              num_attention_heads=2, image_size=9 * 14 + 5, patch_size=14)).eval()
    hf.save_pretrained(tmp_path)
    vision = vision_config_from_hf(tmp_path)
    assert (vision.tower, vision.depth, vision.grid_size) == ("fixed", 2, 9)
    model = FastVLForConditionalGeneration(FastVLConfig(vision_config=vision, text_config=dict(TEXT),
                                                        image_token_id=IMAGE, compressor="sap")).eval()
    ignored = load_vision_weights(model, tmp_path)
    assert any(k.startswith("encoder.layers.2.") for k in ignored) and "post_layernorm.weight" in ignored
    pv = randn(3, 3, 131, 131, gen=generator(4))
    with torch.no_grad():
        ref = hf(pixel_values=pv, output_hidden_states=True).hidden_states[2]
        x, _, rows = model.vision_tower(pv)
    assert rows == [[1, 9, 9]] * 3
    assert_close(x, ref.reshape(-1, 128), tol=1e-5)


def test_vision_weight_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vision_weights(model, tmp_path / "nowhere")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="llama"):
        vision_config_from_hf(tmp_path)
    FastVLVisionConfig.siglip_so400m()  # preset is valid


@pytest.mark.parametrize("vision, kwargs", [
    (dict(depth=2, embed_dim=64, num_heads=1, intermediate_size=96),
     dict(compressor="deepstack", deepstack_vit_layers=[1])),
    (dict(depth=2, embed_dim=64, num_heads=1, intermediate_size=96, tower="fixed", image_size=6 * 14),
     dict(compressor="sap")),
], ids=["native-deepstack", "fixed-sap"])
def test_model_on_triton_kernels_matches_reference(vision, kwargs, triton_backend):
    """The whole model with every op on its kernel (the interpreter on CPU): logits and vision gradients."""
    model = tiny_model(vision, **kwargs)
    pv, grid = pixels(model, grids=[[1, 4, 6], [1, 2, 2]], images=2)
    counts = model.num_image_tokens(pv if grid is None else grid)
    ids, mask = prompt(counts, per_sample=[1, 1])
    results = []
    for backend in ("reference", "triton"):
        model.zero_grad()
        with fastvl.use_backend(backend):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, labels=ids)
            out.loss.backward()
        results.append((out.logits, {n: p.grad for n, p in model.named_parameters() if n.startswith("vision_tower")}))
    (ref, ref_grads), (got, got_grads) = results
    assert_close(got, ref, tol=1e-4)
    for name, grad in ref_grads.items():
        assert_close(got_grads[name], grad, tol=1e-4, name=name)
