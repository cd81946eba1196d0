"""Conversation formatting: LLaVA records or role/content messages -> prompt text, ``input_ids`` and ``labels``.

A conversation is a list of messages, either LLaVA style ``{"from": "human" | "gpt" | "system", "value": str}``
or ``{"role": "user" | "assistant" | "system", "content": str}`` (a whole LLaVA record, a dict with
``"conversations"``, is accepted too). An optional first system message replaces the template's default system
prompt; then user and assistant turns alternate, starting with the user. A conversation that ends with a user
turn renders as a generation prompt (it ends with the assistant's prefix).

``<image>`` in a user turn marks an image. Each placeholder becomes as many image tokens as the model gives that
image (``num_image_tokens``, in placeholder order). A conversation with images but no placeholder gets them
prepended to its first user turn (``"<image>\\n" * n``). With ``num_query_tokens > 0`` every user turn is followed
by that many ``<learnable>`` tokens (FlashSloth's embedded queries).

Templates:
- ``qwen2``: ChatML, ``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n
  ...<|im_end|>\\n``; an image is ``<|vision_start|><|image_pad|>*n<|vision_end|>`` (a newline right after the
  placeholder is dropped, as Qwen2-VL's own template puts none).
- ``phi2``: FlashSloth's ``"<system> USER: <image>\\nQ <learnable> ASSISTANT: A</s>USER: ..."``; an image is
  ``<image>*n``.
- ``plain``: pretraining, ``<image>*n`` + caption (+ queries) + ``"\\n"``; the user's words are dropped.

Labels are ``IGNORE_INDEX`` everywhere except on assistant answers and the token that ends them (``<|im_end|>``,
``</s>``; for ``plain`` the caption and its ``"\\n"``). Each answer, and each stretch of prompt text between two
answers, is tokenized on its own (no BOS/EOS added by the tokenizer): the supervised span never depends on how the
tokenizer merges across a boundary, and a prompt tokenizes as a whole, as the original models' code does (FlashSloth's
question span counts tokens from the start). Answers of ``phi2`` keep their leading space, as byte-pair tokenizers
attach it to the first word.
"""
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
QUERY_TOKEN = "<learnable>"
QWEN2_SYSTEM = "You are a helpful assistant."
PHI2_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Template:
    name: str
    image_token: str             # one per visual token
    image_open: str              # around each image's tokens
    image_close: str
    image_pattern: str           # what a placeholder (and what it swallows) looks like in the text
    special_tokens: tuple        # must each be one token of the tokenizer
    answer_end: str              # closes each answer (supervised; generation stops there)


TEMPLATES = {
    "qwen2": Template("qwen2", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", r"<image>\n?",
                      ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
                      "<|im_end|>"),
    "phi2": Template("phi2", IMAGE_PLACEHOLDER, "", "", r"<image>", (IMAGE_PLACEHOLDER, "</s>"), "</s>"),
    "plain": Template("plain", IMAGE_PLACEHOLDER, "", "", r"<image>", (IMAGE_PLACEHOLDER,), "\n"),
}


def get_template(template):
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    return TEMPLATES[template]


def _turns(conversation):
    """(system or None, [(user text, answer or None), ...]) from LLaVA or role/content messages."""
    if isinstance(conversation, Mapping):
        if "conversations" not in conversation:
            raise ValueError("conversation: a record needs a 'conversations' list")
        conversation = conversation["conversations"]
    if not isinstance(conversation, Sequence) or isinstance(conversation, str) or not conversation:
        raise ValueError("conversation must be a non-empty list of messages")
    messages = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, Mapping):
            raise TypeError(f"conversation[{i}] must be a dict, got {type(msg).__name__}")
        role, text = (msg.get("from"), msg.get("value")) if "from" in msg else (msg.get("role"), msg.get("content"))
        if role not in _ROLES:
            raise ValueError(f"conversation[{i}]: unknown role {role!r} (expected one of {sorted(_ROLES)})")
        if not isinstance(text, str):
            raise TypeError(f"conversation[{i}]: the message text must be a str, got {type(text).__name__}")
        messages.append((_ROLES[role], text))
    system = messages.pop(0)[1] if messages[0][0] == "system" else None
    for i, (role, text) in enumerate(messages):
        if role != ("user", "assistant")[i % 2]:
            raise ValueError("conversation: turns must alternate user, assistant, ... starting with the user "
                             "(one optional system message first)")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise ValueError("conversation: images belong in user turns, found <image> in an answer")
    if not messages:
        raise ValueError("conversation has no user turn")
    users, answers = [t for r, t in messages if r == "user"], [t for r, t in messages if r == "assistant"]
    return system, list(zip(users, answers + [None]))


