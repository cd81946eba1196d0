"""Prompt + image -> text with a saved FastVL model: the image processor and chat template its config implies."""
import torch


def image_processor(config):
    """The fastvl.data processor matching the vision tower of ``config``."""
    from ..data import FixedResolutionProcessor, NativeResolutionProcessor

    vision = config.vision_config
    if vision.tower == "fixed":
        return FixedResolutionProcessor(size=vision.image_size, hd=config.image_hd)
    efficient = config.compressor == "deepstack" and config.deepstack_type == "efficient"
    factor = vision.patch_size * vision.spatial_merge_size * (2 if efficient else 1)
    return NativeResolutionProcessor(
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size, resize_factor=factor,
    )


def prepare_inputs(model, tokenizer, images, prompt):
    """``generate()`` inputs of one user turn: ``images`` (PIL) then ``prompt``, in the model's chat template."""
    from ..data import tokenize_conversation

    config = model.config
    inputs = image_processor(config)(images)
    counts = model.num_image_tokens(inputs.get("image_grid_thw", inputs["pixel_values"]))
    queries = config.num_query_tokens if config.use_embq else 0
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
def generate_text(model, tokenizer, images, prompt, max_new_tokens=128):
    """Greedy answer of ``model`` to ``prompt`` about ``images``."""
    inputs = prepare_inputs(model, tokenizer, images, prompt)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
