"""Whole Qwen2-VL / Qwen2.5-VL checkpoints saved by transformers, loaded and converted by fastvl, against
transformers' own models in float64; any local LLM as the language model; tokenizers; ``fastvl convert``.

transformers computes the ViT's 2D RoPE tables in fp32 whatever the model dtype, so the vision side agrees to
~1e-7 (see test_integrations); the LLM (same rotary code on both sides) adds nothing to that.
"""
import json
import re

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config,
    Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
)

from fastvl.cli import main as cli
from fastvl.data import NativeResolutionProcessor
from fastvl.models import FastVLConfig, FastVLForConditionalGeneration, load_language_weights
from fastvl.models.rope import mrope_positions
from fastvl.testing import assert_close, generator, randn

TOL = 1e-6
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def byte_tokenizer():
    """A byte-level BPE without merges (ids 0..255 are bytes), then Qwen2-VL's special tokens."""
    model = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                 merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=model)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS], special_tokens=True)
    return tok


TOK = byte_tokenizer()
START, IMAGE, END, VIDEO = (TOK.convert_tokens_to_ids(t) for t in SPECIALS[2:])
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                                    "rope_theta": 1e6})


def save_qwen(path, kind):
    """A tiny random Qwen2-VL (tied embeddings) or Qwen2.5-VL (untied, windows of 2x2 merged tokens, block 1 full)
    in float64, saved by transformers with a tokenizer; returns the transformers model."""
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=64, num_heads=1, hidden_size=64, mlp_ratio=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=TEXT, vision_config=vision,
                                                              tie_word_embeddings=True, **IDS))
    else:
        vision = dict(depth=2, hidden_size=64, num_heads=1, intermediate_size=96, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **IDS))
    model = model.double().eval()
    with torch.no_grad():  # non-trivial norms
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = save_qwen(path, request.param)
    return path, hf, FastVLForConditionalGeneration.from_pretrained(path)


def batch(pieces):
    """Left-padded input_ids, attention_mask and mm_token_type_ids from per-sample lists of token runs."""
    rows = [sum(p, []) for p in pieces]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    return ids, mask, types


def visual(token, t, h, w):
    return [START] + [token] * (t * h * w // 4) + [END]


IMAGES = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 2, 2]])
VIDEOS = torch.tensor([[2, 4, 4]])  # t <= max(h, w) / 2: the rules of transformers and of Qwen2-VL agree here
MIXED = [[[20, 21], visual(IMAGE, 1, 4, 6), [22], visual(IMAGE, 1, 8, 4), [23, 24, 25]],  # two sizes, one sample
         [[30], visual(VIDEO, 2, 4, 4), [31], visual(IMAGE, 1, 2, 2), [32]]]  # a video, then an image; padded


def inputs(seed=0):
    ids, mask, types = batch(MIXED)
    return dict(input_ids=ids, attention_mask=mask,
                pixel_values=randn(int(IMAGES.prod(-1).sum()), 1176, dtype=torch.float64, gen=generator(seed)),
                image_grid_thw=IMAGES, video_grid_thw=VIDEOS,
                pixel_values_videos=randn(32, 1176, dtype=torch.float64, gen=generator(seed + 1))), types


def test_qwen_logits_match_transformers(qwen):
    path, hf, ours = qwen
    qwen25 = isinstance(hf, Qwen2_5_VLForConditionalGeneration)
    assert ours.config.mrope_section == [4, 6, 6] and ours.config.vision_config.window_size == (56 if qwen25 else 0)
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == (not qwen25)
    extra = dict(second_per_grid_ts=torch.tensor([0.5])) if qwen25 else {}  # 2 tokens/s * 0.5 s: frame step 1
    kwargs, types = inputs()
    with torch.no_grad():
        ref = hf(**kwargs, mm_token_type_ids=types, **extra).logits
        got = ours(**kwargs, **extra).logits
    real = kwargs["attention_mask"].bool()
    assert_close(got[real], ref[real], tol=TOL)
    ids, mask, _ = batch([[[40, 41, 42, 43]], [[44, 45]]])  # text only, left padded
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert_close(got[mask.bool()], ref[mask.bool()], tol=TOL)  # transformers: positions from 0 at the padding


@pytest.mark.parametrize("case", ["one image", "mixed batch"])
def test_qwen_greedy_generation_matches_transformers(qwen, case):
    path, hf, ours = qwen
    kwargs, types = inputs(seed=3)
    extra = dict(second_per_grid_ts=torch.tensor([0.5])) if isinstance(hf, Qwen2_5_VLForConditionalGeneration) else {}
    if case == "one image":
        ids, mask, types = batch([[[20, 21], visual(IMAGE, 1, 8, 4), [22, 23]]])
        kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=kwargs["pixel_values"][24:56],
                      image_grid_thw=IMAGES[1:2])
        extra = {}
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref = hf.generate(**kwargs, mm_token_type_ids=types, **extra, **settings)
    got = ours.generate(**kwargs, **extra, **settings)
    assert torch.equal(got.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(got.logits, ref.logits)):  # decoding positions continue M-RoPE's
        assert_close(a, b, tol=TOL, name=f"step {step}")