def _segments(conversation, template, num_image_tokens, num_query_tokens):
    """The conversation as [(text, supervised)], images and queries expanded."""
    system, turns = _turns(conversation)
    if num_image_tokens is not None and not isinstance(num_image_tokens, (list, tuple)):
        raise TypeError(f"num_image_tokens must be a list of ints, got {type(num_image_tokens).__name__}")
    counts = None if num_image_tokens is None else list(num_image_tokens)
    if counts is not None and not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise ValueError(f"num_image_tokens must be a list of non-negative ints, got {num_image_tokens!r}")
    placeholders = sum(user.count(IMAGE_PLACEHOLDER) for user, _ in turns)
    if placeholders == 0 and counts:
        turns[0] = ((IMAGE_PLACEHOLDER + "\n") * len(counts) + turns[0][0], turns[0][1])
        placeholders = len(counts)
    counts = [1] * placeholders if counts is None else counts
    if len(counts) != placeholders:
        raise ValueError(f"num_image_tokens: {len(counts)} counts for {placeholders} <image> placeholders")
    if isinstance(num_query_tokens, bool) or not isinstance(num_query_tokens, int) or num_query_tokens < 0:
        raise ValueError(f"num_query_tokens must be a non-negative int, got {num_query_tokens!r}")
    remaining = iter(counts)

    def expand(text):
        return re.sub(template.image_pattern,
                      lambda _: template.image_open + template.image_token * next(remaining) + template.image_close,
                      text)

    query = QUERY_TOKEN * num_query_tokens
    if template.name == "qwen2":
        segments = [(f"<|im_start|>system\n{QWEN2_SYSTEM if system is None else system}<|im_end|>\n", False)]
        for user, answer in turns:
            segments.append((f"<|im_start|>user\n{expand(user)}{query}<|im_end|>\n<|im_start|>assistant\n", False))
            if answer is not None:
                segments += [(answer + template.answer_end, True), ("\n", False)]
    elif template.name == "phi2":
        segments = [((PHI2_SYSTEM if system is None else system) + " ", False)]
        for user, answer in turns:
            segments.append((f"USER: {expand(user)}{' ' + query if query else ''} ASSISTANT:", False))
            if answer is not None:
                segments.append((f" {answer}{template.answer_end}", True))
    else:
        if system is not None or len(turns) != 1 or turns[0][1] is None:
            raise ValueError("conversation: the plain template takes one user turn (its images) and one answer "
                             "(the caption), no system message")
        user, caption = turns[0]
        images = expand(IMAGE_PLACEHOLDER * user.count(IMAGE_PLACEHOLDER))
        segments = [(images, False), (caption, True), (query, False), (template.answer_end, True)]
    merged = []  # the prompt between two answers is one piece, tokenized in context as the originals do
    for text, supervised in segments:
        if merged and merged[-1][1] == supervised:
            merged[-1] = (merged[-1][0] + text, supervised)
        elif text:
            merged.append((text, supervised))
    return merged


def format_conversation(conversation, template, num_image_tokens=None, num_query_tokens=0):
    """The prompt text of ``conversation`` in ``template``; one image token per image unless counts are given."""
    return "".join(text for text, _ in _segments(conversation, get_template(template), num_image_tokens,
                                                  num_query_tokens))


