"""Checkpoints of the original models -> FastVL: transformers' Qwen2-VL / Qwen2.5-VL, and the SliMM and
FlashSloth releases.

A converter maps the checkpoint's config to a FastVLConfig that carries the original's rules (M-RoPE, SliMM's tap
list and DeepStack-Efficient input, FlashSloth's query rules; see FastVLConfig) and every state-dict key to a FastVL
parameter. A checkpoint key left over, a parameter left unset or a shape that differs is a ValueError listing them.
"""
import os
import re
import shutil
from pathlib import Path

import torch

from .configuration import FastVLConfig, FastVLVisionConfig
from .loading import (
    CONFIG_META, key_listing, read_config, read_state_dict, siglip_vision_names, vision_config_from_hf,
)

SOURCES = ("qwen2_vl", "slimm", "flashsloth")
SLIMM_VIT_TAPS = [8, 16, 24, 30]  # SliMM's DeepStack-MidLayers taps, whatever the ViT depth
FLASHSLOTH_QUERY_ID = 50295  # FlashSloth's <learnable> (LEARNABLE_TOKEN_INDEX)
FLASHSLOTH_DOT_ID = 764  # its query tokens add this token's embedding
FLASHSLOTH_PROMPT_TOKENS = 32  # its question span starts after the system prompt and "USER: "


def checkpoint_format(path):
    """'fastvl', or which converter reads the checkpoint directory ``path`` (one of SOURCES)."""
    raw = read_config(path)
    kind = raw.get("model_type")
    if kind == FastVLConfig.model_type:
        return "fastvl"
    if any("SliMM" in a for a in raw.get("architectures") or ()) or "use_deepstack" in raw:
        return "slimm"
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        return "qwen2_vl"
    if kind == "flashsloth" or "mm_vision_tower" in raw:
        return "flashsloth"
    raise ValueError(f"{path}: model_type {kind!r} is not a FastVL, Qwen2-VL, Qwen2.5-VL, SliMM or FlashSloth "
                     "checkpoint (a language model alone loads with load_language_weights)")


def _flatten(value):
    return value.reshape(value.shape[0], -1)  # Conv3d with stride = kernel == Linear over each pixel row


# (checkpoint key pattern, FastVL name, transform); the first match wins, an unmatched key stays as it is
_QWEN_RULES = [
    (r"visual\.patch_embed\.proj\.weight$", "vision_tower.patch_embed.weight", _flatten),
    (r"visual\.blocks\.", "vision_tower.blocks.", None),
    (r"visual\.merger\.(ln_q|mlp)\.", r"compressor.merger.\1.", None),
    (r"visual\.merger\.ln_q_deepstack_list\.(\d+)\.", r"compressor.deepstack_mergers.\1.ln_q.", None),
    (r"visual\.merger\.mlp_deepstack_list\.(\d+)\.", r"compressor.deepstack_mergers.\1.mlp.", None),
    (r"visual\.merger\.ln_q_deepstack\.", "compressor.merger_deepstack.ln_q.", None),
    (r"visual\.merger\.mlp_deepstack\.", "compressor.merger_deepstack.mlp.", None),
    (r"model\.", "language_model.model.", None),
    (r"lm_head\.", "language_model.lm_head.", None),
]
_FLASHSLOTH_RULES = [
    (r"model\.pooling\.", "compressor.pooling.", None),
    (r"model\.mm_projector\.", "compressor.projector.", None),
    (r"model\.learnable_tokens\.token$", "embq.query_tokens", None),
    (r"model\.lqformer\.layers\.0\.", "embq.", None),
    (r"model\.lqformer\.", "embq.", None),
    (r"model\.", "language_model.model.", None),
    (r"lm_head\.", "language_model.lm_head.", None),
]


