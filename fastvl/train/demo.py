"""``fastvl train --demo DIR``: a tiny FastVL model learns to caption generated images from random init.

Images of 112x112 px hold one shape (circle, square, triangle, cross) of one colour (red, green, blue, yellow) in
one quadrant, with jittered size, place, shade and background; the caption names all three ("a red circle at
the top left"). The demo writes the data set (``DIR/data``), a randomly initialised Qwen2-VL-style model with a
word-level tokenizer (``DIR/init``), trains it with ``fastvl.train`` (``DIR/model``: checkpoints, metrics, loss
curve, final model), then captions freshly generated held-out images with ``generate`` and prints the accuracy
next to chance (1/64 for a whole caption).
"""
import json
import os
import random
import re
import sys
import time

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
PLACES = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
QUESTIONS = ("What is in the image?", "Describe the image.", "What do you see?")
SIZE = 112
SYSTEM = "You are a helpful assistant."
SPECIAL = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
TRAIN_ARGS = ["--tune_parts", "vision,projector,llm", "--per_device_train_batch_size", "16", "--learning_rate", "2e-3",
              "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05",
              "--max_steps", "300", "--logging_steps", "10", "--save_steps", "100", "--save_total_limit", "1",
              "--dataloader_num_workers", "1", "--seed", "0"]


def caption(colour, shape, place):
    return f"a {colour} {shape} at the {place}"


def draw(colour, shape, place, rng):
    """A 112x112 RGB image of the shape (PIL)."""
    from PIL import Image, ImageDraw

    grey = rng.randint(225, 255)
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    r = rng.randint(18, 24)
    qx, qy = PLACES[place]
    cx = qx * SIZE // 2 + SIZE // 4 + rng.randint(-5, 5)
    cy = qy * SIZE // 2 + SIZE // 4 + rng.randint(-5, 5)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r // 3
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    return image


def samples(n, seed):
    """``n`` (image, colour, shape, place) drawn at random."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
        out.append((draw(colour, shape, place, rng), colour, shape, place))
    return out


def write_dataset(root, n, seed):
    """``root/images/*.png`` and the LLaVA file ``root/train.jsonl``; returns its path."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(seed + 1)
    path = os.path.join(root, "train.jsonl")
    with open(path, "w") as f:
        for i, (image, colour, shape, place) in enumerate(samples(n, seed)):
            name = f"images/{i:05d}.png"
            image.save(os.path.join(root, name))
            f.write(json.dumps({"id": str(i), "image": name, "conversations": [
                {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
                {"from": "gpt", "value": caption(colour, shape, place)}]}) + "\n")
    return path


def tokenizer():
    """A word-level tokenizer knowing the demo's words and the qwen2 template's tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join([SYSTEM, "system user assistant", *QUESTIONS, "a at the", *COLOURS, *SHAPES, *PLACES])
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text)))
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<|im_end|>",
                                   additional_special_tokens=SPECIAL[2:])


def tiny_model(tok, seed=0):
    """A randomly initialised FastVL model: a 2-block fixed-resolution ViT (128 wide, learned positions: the
    captions name places), FlashSloth's SAP (8x8 patches -> 3x3 tokens), a 2-layer Qwen2 LLM (128 wide)."""
    import torch

    from ..models import FastVLConfig, FastVLForConditionalGeneration

    config = FastVLConfig(
        vision_config=dict(tower="fixed", depth=2, embed_dim=128, num_heads=2, intermediate_size=256,
                           image_size=SIZE, patch_size=14, hidden_act="gelu_pytorch_tanh"),
        text_config=dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        compressor="sap", chat_template="qwen2", image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
    )
    torch.manual_seed(seed)
    model = FastVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def evaluate(model_dir, n, seed):
    """Greedy captions of ``n`` fresh images: accuracy of whole captions and of each attribute."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import generate_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hits = {"caption": 0, "colour": 0, "shape": 0, "place": 0}
    examples = []
    torch.manual_seed(seed)
    for image, colour, shape, place in samples(n, seed):
        said = " ".join(generate_text(model, tok, [image], QUESTIONS[0], max_new_tokens=10).split())
        want = caption(colour, shape, place)
        hits["caption"] += said == want
        hits["colour"] += f" {colour} " in f" {said} "
        hits["shape"] += f" {shape} " in f" {said} "
        hits["place"] += said.endswith(place)
        if len(examples) < 5:
            examples.append({"expected": want, "generated": said})
    chance = {"caption": 1 / (len(COLOURS) * len(SHAPES) * len(PLACES)), "colour": 1 / len(COLOURS),
              "shape": 1 / len(SHAPES), "place": 1 / len(PLACES)}
    return {"images": n, "accuracy": {k: v / n for k, v in hits.items()}, "chance": chance, "examples": examples}


def run(output_dir, nproc=2, extra_args=(), train_images=2000, eval_images=100, seed=0):
    """The whole demo; extra arguments override the training flags. Returns the exit status."""
    began = time.time()
    data = os.path.join(output_dir, "data")
    init = os.path.join(output_dir, "init")
    model_dir = os.path.join(output_dir, "model")
    if not os.path.isfile(os.path.join(data, "train.jsonl")):
        print(f"demo: drawing {train_images} training images into {data}", file=sys.stderr)
        write_dataset(data, train_images, seed)
    if not os.path.isfile(os.path.join(init, "config.json")):
        tok = tokenizer()
        tiny_model(tok, seed).save_pretrained(init)
        tok.save_pretrained(init)
    args = ["--model_name_or_path", init, "--data_path", os.path.join(data, "train.jsonl"), "--image_folder", data,
            "--output_dir", model_dir, *TRAIN_ARGS, *extra_args]
    if os.path.isdir(model_dir) and any(n.startswith("checkpoint-") for n in os.listdir(model_dir)):
        args.append("--resume")
    print(f"demo: training on {nproc} rank(s): fastvl train {' '.join(args)}", file=sys.stderr)
    if nproc > 1:
        from .launch import torchrun

        status = torchrun(nproc, args)
    else:
        from . import main

        status = main(args)
    if status:
        return status
    result = evaluate(model_dir, eval_images, seed + 12345)
    result["wall_time_s"] = round(time.time() - began, 1)
    with open(os.path.join(output_dir, "demo_eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nheld-out images: {result['images']} (never seen in training)")
    print(f"{'':10}{'accuracy':>10}{'chance':>10}")
    for key, acc in result["accuracy"].items():
        print(f"{key:10}{acc:>10.1%}{result['chance'][key]:>10.1%}")
    for ex in result["examples"]:
        print(f"  expected {ex['expected']!r:32} generated {ex['generated']!r}")
    print(f"model, tokenizer, metrics.jsonl, loss_curve.png and train_summary.json in {model_dir}; "
          f"try: fastvl generate --model {model_dir} --image {os.path.join(data, 'images', '00000.png')} "
          f"--prompt 'What is in the image?'")
    return 0
