"""fastvl.data: image processors (parity with transformers, patch order, HD crops), chat templates, labels,
image token counts, the LLaVA dataset and the collator."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AddedToken, PreTrainedTokenizerFast

import fastvl
from fastvl.data import (
    IGNORE_INDEX, Collator, FixedResolutionProcessor, LlavaDataset, NativeResolutionProcessor, add_template_tokens,
    format_conversation, image_token_counts, smart_resize, tokenize_conversation,
)
from fastvl.data.image import CLIP_MEAN, CLIP_STD

# (height, width): odd sizes, odd aspect ratios, one up-scaled (below min_pixels), one down-scaled
SIZES = [(37, 91), (300, 41), (224, 224), (20, 30), (517, 333), (61, 600), (23, 2000)]
SMALL_BUDGET = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 96)


def _random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


# ----------------------------------------------------------------------------------------------- smart_resize

def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 4000, (400, 2)).tolist() + [[14, 14], [28, 5600], [1, 200], [42, 42], [70, 126]]
    for factor, budget in ((28, SMALL_BUDGET), (28, {}), (56, {}), (56, dict(min_pixels=3136, max_pixels=1003520))):
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, factor, **budget) == hf_smart_resize(h, w, factor, **budget), (h, w, factor)


@pytest.mark.parametrize("factor", [28, 56])
def test_smart_resize_edge_cases(factor):
    assert smart_resize(factor * 3, factor * 5, factor, min_pixels=1) == (factor * 3, factor * 5)  # kept as is
    assert smart_resize(1, 1, factor) == (56, 56) if factor == 28 else (factor, factor)  # tiny: up to min_pixels
    h, w = smart_resize(10, 13, factor, min_pixels=200 * 200)
    assert h * w >= 200 * 200 and h % factor == 0 and w % factor == 0
    h, w = smart_resize(20000, 15000, factor)  # huge: down to max_pixels, aspect kept
    assert h * w <= 28 * 28 * 1280 and h % factor == 0 and w % factor == 0
    assert abs(h / w - 4 / 3) < 0.1
    assert smart_resize(4, 800, factor)[0] == factor  # 200:1 is allowed, the short side stays one cell


@pytest.mark.parametrize("h, w", [(1, 201), (1000, 4), (28, 5800)])
def test_smart_resize_rejects_extreme_aspect(h, w):
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(h, w)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(height=0, width=10), ValueError, "height"),
    (dict(height=10, width=-1), ValueError, "width"),
    (dict(height=10.0, width=10), TypeError, "height"),
    (dict(height=10, width=10, factor=0), ValueError, "factor"),
    (dict(height=10, width=10, min_pixels=100, max_pixels=99), ValueError, "min_pixels"),
])
def test_smart_resize_validates(kwargs, error, name):
    with pytest.raises(error, match=name):
        smart_resize(**kwargs)


# --------------------------------------------------------------------------------- native resolution processor

@pytest.mark.parametrize("budget", [SMALL_BUDGET, {}], ids=["small", "default"])
@pytest.mark.parametrize("as_pil", [False, True], ids=["numpy", "pil"])
def test_native_matches_transformers(budget, as_pil):
    from transformers import Qwen2VLImageProcessorPil

    images = _random_images(SIZES, seed=2)
    images = [Image.fromarray(im) for im in images] if as_pil else images
    ours = NativeResolutionProcessor(**budget)(images)
    ref = Qwen2VLImageProcessorPil(**budget)(images, return_tensors="pt")
    assert ours["pixel_values"].dtype == torch.float32 and ours["image_grid_thw"].dtype == torch.int64
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert (ours["pixel_values"] - ref["pixel_values"].float()).abs().max().item() < 1e-5


def test_native_matches_transformers_on_other_modes():
    """Grey, palette and transparent images: converted to RGB as transformers does (alpha onto white)."""
    from transformers import Qwen2VLImageProcessorPil

    rgba = _random_images([(45, 70)], seed=6)[0]
    alpha = np.random.default_rng(6).integers(0, 256, (45, 70, 1), dtype=np.uint8)
    images = [Image.fromarray(np.concatenate([rgba, alpha], -1), "RGBA"), Image.fromarray(rgba[..., 0], "L"),
              Image.fromarray(rgba).convert("P")]
    ours = NativeResolutionProcessor(**SMALL_BUDGET)(images)
    ref = Qwen2VLImageProcessorPil(**SMALL_BUDGET)(images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert (ours["pixel_values"] - ref["pixel_values"].float()).abs().max().item() < 1e-5


def test_native_matches_transformers_fast_processor():
    pytest.importorskip("torchvision", reason="transformers' fast Qwen2VLImageProcessor needs torchvision")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    images = _random_images(SIZES, seed=3)
    ours = NativeResolutionProcessor(**SMALL_BUDGET)(images)
    ref = Qwen2VLImageProcessor(**SMALL_BUDGET)(images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    # torchvision's bicubic differs from PIL's by a few uint8 levels
    assert (ours["pixel_values"] - ref["pixel_values"].float()).abs().mean().item() < 0.05


def _coded_image(gh, gw, p=14, seed=0):
    """An image whose patch (r, c) has red = code(r), green = code(c), blue = the pixel's index in its patch."""
    codes = np.random.default_rng(seed).permutation(256)[:max(gh, gw)]
    y, x = np.mgrid[0:gh * p, 0:gw * p]
    return np.stack([codes[y // p], codes[x // p], (y % p) * p + x % p], -1).astype(np.uint8), codes


@pytest.mark.parametrize("grids, resize_factor", [([(4, 6), (2, 8), (6, 2)], None), ([(8, 12), (4, 4)], 56)])
def test_native_window_order(grids, resize_factor):
    """Rows are patches in merge-window order (windows row-major, the 2x2 patches of a window consecutive),
    each row (C, T, 14, 14) with both frames equal, images one after the other."""
    p, m = 14, 2
    coded = [_coded_image(gh, gw, seed=i) for i, (gh, gw) in enumerate(grids)]
    proc = NativeResolutionProcessor(min_pixels=4 * 14 * 14, resize_factor=resize_factor)
    out = proc([im for im, _ in coded])
    assert out["image_grid_thw"].tolist() == [[1, gh, gw] for gh, gw in grids]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    pixels = ((out["pixel_values"].view(-1, 3, 2, p, p) * std + mean) * 255).round().to(torch.int64)
    expected_rc = [(m * a + i, m * b + j) for gh, gw in grids
                   for a in range(gh // m) for b in range(gw // m) for i in range(m) for j in range(m)]
    assert pixels.shape[0] == len(expected_rc)
    within = torch.arange(p * p).view(p, p)
    row = 0
    for (gh, gw), (_, codes) in zip(grids, coded):
        for r, c in expected_rc[row:row + gh * gw]:
            patch = pixels[row]
            assert torch.equal(patch[:, 0], patch[:, 1]), "a still image repeats over the temporal patch"
            assert (patch[0] == int(codes[r])).all() and (patch[1] == int(codes[c])).all(), (row, r, c)
            assert torch.equal(patch[2, 0], within)
            row += 1
    # the same order as the vision tower's positions
    positions = fastvl.vision_positions(out["image_grid_thw"], m)
    assert positions.tolist() == [list(rc) for rc in expected_rc]


def test_native_empty_and_counts():
    proc = NativeResolutionProcessor(**SMALL_BUDGET)
    empty = proc([])
    assert empty["pixel_values"].shape == (0, 1176) and empty["image_grid_thw"].shape == (0, 3)
    out = proc(_random_images(SIZES[:3]))
    for (h, w), grid in zip(SIZES[:3], out["image_grid_thw"].tolist()):
        assert tuple(grid) == proc.grid_thw(h, w)
    assert out["pixel_values"].shape[0] == out["image_grid_thw"].prod(-1).sum()


@pytest.mark.parametrize("images, error, match", [
    (np.zeros((8, 8, 3), np.uint8), TypeError, "list"),
    ([np.zeros((8, 8, 3), np.float32)], TypeError, r"images\[0\].*uint8"),
    ([np.zeros((8, 8), np.uint8)], ValueError, r"images\[0\].*HWC"),
    ([np.zeros((8, 8, 3), np.uint8), "x.png"], TypeError, r"images\[1\]"),
])
def test_processors_validate_images(images, error, match):
    for proc in (NativeResolutionProcessor(), FixedResolutionProcessor(size=28)):
        with pytest.raises(error, match=match):
            proc(images)


def test_processors_validate_arguments():
    with pytest.raises(ValueError, match="resize_factor"):
        NativeResolutionProcessor(resize_factor=42)
    with pytest.raises(ValueError, match="merge_size"):
        NativeResolutionProcessor(merge_size=0)
    with pytest.raises(ValueError, match="min_pixels"):
        NativeResolutionProcessor(min_pixels=10 ** 6, max_pixels=10 ** 5)
    with pytest.raises(ValueError, match="image_std"):
        NativeResolutionProcessor(image_std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="mean"):
        FixedResolutionProcessor(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="size"):
        FixedResolutionProcessor(size=0)


# ---------------------------------------------------------------------------------- fixed resolution processor

def _normalized(image, mean, std):
    x = np.asarray(image, dtype=np.float64) / 255.0
    return torch.from_numpy(((x - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)).float()


def test_fixed_squash_resize():
    images = _random_images([(37, 91), (300, 41)], seed=4)
    out = FixedResolutionProcessor(size=48)(images)
    assert out["pixel_values"].shape == (2, 3, 48, 48) and out["crops_per_image"] == 1
    for im, pv in zip(images, out["pixel_values"]):
        ref = _normalized(Image.fromarray(im).resize((48, 48), Image.BICUBIC), 0.5, 0.5)
        assert (pv - ref).abs().max() < 1e-6


def test_fixed_hd_crops():
    """HD: [global, TL, TR, BL, BR] per image; the local views come from the image padded (centred) to a square
    with the mean colour, resized to 2*size."""
    s, mean = 32, (0.2, 0.4, 0.6)
    pad = np.array([51, 102, 153])
    # a tall image whose four quadrants have distinct colours: after padding, TL/BL start with padding
    quadrants = np.array([[[200, 0, 0], [0, 200, 0]], [[0, 0, 200], [250, 250, 250]]], np.uint8)
    tall = np.kron(quadrants, np.ones((40, 20, 1), np.uint8))  # 80 x 40
    wide = _random_images([(30, 70)], seed=5)[0]
    out = FixedResolutionProcessor(size=s, mean=mean, std=0.5, hd=True)([tall, wide])
    pv = out["pixel_values"]
    assert pv.shape == (10, 3, s, s) and out["crops_per_image"] == 5
    pixels = (pv.double() * 0.5 + torch.tensor(mean).view(3, 1, 1)) * 255
    assert (pv[0] - _normalized(Image.fromarray(tall).resize((s, s), Image.BICUBIC), mean, 0.5)).abs().max() < 1e-6
    # the 80x40 image fills columns 20..60 of the 80x80 square, 16..48 of 64: TL/BL crops hold padding then
    # the image's left half, TR/BR its right half then padding (away from the edges that bicubic blurs)
    tl, tr, bl, br = pixels[1:5]
    grey = torch.tensor(pad, dtype=torch.float64).view(3, 1, 1)
    for crop in (tl, bl):
        assert torch.allclose(crop[:, :, :12], grey, atol=0.5)
    for crop in (tr, br):
        assert torch.allclose(crop[:, :, -12:], grey, atol=0.5)
    centre = [crop[:, 4:28, 20:].mean((1, 2)) for crop in (tl, bl)] + [crop[:, 4:28, :12].mean((1, 2))
                                                                      for crop in (tr, br)]
    expected = [[200, 0, 0], [0, 0, 200], [0, 200, 0], [250, 250, 250]]  # TL, BL, TR, BR
    for got, want in zip(centre, expected):
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=3), (got, want)
    # the second image: an independent composition of pad, resize and crop
    square = Image.new("RGB", (70, 70), tuple(int(pad_c) for pad_c in pad))
    square.paste(Image.fromarray(wide), (0, 20))
    square = square.resize((2 * s, 2 * s), Image.BICUBIC)
    boxes = [(0, 0), (s, 0), (0, s), (s, s)]
    for crop, (x, y) in zip(pv[6:10], boxes):
        assert (crop - _normalized(square.crop((x, y, x + s, y + s)), mean, 0.5)).abs().max() < 1e-6


def test_fixed_empty():
    out = FixedResolutionProcessor(size=16, hd=True)([])
    assert out["pixel_values"].shape == (0, 3, 16, 16) and out["crops_per_image"] == 5


# ------------------------------------------------------------------------------------------ conversation text

LLAVA = {
    "id": "7",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Its colour?"},
        {"from": "gpt", "value": "Black."},
    ],
}
MESSAGES = [
    {"role": "user", "content": "<image>\nWhat is this?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "Its colour?"},
    {"role": "assistant", "content": "Black."},
]
PHI2_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.")


def test_template_qwen2():
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
                "<|im_start|>assistant\nA cat.<|im_end|>\n"
                "<|im_start|>user\nIts colour?<|im_end|>\n"
                "<|im_start|>assistant\nBlack.<|im_end|>\n")
    assert format_conversation(LLAVA, "qwen2") == expected
    assert format_conversation(MESSAGES, "qwen2") == expected
    assert format_conversation(LLAVA["conversations"], "qwen2", [3]) == expected.replace(
        "<|image_pad|>", "<|image_pad|>" * 3)
    custom = [{"role": "system", "content": "Be brief."}, *MESSAGES[:3]]
    assert format_conversation(custom, "qwen2") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nIts colour?<|im_end|>\n<|im_start|>assistant\n")  # a generation prompt


def test_template_phi2():
    assert format_conversation(LLAVA, "phi2") == (
        PHI2_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT: Black.</s>")
    assert format_conversation(MESSAGES, "phi2", [2], num_query_tokens=1) == (
        PHI2_SYSTEM + " USER: <image><image>\nWhat is this? <learnable> ASSISTANT: A cat.</s>"
        "USER: Its colour? <learnable> ASSISTANT: Black.</s>")
    assert format_conversation(MESSAGES[:1], "phi2", num_query_tokens=2) == (
        PHI2_SYSTEM + " USER: <image>\nWhat is this? <learnable><learnable> ASSISTANT:")


def test_template_plain():
    caption = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "A cat."}]
    assert format_conversation(caption, "plain") == "<image>A cat.\n"
    assert format_conversation(caption, "plain", [3], num_query_tokens=2) == (
        "<image><image><image>A cat.<learnable><learnable>\n")
    with pytest.raises(ValueError, match="plain"):
        format_conversation(LLAVA, "plain")


@pytest.mark.parametrize("conversation, error, match", [
    ([], ValueError, "non-empty"),
    ([{"from": "gpt", "value": "hi"}], ValueError, "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], ValueError, "alternate"),
    ([{"from": "robot", "value": "a"}], ValueError, "role"),
    ([{"role": "user", "content": [{"type": "text"}]}], TypeError, "str"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}], ValueError, "user turns"),
    ([{"from": "system", "value": "a"}], ValueError, "no user turn"),
    ({"image": "x"}, ValueError, "conversations"),
])
def test_conversation_validation(conversation, error, match):
    with pytest.raises(error, match=match):
        format_conversation(conversation, "qwen2")


def test_format_validates_counts_and_template():
    with pytest.raises(ValueError, match="template"):
        format_conversation(LLAVA, "llama")
    with pytest.raises(ValueError, match="2 counts for 1"):
        format_conversation(LLAVA, "qwen2", [4, 4])
    with pytest.raises(ValueError, match="num_image_tokens"):
        format_conversation(LLAVA, "qwen2", [-1])
    with pytest.raises(TypeError, match="num_image_tokens"):
        format_conversation(LLAVA, "qwen2", 4)
    with pytest.raises(ValueError, match="num_query_tokens"):
        format_conversation(LLAVA, "phi2", num_query_tokens=-1)


# ------------------------------------------------------------------------------------ tokenization and labels

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<image>",
            "</s>", "<learnable>"]


def _byte_tokenizer(specials=SPECIALS):
    """A byte-level BPE without merges: one token per byte, so the ids of any text are easy to predict."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    model = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=model)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in [*specials, "<pad>"]],
                   special_tokens=True)
    tok.pad_token = "<pad>"
    return tok


def _word_tokenizer():
    words = "A a cat . Black Its colour ? What is this USER : ASSISTANT".split()
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS], special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


def _runs(ids, labels, tok):
    """Decoded runs of supervised tokens."""
    runs, current = [], []
    for i, label in zip(ids.tolist(), labels.tolist()):
        if label == IGNORE_INDEX:
            runs, current = (runs + [current] if current else runs), []
        else:
            assert label == i
            current.append(i)
    return [tok.decode(r) for r in runs + ([current] if current else [])]


@pytest.mark.parametrize("template, counts, queries, answers", [
    ("qwen2", [5], 0, ["A cat.<|im_end|>", "Black.<|im_end|>"]),
    ("qwen2", [1], 3, ["A cat.<|im_end|>", "Black.<|im_end|>"]),
    ("phi2", [7], 0, [" A cat.</s>", " Black.</s>"]),
    ("phi2", [81], 9, [" A cat.</s>", " Black.</s>"]),
])
def test_labels_supervise_answers_only(tok, template, counts, queries, answers):
    out = tokenize_conversation(LLAVA, tok, template, counts, queries)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.dtype == labels.dtype == torch.int64 and ids.shape == labels.shape
    text = format_conversation(LLAVA, template, counts, queries)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert _runs(ids, labels, tok) == answers
    assert not labels[ids == tok.convert_tokens_to_ids("<learnable>")].ne(IGNORE_INDEX).any()


def test_labels_plain(tok):
    caption = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A cat."}]
    out = tokenize_conversation(caption, tok, "plain", [4])
    assert out["input_ids"][:4].tolist() == [tok.convert_tokens_to_ids("<image>")] * 4
    assert _runs(out["input_ids"], out["labels"], tok) == ["A cat.\n"]
    out = tokenize_conversation(caption, tok, "plain", [4], num_query_tokens=2)
    assert _runs(out["input_ids"], out["labels"], tok) == ["A cat.", "\n"]


def test_generation_prompt_has_no_labels(tok):
    out = tokenize_conversation(LLAVA["conversations"][:3], tok, "qwen2", [2])
    assert tok.decode(out["input_ids"][-len("<|im_start|>assistant\n") + 11:]) == "<|im_start|>assistant\n"
    assert _runs(out["input_ids"], out["labels"], tok) == ["A cat.<|im_end|>"]


def test_labels_with_a_word_tokenizer():
    """Any tokenizer: segments are tokenized apart, so the answers' words are exactly the supervised tokens."""
    tok = _word_tokenizer()
    for template in ("qwen2", "phi2"):
        out = tokenize_conversation(MESSAGES, tok, template, [3])
        supervised = out["input_ids"][out["labels"] != IGNORE_INDEX]
        end = "<|im_end|>" if template == "qwen2" else "</s>"
        assert tok.convert_ids_to_tokens(supervised.tolist()) == ["A", "cat", ".", end, "Black", ".", end]


def test_image_placeholders_expand_per_image(tok):
    conv = [{"from": "human", "value": "<image>\nLeft. <image>\nRight."}, {"from": "gpt", "value": "Two."},
            {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "Three."}]
    counts = [3, 1, 6]
    pad, start, end = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    ids = tokenize_conversation(conv, tok, "qwen2", counts)["input_ids"].tolist()
    starts = [i for i, t in enumerate(ids) if t == start]
    ends = [i for i, t in enumerate(ids) if t == end]
    assert [e - s - 1 for s, e in zip(starts, ends)] == counts
    assert all(set(ids[s + 1:e]) == {pad} for s, e in zip(starts, ends))
    assert ids.count(pad) == sum(counts)
    ids = tokenize_conversation(conv, tok, "phi2", counts, num_query_tokens=9)["input_ids"].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 10
    assert ids.count(tok.convert_tokens_to_ids("<learnable>")) == 2 * 9


def test_images_without_placeholder_are_prepended(tok):
    conv = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A cat."}]
    assert format_conversation(conv, "phi2", [2, 2]).startswith(PHI2_SYSTEM + " USER: <image><image>\n<image><image>\n")
    ids = tokenize_conversation(conv, tok, "qwen2", [4, 2])["input_ids"]
    assert (ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == 6
    text_only = tokenize_conversation(conv, tok, "qwen2")["input_ids"]
    assert not (text_only == tok.convert_tokens_to_ids("<|image_pad|>")).any()


def test_tokenizer_needs_template_tokens():
    tok = _byte_tokenizer(specials=[])
    with pytest.raises(ValueError, match="add_template_tokens"):
        tokenize_conversation(LLAVA, tok, "phi2", [2])
    assert add_template_tokens(tok, "phi2") == ["<image>", "</s>", "<learnable>"]
    assert add_template_tokens(tok, "phi2") == []
    assert len(add_template_tokens(tok, "qwen2")) == 5
    out = tokenize_conversation(LLAVA, tok, "phi2", [2], num_query_tokens=9)
    assert _runs(out["input_ids"], out["labels"], tok) == [" A cat.</s>", " Black.</s>"]


def test_add_template_tokens_to_a_tokenizer_with_an_unknown_token():
    """Words a tokenizer does not know map to its unknown token: they are lacking, not present."""
    words = "A a cat . What is this".split()
    bare = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bare = PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="[UNK]")
    assert bare("<|image_pad|>", add_special_tokens=False)["input_ids"] == [bare.unk_token_id]
    added = add_template_tokens(bare, "qwen2")
    assert added == ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<learnable>"]
    assert all(len(bare(t, add_special_tokens=False)["input_ids"]) == 1 for t in added)
    assert bare.convert_tokens_to_ids("<|image_pad|>") != bare.unk_token_id
    out = tokenize_conversation(MESSAGES, bare, "qwen2", [2])
    assert (out["input_ids"] == bare.convert_tokens_to_ids("<|image_pad|>")).sum() == 2


def test_literal_image_token_in_text_is_rejected(tok):
    conv = [{"from": "human", "value": "<image> and <|image_pad|>"}, {"from": "gpt", "value": "no"}]
    with pytest.raises(ValueError, match="image_pad"):
        tokenize_conversation(conv, tok, "qwen2", [2])


def test_max_length(tok):
    full = tokenize_conversation(LLAVA, tok, "qwen2", [8])
    cut = tokenize_conversation(LLAVA, tok, "qwen2", [8], max_length=full["input_ids"].numel() - 5)
    assert torch.equal(cut["input_ids"], full["input_ids"][:-5]) and torch.equal(cut["labels"], full["labels"][:-5])
    with pytest.raises(ValueError, match="max_length"):
        tokenize_conversation(LLAVA, tok, "qwen2", [8], max_length=20)


# ------------------------------------------------------------------------------------------ image token counts

def test_image_token_counts():
    grid = torch.tensor([[1, 4, 6], [2, 8, 12], [1, 28, 28]])
    assert image_token_counts(grid, "none") == [24, 192, 784]
    assert image_token_counts(grid, "patch_merge") == [6, 48, 196]
    assert image_token_counts(grid, "deepstack_midlayers") == [6, 48, 196]
    assert image_token_counts(grid[1:], "deepstack_efficient") == [2 * 2 * 3, 7 * 7]
    assert image_token_counts(grid, "sap") == [1 * 2 * 2, 2 * 3 * 4, 100]
    assert image_token_counts([[1, 27, 27]] * 5, "sap") == [81] * 5  # an HD image: 405
    assert image_token_counts([[1, 6, 9]], "patch_merge", merge_size=3) == [6]
    assert image_token_counts(torch.zeros(0, 3, dtype=torch.int64), "none") == []


def test_image_token_counts_match_the_processor():
    out = NativeResolutionProcessor(**SMALL_BUDGET)(_random_images(SIZES))
    counts = image_token_counts(out["image_grid_thw"], "patch_merge")
    assert sum(counts) * 4 == out["pixel_values"].shape[0]
    out = NativeResolutionProcessor(resize_factor=56, **SMALL_BUDGET)(_random_images(SIZES))
    assert sum(image_token_counts(out["image_grid_thw"], "deepstack_efficient")) * 16 == out["pixel_values"].shape[0]


@pytest.mark.parametrize("grid, compressor, match", [
    ([[1, 4, 6]], "pool", "compressor"),
    ([[1, 4, 6]], "deepstack_efficient", "multiples of 4"),
    ([[1, 3, 4]], "patch_merge", "multiples of 2"),
    ([[1, 0, 4]], "none", "positive"),
    ([1, 4, 6], "none", r"\[n_images, 3\]"),
])
def test_image_token_counts_validate(grid, compressor, match):
    with pytest.raises(ValueError, match=match):
        image_token_counts(grid, compressor)


# ---------------------------------------------------------------------------------------- collator and dataset

def test_collator(tok):
    proc = NativeResolutionProcessor(**SMALL_BUDGET)
    two = [{"from": "human", "value": "<image> or <image>?"}, {"from": "gpt", "value": "The first."}]
    convs = [LLAVA, two, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]]
    image_sets = [_random_images(SIZES[:1]), _random_images(SIZES[1:3], seed=1), []]
    samples = []
    for conv, images in zip(convs, image_sets):
        processed = proc(images)
        counts = image_token_counts(processed["image_grid_thw"], "patch_merge")
        samples.append({**tokenize_conversation(conv, tok, "qwen2", counts), **processed})
    batch = Collator(tok)(samples)
    lengths = [s["input_ids"].numel() for s in samples]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (s, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], s["input_ids"])
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert torch.equal(batch["labels"][row, :n], s["labels"]) and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))
    assert batch["image_grid_thw"].tolist() == [g for s in samples for g in s["image_grid_thw"].tolist()]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == pad).sum() * 4 == batch["pixel_values"].shape[0]