def test_convert_writes_a_fastvl_checkpoint(qwen, tmp_path, capsys):
    path, hf, ours = qwen
    assert cli(["convert", str(path), str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "fastvl" and saved["mrope_section"] == [4, 6, 6]
    loaded = FastVLForConditionalGeneration.from_pretrained(tmp_path / "out")
    for (name, a), (_, b) in zip(ours.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert cli(["generate", "--model", str(tmp_path / "out"), "--image", str(image_file(tmp_path)), "--prompt",
                "what?", "--max-new-tokens", "2"]) == 0
    assert cli(["generate", "--model", str(path), "--image", str(image_file(tmp_path)), "--prompt",  # as it is
                "what?", "--max-new-tokens", "2"]) == 0


def image_file(tmp_path):
    from PIL import Image

    file = tmp_path / "image.png"
    Image.fromarray((torch.rand(60, 90, 3) * 255).byte().numpy()).save(file)
    return file


def test_generate_and_convert_errors(qwen, tmp_path, capsys):
    path, _, _ = qwen
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((path / name).read_bytes())
    code = cli(["generate", "--model", str(bare), "--image", str(image_file(tmp_path)), "--prompt", "x"])
    assert code == 2 and "no tokenizer files" in capsys.readouterr().err
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))
    other.save_pretrained(bare)
    code = cli(["generate", "--model", str(bare), "--image", str(image_file(tmp_path)), "--prompt", "x"])
    assert code == 2 and "<|image_pad|>" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (bare / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(ValueError, match="load_language_weights"):
        FastVLForConditionalGeneration.from_pretrained(bare)


def test_missing_and_unexpected_keys_are_listed(qwen, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _, _ = qwen
    state = load_file(path / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    dropped = next(k for k in state if re.search(r"blocks\.1\.mlp\.(fc2|down_proj)\.weight$", k))
    state.pop(dropped)
    state["model.visual.extra.weight"] = torch.zeros(2)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: vision_tower\.blocks\.1\.mlp\..*unexpected: visual\.extra\.weight"):
        FastVLForConditionalGeneration.from_pretrained(broken)


def test_processor_from_the_checkpoint_matches_transformers(tmp_path):
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 60)
    hf.save_pretrained(tmp_path)
    image = Image.fromarray((torch.rand(100, 170, 3) * 255).byte().numpy())
    ref = hf([image], return_tensors="pt")
    ours = NativeResolutionProcessor.from_pretrained(tmp_path)([image])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert_close(ours["pixel_values"], ref["pixel_values"], tol=1e-6)


def test_mrope_rule():
    """Text on one index; each visual item on (frame * step, row, column) + that index; then after its maximum
    (Qwen2-VL's get_rope_index; transformers 5 advances by max(h, w) only, which differs when frames outnumber
    rows and columns, as for this video)."""
    ids = torch.tensor([[9, 9, 1, 1, 1, 1, 9, 2, 2, 2, 2, 2, 2, 2, 2, 9]])
    pos, deltas = mrope_positions(ids, None, {1: [(1, 2, 2, 1)], 2: [(4, 1, 2, 1)]})
    t, h, w = pos[:, 0].tolist()
    assert t == [0, 1, 2, 2, 2, 2, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9]
    assert h == [0, 1, 2, 2, 3, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5, 9]
    assert w == [0, 1, 2, 3, 2, 3, 4, 5, 6, 5, 6, 5, 6, 5, 6, 9]
    assert deltas.tolist() == [[10 - 16]]
    pos, _ = mrope_positions(ids[:, :6], torch.tensor([[0, 1, 1, 1, 1, 1]]), {1: [(1, 2, 2, 1)]})
    assert pos[0, 0].tolist() == [0, 0, 1, 1, 1, 1] and pos[2, 0].tolist() == [0, 0, 1, 2, 1, 2]
    with pytest.raises(ValueError, match="does not split"):
        mrope_positions(ids[:, :5], None, {1: [(1, 2, 2, 1)]})


def save_llm(path, **overrides):
    torch.manual_seed(1)
    fields = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=True)
    config = Qwen2Config(**fields | overrides)
    llm = Qwen2ForCausalLM(config)
    llm.save_pretrained(path)
    return llm


def test_language_weights_from_a_local_llm(tmp_path):
    llm = save_llm(tmp_path / "llm")
    config = FastVLConfig(vision_config=dict(depth=1, embed_dim=64, num_heads=1, intermediate_size=64),
                          text_config=AutoConfig.from_pretrained(tmp_path / "llm"), image_token_id=IMAGE)
    model = FastVLForConditionalGeneration(config)
    load_language_weights(model, tmp_path / "llm")
    for name, value in llm.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], value), name
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(input_ids=ids).logits, llm(input_ids=ids).logits)
    save_llm(tmp_path / "wide", hidden_size=128)
    with pytest.raises(ValueError, match="of another shape: lm_head.weight, model.embed_tokens.weight"):
        load_language_weights(model, tmp_path / "wide")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "llm" / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, tmp_path / "llm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_language_weights(model, tmp_path / "llm")