def _rename(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, name, transform in rules:
            match = re.match(pattern, key)
            if match:
                key = match.expand(name) + key[match.end():]
                value = value if transform is None else transform(value)
                break
        out[key] = value
    return out


def _qwen_layout(state):
    """transformers >= 5 saves Qwen2-VL as model.visual.* / model.language_model.*; earlier (and the SliMM
    releases) as visual.* / model.*."""
    return {re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", k)): v
            for k, v in state.items()}


def _qwen2_text(fields, tie):
    """(Qwen2Config, mrope_section) from the fields of a Qwen2-VL text config or a Qwen2 config."""
    from transformers import Qwen2Config

    rope = dict(fields.get("rope_parameters") or {"rope_theta": fields.get("rope_theta", 1e6)})
    section = rope.pop("mrope_section", None)
    rope = {k: v for k, v in rope.items() if k != "type"} | {"rope_type": rope.get("rope_type", "default")}
    known = set(Qwen2Config().to_dict()) - set(CONFIG_META) - {"rope_parameters", "tie_word_embeddings"}
    text = Qwen2Config(**{k: v for k, v in fields.items() if k in known}, rope_parameters=rope,
                       tie_word_embeddings=bool(tie))
    return text, section


def _qwen2_vl(src, raw, state, vision_model, tokenizer):
    from transformers import AutoConfig

    if vision_model is not None:
        raise ValueError("vision_model: a Qwen2-VL checkpoint holds its vision tower")
    hf = AutoConfig.from_pretrained(src)
    text, section = _qwen2_text(hf.text_config.to_dict(), hf.tie_word_embeddings)
    config = FastVLConfig(
        vision_config=vision_config_from_hf(src), text_config=text, compressor="patch_merge",
        image_token_id=hf.image_token_id, video_token_id=hf.video_token_id, mrope_section=section or [16, 24, 24],
        tokens_per_second=getattr(hf.vision_config, "tokens_per_second", None), chat_template="qwen2",
    )
    return config, _rename(_qwen_layout(state), _QWEN_RULES)


def _slimm(src, raw, state, vision_model, tokenizer):
    """SliMM: transformers' Qwen2VLForConditionalGeneration with a Qwen2-VL LLM (M-RoPE even on a 'qwen2' config,
    sections [8, 12, 12] below head_dim 128) and SliMM's mergers."""
    from transformers import AutoConfig

    kind, deepstack = raw.get("model_type"), raw.get("use_deepstack", False)
    variant = raw.get("deepstack_type") if deepstack else None
    if variant not in (None, "midlayers", "efficient"):
        raise ValueError(f"{src}: deepstack_type {variant!r}: the releases are 'midlayers' and 'efficient'")
    for key, plain in (("local_features_interval", 1), ("global_interval", None)):
        if raw.get(key, plain) != plain:
            raise ValueError(f"{src}: {key}={raw[key]!r} is not supported (the releases use {plain!r})")
    visual = vision_model or raw.get("custom_visual_model")
    if visual is not None and not os.path.isdir(visual):
        raise FileNotFoundError(f"{src}: custom_visual_model {visual!r} is not a local directory; download it and "
                                "pass it as vision_model (fastvl convert --vision-model DIR)")
    if visual is None and "vision_config" not in raw:
        raise ValueError(f"{src}: no vision config and no custom_visual_model; pass vision_model")
    merge = raw.get("spatial_merge_size", 2)
    fields = dict(spatial_merge_size=merge, temporal_patch_size=raw.get("temporal_patch_size", 2))
    vision = vision_config_from_hf(visual or src, **fields)
    if variant == "efficient":  # 28-px pixel rows and grids, re-laid out as 14-px patches
        vision = vision_config_from_hf(visual or src, **fields, input_patch_size=vision.patch_size * merge)
    if kind == "qwen2_vl":
        hf = AutoConfig.from_pretrained(src)
        text, section = _qwen2_text(hf.text_config.to_dict(), hf.tie_word_embeddings)
    elif kind == "qwen2":
        text, _ = _qwen2_text(raw, raw.get("tie_word_embeddings", False))
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        section = [16, 24, 24] if 2 * sum([16, 24, 24]) <= head_dim else [8, 12, 12]
    else:
        raise ValueError(f"{src}: a SliMM checkpoint has model_type 'qwen2' or 'qwen2_vl', got {kind!r}")
    config = FastVLConfig(
        vision_config=vision, text_config=text, compressor="deepstack" if deepstack else "patch_merge",
        deepstack_type=variant or "midlayers", deepstack_order="slimm" if variant == "efficient" else "spatial",
        deepstack_vit_layers=SLIMM_VIT_TAPS if variant == "midlayers" else None,
        deepstack_start=raw.get("local_features_start", 1), image_token_id=raw.get("image_token_id", 151655),
        video_token_id=raw.get("video_token_id", 151656),
        mrope_section=(section or [16, 24, 24]) if raw.get("use_mrope", True) else None, chat_template="qwen2",
    )
    return config, _rename(_qwen_layout(state), _QWEN_RULES)


def _flashsloth(src, raw, state, vision_model, tokenizer):
    """FlashSloth: SigLIP without its last layers -> SAP -> mlp2x_gelu projector -> Phi-2, with the LQFormer
    (EmbQ) at the input of decoder layer 7 and its own rules for the queries."""
    from transformers import PhiConfig

    from ..data import QUERY_TOKEN, add_template_tokens

    for key, value in (("mm_projector_type", "mlp2x_gelu"), ("mm_vision_select_feature", "patch")):
        if raw.get(key, value) != value:
            raise ValueError(f"{src}: {key}={raw[key]!r} (FlashSloth uses {value!r})")
    select = raw.get("mm_vision_select_layer", -2)
    tower = vision_model or raw.get("mm_vision_tower")
    if tower is not None and os.path.isdir(tower):  # kept: the layers up to mm_vision_select_layer
        siglip = read_config(tower)
        layers = siglip.get("vision_config", siglip)["num_hidden_layers"]
        vision = vision_config_from_hf(tower, depth=layers + select + 1 if select < 0 else select + 1)
    elif select == -2:
        vision = FastVLVisionConfig.siglip_so400m()
    else:
        raise ValueError(f"{src}: mm_vision_select_layer={select}; pass the SigLIP directory as vision_model")
    known = set(PhiConfig().to_dict()) - set(CONFIG_META) | {"rope_theta", "partial_rotary_factor"}
    text = PhiConfig(**{k: v for k, v in raw.items() if k in known})
    if tokenizer is not None:
        add_template_tokens(tokenizer, "phi2")
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        if tokenizer.convert_tokens_to_ids(QUERY_TOKEN) != FLASHSLOTH_QUERY_ID or len(tokenizer) > text.vocab_size:
            raise ValueError(f"{src}: the tokenizer must hold {QUERY_TOKEN} as id {FLASHSLOTH_QUERY_ID} and at most "
                             f"{text.vocab_size} tokens")
    else:
        image_token_id = raw.get("image_token_index", 50297)
    config = FastVLConfig(
        vision_config=vision, text_config=text, compressor="sap", sap_window=3, image_hd=raw.get("image_hd", False),
        image_token_id=image_token_id, use_embq=True, query_token_id=FLASHSLOTH_QUERY_ID, num_query_tokens=9,
        embq_layer=7, embq_dim=576, embq_question_start=FLASHSLOTH_PROMPT_TOKENS, embq_without_image="plain",
        embq_image="batch_index", chat_template="phi2",
    )
    prefix = "model.vision_tower.vision_tower.vision_model."
    names, ignored = siglip_vision_names({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                         vision.depth)
    names |= {prefix + k: state[prefix + k] for k in ignored}
    names |= _rename({k: v for k, v in state.items() if not k.startswith(prefix)}, _FLASHSLOTH_RULES)
    embed = state.get("model.embed_tokens.weight")
    if "embq.query_tokens" in names and embed is not None:  # fastvl adds embed(query id) itself: fold the rest in
        token = names["embq.query_tokens"]
        names["embq.query_tokens"] = (token.double() + embed[FLASHSLOTH_DOT_ID].double()
                                      - embed[FLASHSLOTH_QUERY_ID].double()).to(token.dtype)
    return config, names


_CONVERTERS = {"qwen2_vl": _qwen2_vl, "slimm": _slimm, "flashsloth": _flashsloth}


def _load(model, state, src):
    """Copy ``state`` (FastVL names) into ``model``; every parameter must be given once (tied ones share)."""
    expected = model.state_dict()
    storage = {k: v.data_ptr() for k, v in expected.items()}
    given = {storage[k] for k in state if k in expected}
    missing = [k for k in expected if k not in state and storage[k] not in given]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} (the model's: {list(expected[k].shape)})"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{what}: {key_listing(keys)}" for what, keys in (
            ("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
        raise ValueError(f"{src}: the checkpoint does not map onto the model ({'; '.join(problems)})")
    written = {}
    with torch.no_grad():
        for key, value in state.items():
            other = written.setdefault(storage[key], key)
            if other != key and not torch.equal(expected[other], value.to(expected[other].dtype)):
                raise ValueError(f"{src}: {key} and {other} are tied in the model but differ in the checkpoint")
            expected[key].copy_(value)


def _dtype_of(state):
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


def convert(src, source="auto", vision_model=None, dtype=None, tokenizer=None):
    """The FastVLForConditionalGeneration of the checkpoint directory ``src`` (``source``: 'auto' or one of
    SOURCES), in ``dtype`` (default: the checkpoint's).

    ``vision_model``: a local directory for the vision tower's config where the checkpoint names a hub model
    (SliMM's ``custom_visual_model``, FlashSloth's ``mm_vision_tower``). ``tokenizer`` (FlashSloth): its
    ``<image>`` id becomes the image token id; the template's tokens are added to it.
    """
    from .modeling import FastVLForConditionalGeneration

    source = checkpoint_format(src) if source == "auto" else source
    if source not in _CONVERTERS:
        raise ValueError(f"source must be 'auto' or one of {SOURCES}, got {source!r}")
    raw, state = read_config(src), read_state_dict(src)
    config, state = _CONVERTERS[source](src, raw, state, vision_model, tokenizer)
    model = FastVLForConditionalGeneration._from_config(config, dtype=dtype or _dtype_of(state))
    _load(model, state, src)
    return model.eval()


def save_converted(src, dst, source="auto", vision_model=None, dtype=None):
    """Convert ``src`` (see ``convert``) and save the FastVL model in ``dst`` with the checkpoint's tokenizer (and
    its image processor config); returns the model."""
    from .generate import find_tokenizer

    tokenizer = find_tokenizer(src)
    model = convert(src, source, vision_model, dtype, tokenizer)
    model.save_pretrained(dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    processor = Path(src) / "preprocessor_config.json"
    if processor.is_file():
        shutil.copy(processor, Path(dst) / processor.name)
    return model
