"""Prompt + image -> text with a saved FastVL model: its tokenizer, and the image processor and chat template its
config implies."""
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def image_processor(config, path=None):
    """The fastvl.data processor matching the vision tower of ``config``; for a native tower the pixel budget and
    normalisation come from ``path``/preprocessor_config.json when there is one (the original's processor)."""
    from ..data import FixedResolutionProcessor, NativeResolutionProcessor

    vision = config.vision_config
    if vision.tower == "fixed":
        return FixedResolutionProcessor(size=vision.image_size, hd=config.image_hd)
    # DeepStack-Efficient gives the LLM one token per 2m x 2m patches: sides resize to multiples of that
    efficient = (config.compressor == "deepstack" and config.deepstack_type == "efficient"
                 and not vision.input_patch_size)
    patch = vision.input_patch_size or vision.patch_size
    geometry = dict(patch_size=patch, temporal_patch_size=vision.temporal_patch_size,
                    merge_size=vision.spatial_merge_size,
                    resize_factor=patch * vision.spatial_merge_size * (2 if efficient else 1))
    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        return NativeResolutionProcessor.from_pretrained(path, **geometry)
    return NativeResolutionProcessor(**geometry)


def find_tokenizer(path):
    """The tokenizer saved in the directory ``path``, or None when it holds no tokenizer files."""
    from transformers import AutoTokenizer

    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path)


def load_tokenizer(path, config):
    """The tokenizer of the model directory ``path``, checked against the model's ``config``: FileNotFoundError
    when there are no tokenizer files, ValueError when it lacks the model's image (or query) token."""
    tokenizer = find_tokenizer(path)
    if tokenizer is None:
        raise FileNotFoundError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    check_tokenizer(tokenizer, config)
    return tokenizer


def check_tokenizer(tokenizer, config):
    """ValueError unless the chat template's image token (and the query token, with EmbQ) encode to one token each,
    with the model's ids."""
    from ..data.conversation import QUERY_TOKEN, TEMPLATES, token_id

    wanted = [(TEMPLATES[config.chat_template].image_token, config.image_token_id, "image_token_id")]
    if config.use_embq:
        wanted.append((QUERY_TOKEN, config.query_token_id, "query_token_id"))
    for token, expected, name in wanted:
        got = token_id(tokenizer, token)
        if got != expected:
            found = "is not one token of it" if got is None else f"is id {got}"
            raise ValueError(f"tokenizer: {token!r} {found}, but the model's {name} is {expected}")


def prepare_inputs(model, tokenizer, images, prompt, processor=None):
    """``generate()`` inputs of one user turn: ``images`` (PIL) then ``prompt``, in the model's chat template
    (``processor``: default ``image_processor(model.config)``)."""
    from ..data import tokenize_conversation

    config = model.config
    inputs = (processor or image_processor(config))(images)
    counts = model.num_image_tokens(inputs.get("image_grid_thw", inputs["pixel_values"]))
    queries = 0
    if config.use_embq:  # FlashSloth without an image: one <learnable>, an ordinary token
        queries = 1 if not counts and config.embq_without_image == "plain" else config.num_query_tokens
    if config.chat_template == "plain":  # pretraining format: the prompt starts the caption
        text = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([config.image_token_id] * sum(counts) + text)
    else:
        turn = [{"role": "user", "content": "<image>\n" * len(counts) + prompt}]
        input_ids = tokenize_conversation(turn, tokenizer, config.chat_template, counts, queries)["input_ids"]
    if (input_ids == config.image_token_id).sum().item() != sum(counts):
        raise ValueError(
            f"tokenizer: the {config.chat_template!r} template's image token does not have the model's "
            f"image_token_id {config.image_token_id}"
        )
    inputs = {k: v.to(model.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return {"input_ids": input_ids[None].to(model.device), **inputs}


@torch.inference_mode()
def generate_text(model, tokenizer, images, prompt, max_new_tokens=128, processor=None):
    """Greedy answer of ``model`` to ``prompt`` about ``images``."""
    from ..data.conversation import TEMPLATES, token_id

    inputs = prepare_inputs(model, tokenizer, images, prompt, processor)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    end = token_id(tokenizer, TEMPLATES[model.config.chat_template].answer_end)  # also stop where answers end
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos + ([end] if end is not None and end not in eos else []) or None)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
