"""The model, tokenizer and image processor a run trains; its parts, which are frozen, and their learning rates."""
import torch
from torch import nn

from ..data import add_template_tokens, image_token_counts
from ..data.conversation import QUERY_TOKEN, get_template, token_id
from ..models import FastVLConfig, FastVLForConditionalGeneration, image_processor, load_language_weights
from ..models import load_tokenizer, load_vision_weights, vision_config_from_hf

# part -> the attribute of FastVLForConditionalGeneration that holds it
PART_MODULES = {"vision": "vision_tower", "projector": "compressor", "embq": "embq", "llm": "language_model"}


def _token_id(tokenizer, token):
    found = token_id(tokenizer, token)
    if found is None:
        raise ValueError(f"tokenizer: {token!r} is not one token")
    return found


def build_model(args):
    """(model, tokenizer): a saved FastVL model, or a new one from a vision checkpoint and a language model
    (FlashSloth's "save" step): the tokenizer gets the template's tokens, the vision tower (and a Qwen2-VL
    merger) its weights, the LLM its weights; the rest starts from ``seed``."""
    from transformers import AutoConfig, AutoTokenizer

    if args.model_name_or_path:
        model = FastVLForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=torch.float32)
        if args.template:
            model.config.chat_template = args.template
        return model, load_tokenizer(args.model_name_or_path, model.config)
    template = args.template or "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(args.language_model)
    add_template_tokens(tokenizer, template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = FastVLConfig(
        vision_config=vision_config_from_hf(args.vision_tower),
        text_config=AutoConfig.from_pretrained(args.language_model),
        compressor=args.compressor, deepstack_type=args.deepstack_type, image_hd=args.image_hd,
        use_embq=args.use_embq, num_query_tokens=args.num_query_tokens, embq_layer=args.embq_layer,
        chat_template=template, image_token_id=_token_id(tokenizer, get_template(template).image_token),
        query_token_id=_token_id(tokenizer, QUERY_TOKEN) if args.use_embq else None,
    )
    torch.manual_seed(args.seed)
    model = FastVLForConditionalGeneration(config)
    load_language_weights(model, args.language_model)
    load_vision_weights(model, args.vision_tower)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def data_settings(model, args):
    """(processor, num_image_tokens function, query tokens per question) matching the model's config."""
    config = model.config
    processor = image_processor(config)
    if config.vision_config.tower == "native":
        for name in ("min_pixels", "max_pixels"):
            if getattr(args, name) is not None:
                setattr(processor, name, getattr(args, name))
        processor.target_size(processor.resize_factor, processor.resize_factor)  # checks the budget
    return processor, _ImageTokens(model), config.num_query_tokens if config.use_embq else 0


class _ImageTokens:
    """The LLM tokens of each image of a processor output (picklable, for DataLoader workers); ``vit_patches``
    their ViT patches in all."""

    def __init__(self, model):
        config = model.config
        vision = config.vision_config
        self.tower, self.compressor = vision.tower, config.compressor
        if config.compressor == "deepstack":
            self.compressor = f"deepstack_{config.deepstack_type}"
        self.merge_size, self.window = vision.spatial_merge_size, config.sap_window
        self.fixed = None if self.tower == "native" else model.num_image_tokens(1)[0]
        # ViT patches per pixel_values row: a fixed tower's crop, a native tower's input patch
        self.row_patches = vision.input_unit ** 2 if self.tower == "native" else vision.grid_size ** 2

    def __call__(self, processed):
        if self.fixed is not None:
            return [self.fixed] * (processed["pixel_values"].shape[0] // processed["crops_per_image"])
        return image_token_counts(processed["image_grid_thw"], self.compressor, self.merge_size, self.window)

    def vit_patches(self, processed):
        return processed["pixel_values"].shape[0] * self.row_patches


def part_of(name):
    """The part (``PART_MODULES`` key) a parameter name belongs to."""
    for part, attr in PART_MODULES.items():
        if name.startswith(attr + "."):
            return part
    raise ValueError(f"parameter {name!r} belongs to no part of {sorted(PART_MODULES)}")


def freeze(model, parts=None):
    """Trains ``parts`` only (default: every part the model has but the vision tower) and returns them: other
    parameters get ``requires_grad=False`` (no gradient, no optimizer state) and a frozen vision tower runs under
    ``torch.no_grad`` (no autograd graph, no saved activations)."""
    if parts is None:
        parts = [p for p in PART_MODULES if p != "vision" and getattr(model, PART_MODULES[p]) is not None]
    missing = [p for p in parts if getattr(model, PART_MODULES[p]) is None]
    if missing:
        raise ValueError(f"tune_parts: the model has no {missing} (use_embq is off)")
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name) in parts)
    if "vision" not in parts:
        tower = model.vision_tower
        tower.forward = torch.no_grad()(type(tower).forward.__get__(tower))
    return parts


def param_groups(model, args):
    """AdamW groups per part and decay: the projector at ``mm_projector_lr``, the vision tower at
    ``mm_vision_tower_lr`` (each defaulting to ``learning_rate``); no weight decay on biases and norms."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm, nn.RMSNorm], [r"bias", r"norm"]))
    lrs = {"projector": args.mm_projector_lr, "vision": args.mm_vision_tower_lr}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        key = (part, name in decay)
        if key not in groups:
            lr = args.learning_rate if lrs.get(part) is None else lrs[part]
            groups[key] = {"params": [], "part": part, "lr": lr,
                           "weight_decay": args.weight_decay if name in decay else 0.0}
        groups[key]["params"].append(param)
    return list(groups.values())