def test_collator_fixed_resolution(tok):
    proc = FixedResolutionProcessor(size=16, hd=True)
    samples = [{**tokenize_conversation(LLAVA, tok, "phi2", [405]), **proc(_random_images([(20, 30)]))}
               for _ in range(2)]
    batch = Collator(tok)(samples)
    assert batch["pixel_values"].shape == (10, 3, 16, 16) and batch["crops_per_image"] == 5
    samples[1]["crops_per_image"] = 1
    with pytest.raises(ValueError, match="crops_per_image"):
        Collator(tok)(samples)
    with pytest.raises(ValueError, match="pad token"):
        Collator(_word_tokenizer())


@pytest.fixture
def llava_files(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name, (h, w) in {"a.png": (37, 91), "sub/b.png": (300, 41), "c.jpg": (64, 64)}.items():
        Image.fromarray(_random_images([(h, w)], seed=len(name))[0]).save(images / name)
    records = [
        {"id": "one", "image": "a.png", "conversations": LLAVA["conversations"]},
        {"id": "two", "image": ["sub/b.png", "c.jpg"],
         "conversations": [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "Same."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "lost", "image": "missing.png", "conversations": LLAVA["conversations"]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return tmp_path, records


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava_dataset(tok, llava_files, fmt):
    root, records = llava_files
    proc = NativeResolutionProcessor(**SMALL_BUDGET)
    data = LlavaDataset(root / f"data.{fmt}", root / "images", tok, proc, "qwen2",
                        lambda out: image_token_counts(out["image_grid_thw"], "patch_merge"))
    assert len(data) == 4 and data.record(1)["id"] == "two"
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for i, names in enumerate([["a.png"], ["sub/b.png", "c.jpg"], []]):
        sample = data[i]
        expected = proc([Image.open(root / "images" / n).convert("RGB") for n in names])
        assert torch.equal(sample["pixel_values"], expected["pixel_values"])
        assert torch.equal(sample["image_grid_thw"], expected["image_grid_thw"])
        assert (sample["input_ids"] == pad).sum() * 4 == sample["pixel_values"].shape[0]
    with pytest.raises(FileNotFoundError, match=r"record 3 \(id 'lost'\): image .*missing\.png.* not found"):
        data[3]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, [0, 1, 2]), batch_size=3,
                                         collate_fn=Collator(tok))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 3 and batch["image_grid_thw"].shape == (3, 3)


def test_llava_dataset_fixed_resolution(tok, llava_files):
    root, _ = llava_files
    data = LlavaDataset(root / "data.json", root / "images", tok, FixedResolutionProcessor(size=16, hd=True), "phi2",
                        405, num_query_tokens=9)
    sample = data[1]
    assert sample["pixel_values"].shape == (10, 3, 16, 16) and sample["crops_per_image"] == 5
    assert (sample["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum() == 810
    assert data[2]["pixel_values"].shape == (0, 3, 16, 16)


def test_llava_dataset_errors(tok, llava_files, tmp_path):
    root, _ = llava_files
    proc = FixedResolutionProcessor(size=16)
    with pytest.raises(FileNotFoundError, match="json_path"):
        LlavaDataset(root / "nope.json", root / "images", tok, proc, "phi2", 81)
    with pytest.raises(FileNotFoundError, match="image_folder"):
        LlavaDataset(root / "data.json", root / "nope", tok, proc, "phi2", 81)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlavaDataset(tmp_path / "bad.json", root / "images", tok, proc, "phi2", 81)
    (tmp_path / "bad.jsonl").write_text('{"conversations": []}\n{"id": 3}\nnot json\n')
    data = LlavaDataset(tmp_path / "bad.jsonl", root / "images", tok, proc, "phi2", 81)
    with pytest.raises(ValueError, match="record 1 has no 'conversations'"):
        data[1]
    with pytest.raises(ValueError, match="record 2 is not valid JSON"):
        data[2]
    with pytest.raises(ValueError, match="template"):
        LlavaDataset(root / "data.json", root / "images", tok, proc, "vicuna", 81)
    with pytest.raises(ValueError, match="num_image_tokens"):
        LlavaDataset(root / "data.json", root / "images", tok, proc, "phi2", -1)
    (root / "images" / "broken.png").write_bytes(b"not an image")
    broken = [{"image": "broken.png", "conversations": LLAVA["conversations"]}]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="broken.png.*cannot be read"):
        LlavaDataset(tmp_path / "broken.json", root / "images", tok, proc, "phi2", 81)[0]