def token_id(tokenizer, token):
    """The id ``token`` encodes to when it is one token of ``tokenizer`` (not the unknown token), else None."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or (ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return ids[0]


def add_template_tokens(tokenizer, template):
    """Add the template's special tokens (and ``<learnable>``) that ``tokenizer`` lacks, i.e. that do not encode to
    one token of their own (a token the tokenizer maps to its unknown token is lacking); returns the tokens added,
    in order (resize the model's embeddings to ``len(tokenizer)``)."""
    from transformers import AddedToken

    template = get_template(template)
    missing = [t for t in (*template.special_tokens, QUERY_TOKEN) if token_id(tokenizer, t) is None]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    still = [t for t in missing if token_id(tokenizer, t) is None]
    if still:
        raise ValueError(f"tokenizer: {still} still do not encode to one token each after being added")
    return missing


def tokenize_conversation(conversation, tokenizer, template, num_image_tokens=(), num_query_tokens=0,
                          max_length=None):
    """``{"input_ids", "labels"}`` (int64 [L]) of ``conversation`` in ``template`` with any Hugging Face tokenizer.

    ``num_image_tokens``: visual tokens of each image, in placeholder order (see ``image_token_counts``).
    ``max_length`` truncates the end of the sequence, never through image tokens (ValueError then).
    """
    template = get_template(template)
    num_image_tokens = () if num_image_tokens is None else num_image_tokens
    needed = template.special_tokens + ((QUERY_TOKEN,) if num_query_tokens else ())
    for token in needed:
        if token_id(tokenizer, token) is None:
            raise ValueError(f"tokenizer: {token!r} of template {template.name!r} is not a single token; "
                             f"add_template_tokens(tokenizer, {template.name!r}) adds it")
    segments = _segments(conversation, template, num_image_tokens, num_query_tokens)
    encoded = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([i for ids in encoded for i in ids], dtype=torch.int64)
    labels = torch.cat([torch.tensor(ids, dtype=torch.int64) if sup else torch.full((len(ids),), IGNORE_INDEX)
                        for ids, (_, sup) in zip(encoded, segments)])
    is_image = input_ids == token_id(tokenizer, template.image_token)
    if is_image.sum().item() != sum(num_image_tokens):
        raise ValueError(f"conversation: the text contains {template.image_token!r} itself; "
                         "mark images with <image> only")
    if max_length is not None and input_ids.numel() > max_length:
        if is_image[max_length:].any():
            raise ValueError(f"max_length={max_length} would cut image tokens ({input_ids.numel()} tokens)")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _grid_rows(image_grid_thw):
    grid = torch.as_tensor(image_grid_thw)
    if grid.numel() and (grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool):
        raise TypeError(f"image_grid_thw must hold integers, got {image_grid_thw!r}")
    grid = grid.to(torch.int64)
    if grid.numel() and (grid.dim() != 2 or grid.shape[1] != 3 or (grid <= 0).any()):
        raise ValueError(f"image_grid_thw must be [n_images, 3] rows of positive (t, h, w), got {image_grid_thw!r}")
    return grid.tolist() if grid.numel() else []


def image_token_counts(image_grid_thw, compressor, merge_size=2, window=3):
    """Visual tokens the LLM gets for each row (t, h, w) of ``image_grid_thw`` (ViT patch grid).

    - ``none``: every patch, ``t*h*w``.
    - ``patch_merge`` (Qwen2-VL PatchMerger) and ``deepstack_midlayers`` (its stacked groups add no tokens):
      one per m x m patches, ``t*h*w / m^2``.
    - ``deepstack_efficient``: one per 2m x 2m patches, ``t*h*w / (2m)^2`` (the four m x m groups are
      stacked into the LLM, not appended).
    - ``sap`` (FlashSloth's spatial attention pooling, one row per crop): one per window x window patches,
      edge windows included, ``t*ceil(h/3)*ceil(w/3)``: 27x27 -> 81, i.e. 405 for the 5 crops of an HD image.
    """
    _cell(compressor, merge_size, window)  # checked also when there is no image
    rows = _grid_rows(image_grid_thw)
    return [math.prod(llm_grid(t, h, w, compressor, merge_size, window, rows)) for t, h, w in rows]


def llm_grid(t, h, w, compressor, merge_size=2, window=3, rows=None):
    """(frames, rows, columns) of the LLM tokens of one (t, h, w) ViT patch grid under ``compressor`` (see
    image_token_counts); M-RoPE places them on this grid. ``rows``: the whole grid, for error messages."""
    side = _cell(compressor, merge_size, window)
    if compressor == "sap":
        return t, math.ceil(h / side), math.ceil(w / side)
    if h % side or w % side:
        raise ValueError(f"image_grid_thw: h and w must be multiples of {side} for {compressor!r}, "
                         f"got {rows or [[t, h, w]]}")
    return t, h // side, w // side


def _cell(compressor, merge_size, window):
    """The side, in patches, of the square one LLM token covers (for 'sap' edge squares may be partial)."""
    for name, value in (("merge_size", merge_size), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cells = {"none": 1, "patch_merge": merge_size, "deepstack_midlayers": merge_size,
             "deepstack_efficient": 2 * merge_size, "sap": window}
    if compressor not in cells:
        raise ValueError(f"compressor must be one of {sorted(cells)}, got {compressor!r}")
    return cells[compressor]
